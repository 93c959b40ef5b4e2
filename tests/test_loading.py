"""Checkpoints as users have them: sharded safetensors, fp16 variants, Hub ids read offline from a Hub cache
folder, and lazy loading (no second copy in host memory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from huggingface_hub.utils import filter_repo_objects
from safetensors.numpy import load_file, save_file

import jointnet_jax as jj
from jointnet_jax import sample
from jointnet_jax.diffusion.schedule import load_schedule
from jointnet_jax.models import hub, weights
from tests.tiny_sd import make_tiny_base

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _tensors(model):
    return dict(weights.state_tensors(model))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("loading") / "base")


@pytest.fixture(scope="module")
def variants(base, tmp_path_factory):
    """The base's UNet and text encoder re-saved by diffusers / transformers: sharded fp32, fp16 variant, and
    sharded fp16 variant (the file names those libraries write)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("variants")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.save_pretrained(root / "unet_sharded", max_shard_size="300KB")
    text = CLIPTextModel.from_pretrained(base / "text_encoder")
    text.save_pretrained(root / "text_sharded", max_shard_size="20KB")
    unet.half().save_pretrained(root / "unet_fp16", variant="fp16")
    unet.save_pretrained(root / "unet_fp16_sharded", variant="fp16", max_shard_size="300KB")
    text.half().save_pretrained(root / "text_fp16", variant="fp16")
    return root


def test_sharded_safetensors_load_like_one_file(base, variants):
    assert len(list((variants / "unet_sharded").glob("*.safetensors"))) > 1
    assert (variants / "unet_sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _same(_tensors(jj.load_unet(variants / "unet_sharded")), _tensors(jj.load_unet(base / "unet")))
    assert (variants / "text_sharded" / "model.safetensors.index.json").is_file()
    _same(
        _tensors(jj.load_text_encoder(variants / "text_sharded")), _tensors(jj.load_text_encoder(base / "text_encoder"))
    )


def test_sharded_index_naming_a_missing_shard_is_one_clear_error(variants, tmp_path):
    folder = shutil.copytree(variants / "unet_sharded", tmp_path / "u")
    next(iter(sorted(folder.glob("*-00002-of-*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shards that are missing: diffusion_pytorch_model-00002"):
        jj.load_unet(folder)


def test_fp16_variant_loads_into_float32_parameters(base, variants):
    """``diffusion_pytorch_model.fp16.safetensors``: the half values, widened to float32 parameters; found without
    ``variant=`` when it is the only weights file; ``param_dtype`` keeps them half."""
    stored = load_file(variants / "unet_fp16" / "diffusion_pytorch_model.fp16.safetensors")
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
    for model in (jj.load_unet(variants / "unet_fp16", variant="fp16"), jj.load_unet(variants / "unet_fp16")):
        got = _tensors(model)
        assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
        for k, v in stored.items():
            np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)
    full = _tensors(jj.load_unet(base / "unet"))
    assert any(not np.array_equal(full[k], got[k]) for k in full)  # really the rounded half values
    half = jj.load_unet(variants / "unet_fp16", variant="fp16", param_dtype=jnp.float16)
    assert half.conv_in.kernel[...].dtype == jnp.float16
    # Sharded fp16 (index ``diffusion_pytorch_model.safetensors.index.fp16.json``) and a transformers text encoder.
    assert (variants / "unet_fp16_sharded" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    _same(_tensors(jj.load_unet(variants / "unet_fp16_sharded", variant="fp16")), got)
    text = _tensors(jj.load_text_encoder(variants / "text_fp16", variant="fp16"))
    stored = load_file(variants / "text_fp16" / "model.fp16.safetensors")
    assert stored and {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
    for k, v in stored.items():  # transformers 5 writes the keys without the ``text_model.`` prefix
        np.testing.assert_array_equal(
            text[k if k.startswith("text_model.") else f"text_model.{k}"], v.astype(np.float32)
        )


def test_missing_variant_is_named(variants):
    with pytest.raises(FileNotFoundError, match=r"no weights file \(diffusion_pytorch_model.bf16.safetensors\)"):
        jj.load_unet(variants / "unet_fp16", variant="bf16")


# ------------------------------------------------------------------------------------------------------------
# Hub ids, offline, from a Hub cache folder built here


def _cache_repo(cache, repo_id: str, source, variant_files: dict | None = None):
    """``models--org--name/snapshots/<rev>/...`` plus ``refs/main``, as huggingface_hub lays out its cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, src in (variant_files or {}).items():
        shutil.copytree(src, repo / "snapshots" / REVISION / name, dirs_exist_ok=True)
    return repo / "snapshots" / REVISION


@pytest.fixture(scope="module")
def hub_cache(base, variants, official, tmp_path_factory):
    """A Hub cache holding a tiny SD base (``org/tiny-sd-base``, with an fp16 UNet variant beside the fp32
    files, as SD repositories have) and the official tiny JointNet (``org/jointnet-tiny``)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    _cache_repo(cache, "org/tiny-sd-base", base, {"unet": variants / "unet_fp16"})
    _cache_repo(cache, "org/jointnet-tiny", official / "rgbd_finetune")
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """huggingface_hub reads its cache folder and offline switch at import; patch its constants."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_hub_ids_load_offline_from_the_cache(offline, base, official):
    snapshot = offline / "models--org--tiny-sd-base" / "snapshots" / REVISION
    assert hub.resolve("org/tiny-sd-base") == snapshot
    _same(_tensors(jj.load_unet("org/tiny-sd-base/unet")), _tensors(jj.load_unet(base / "unet")))
    _same(_tensors(jj.load_unet("org/tiny-sd-base", subfolder="unet")), _tensors(jj.load_unet(base / "unet")))
    fp16 = _tensors(jj.load_unet("org/tiny-sd-base", subfolder="unet", variant="fp16"))
    assert fp16["conv_in.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        fp16["conv_in.weight"],
        _tensors(jj.load_unet(base / "unet"))["conv_in.weight"].astype(np.float16).astype(np.float32),
    )
    _same(_tensors(jj.load_jointnet("org/jointnet-tiny")), _tensors(jj.load_jointnet(official / "rgbd_finetune")))
    _same(_tensors(jj.load_vae("org/tiny-sd-base/vae")), _tensors(jj.load_vae(base / "vae")))
    pipe = jj.Pipeline.from_pretrained("org/tiny-sd-base", "org/jointnet-tiny")
    _same(_tensors(pipe.text_encoder), _tensors(jj.load_text_encoder(base / "text_encoder")))
    np.testing.assert_array_equal(pipe.schedule.alphas_cumprod, load_schedule(base / "scheduler").alphas_cumprod)
    assert pipe.tokenizer("a cat").input_ids == jj.load_tokenizer(base / "tokenizer")("a cat").input_ids


def test_hub_id_not_in_the_cache_is_one_sentence(offline):
    with pytest.raises(
        FileNotFoundError, match=r"org/absent is neither a local folder nor a Hub model .*HF_HUB_OFFLINE"
    ):
        jj.load_jointnet("org/absent")
    with pytest.raises(FileNotFoundError, match=r"UNet folder .*no/such/dir does not exist"):
        jj.load_unet("./no/such/dir")


def test_cli_takes_hub_ids(offline, base, official, tmp_path):
    """``--base ORG/NAME --model ORG/NAME`` offline: the same files as the local folders."""
    args = ["generate", "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--seed", "7"]
    local = ["--base", str(base), "--model", str(official / "rgbd_finetune"), "--out", str(tmp_path / "local")]
    assert sample.main([*args, *local]) == 0
    assert (
        sample.main(
            [*args, "--base", "org/tiny-sd-base", "--model", "org/jointnet-tiny", "--out", str(tmp_path / "hub")]
        )
        == 0
    )
    for name in ("0000.npz", "0000_rgb.png", "0000_depth.png"):
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    meta = json.loads((tmp_path / "hub" / "0000.json").read_text())
    assert meta["base"] == "org/tiny-sd-base" and meta["model"] == "org/jointnet-tiny"


def test_download_patterns_take_only_what_the_loaders_read():
    """On the file list of stabilityai/stable-diffusion-2-1-base, a base download takes the four folders'
    configs, tokenizer and fp32 safetensors: not the 5 GB single-file checkpoints, the .bin copies, the unet, or
    the fp16 variants (and with ``variant="fp16"``, only those)."""
    listing = [
        ".gitattributes", "README.md", "model_index.json", "v2-1_512-ema-pruned.ckpt",
        "v2-1_512-ema-pruned.safetensors", "v2-1_512-nonema-pruned.ckpt", "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip

    def chosen(subfolders, variant=None):
        allow, ignore = hub.download_patterns(subfolders, variant)
        return set(filter_repo_objects(listing, allow_patterns=allow, ignore_patterns=ignore or None))

    configs = {
        "scheduler/scheduler_config.json", "text_encoder/config.json", "vae/config.json", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    }  # fmt: skip
    base = ("vae", "text_encoder", "tokenizer", "scheduler")
    assert chosen(base) == configs | {"text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert chosen(base, "fp16") == configs | {
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }
    assert chosen(["unet"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}


# ------------------------------------------------------------------------------------------------------------
# Lazy loading: peak host memory


LOAD_AND_MEASURE = textwrap.dedent(
    """
    import json, sys
    from flax import nnx
    import jax
    import jointnet_jax as jj

    def status(field):  # kB in /proc/self/status
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    jj.load_unet(sys.argv[2])  # warm up: imports, XLA's CPU client, small allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = status("VmRSS")
    model = jj.load_unet(sys.argv[1])
    nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(json.dumps({"peak_growth": status("VmHWM") - before, "model_bytes": nbytes}))
    """
)


def test_loading_holds_no_second_copy(base, tmp_path):
    """A ~190 MB UNet checkpoint loads with peak host memory growing by about the model's size: tensors are
    read one at a time into the model, never as a full state dict next to it (which would be 2x)."""
    config = json.loads((base / "unet" / "config.json").read_text())
    config.update(block_out_channels=[64, 256, 512, 512], attention_head_dim=[2, 4, 8, 8], norm_num_groups=32)
    model = weights.abstract(lambda: jj.UNet2DConditionModel(jj.UNetConfig.from_dict(config), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in _torch_shapes(model)}
    folder = tmp_path / "big_unet"
    folder.mkdir()
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    size = sum(v.nbytes for v in tensors.values())
    del tensors
    assert size > 150e6
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(folder), str(base / "unet")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "XLA_FLAGS": ""},  # one CPU device
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model_bytes"] == size
    # Measured: 1.14x (the model plus one tensor in flight); a loader holding the whole state dict: 2.14x.
    assert result["peak_growth"] < 1.5 * size, result


def _torch_shapes(model):
    """(PyTorch key, PyTorch-layout shape) of every parameter of an abstract model."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = weights.to_torch_layout(str(path[-1]), np.empty(var.get_value().shape, np.int8)).shape
        yield weights.torch_key(path), shape
