"""The latent cache: ``jointnet-cache-latents`` (resume per shard, bad input counted), its reader
(``loader.LatentLoader``: corrupt records counted and skipped) and training from it (``data.latents``): the
loss equals in-step encoding's on the same records and seeds (fp32 storage), and bf16 / fp16 storage stay
close."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import sd21_depth
from jointnet_jax.data import latent_records, latents, records, synthetic
from jointnet_jax.data.loader import LatentLoader, Loader, LoaderConfig, TooManyCorruptRecordsError
from jointnet_jax.models.tiny import ensure_tiny_base
from jointnet_jax.models.vae import DiagonalGaussian
from jointnet_jax.training.objective import _per_example_keys, encode_latents, sample_latents
from jointnet_jax.training.setup import tiny_unet_config
from jointnet_jax.training.steps import make_loss
from jointnet_jax.training.trainer import Trainer

RESOLUTION = 32
NUM_RECORDS = 8


def _config(records_dir, cache_dir):
    c = sd21_depth.get_config("tiny")
    c.tiny_unet = "2level"
    c.total_steps, c.checkpoint_every, c.export = 1, 1, False
    c.mesh.data, c.mesh.fsdp = 4, 2
    c.data.paths, c.data.latents, c.data.resolution = str(cache_dir), True, RESOLUTION
    c.data.flip = True
    return c


def _cache(records_dir, out, model, dtype="fp32", extra=()):
    inputs = [str(p) for p in records_dir] if isinstance(records_dir, list) else [str(records_dir)]
    argv = ["--input", *inputs, "--out", str(out), "--model", str(model)]
    argv += ["--resolution", str(RESOLUTION), "--batch-size", "4", "--dtype", dtype, "--flip", *extra]
    return latents.main([*argv, "--runner", "DirectRunner"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic labelled records (2 shards), the tiny base of a tiny config, and its fp32 cache."""
    root = tmp_path_factory.mktemp("latents")
    examples = (synthetic.make_example(i, 48) for i in range(NUM_RECORDS))
    records.write_shards(examples, root / "records", "labelled", num_shards=2)
    workdir = root / "workdir"
    config = _config(root / "records", root / "cache_fp32")
    ensure_tiny_base(workdir / "tiny_base", unet=tiny_unet_config(config))
    counts = _cache(root / "records", root / "cache_fp32", workdir / "tiny_base", extra=["--normal"])
    return root, workdir, config, counts


def test_the_job_writes_every_record_and_its_settings(setup):
    root, workdir, _, counts = setup
    assert {k: counts[k] for k in ("read", "failed", "written", "shards", "shards_written")} == {
        "read": NUM_RECORDS,
        "failed": 0,
        "written": NUM_RECORDS,
        "shards": 2,
        "shards_written": 2,
    }
    cache = root / "cache_fp32"
    assert sorted(os.listdir(cache)) == [
        "latents-00000-of-00002.array_record",
        "latents-00001-of-00002.array_record",
        "latents.json",
        "uncond.npy",
    ]
    info = json.loads((cache / "latents.json").read_text())
    assert (info["resolution"], info["dtype"], info["flip"], info["maps"]) == (
        32,
        "fp32",
        True,
        ["image", "depth", "normal"],
    )
    example = latent_records.decode_latent_example(records.RecordReader(cache, decode=False)[0])
    assert example.key == synthetic.make_example(0, 48).key
    assert example.arrays["image_mean"].shape == tuple(info["latent_shape"]) == (RESOLUTION // 2, RESOLUTION // 2, 4)
    assert example.arrays["text"].shape == tuple(info["text_shape"])
    assert not np.allclose(example.arrays["depth_mean"], example.arrays["depth_flip_mean"])
    assert np.load(cache / "uncond.npy").shape == (1, *info["text_shape"])


def test_in_process_writes_the_same_shards_as_the_beam_job(setup, tmp_path):
    """``write_in_process`` (no Beam: the GPU benchmark host) encodes the same records into the same shards."""
    root, workdir, _, counts = setup
    config = latents.CacheConfig(str(workdir / "tiny_base"), RESOLUTION, 4, "fp32", flip=True, normal=True)
    items = latents.plan_work_items([str(root / "records")], str(tmp_path), config.prefix)
    got = latents.write_in_process(items, latents.LatentEncoder(config), config)
    assert {k: got[k] for k in ("read", "failed", "written", "shards_written")} == {
        k: counts[k] for k in ("read", "failed", "written", "shards_written")
    }
    for item in items:
        name = os.path.basename(item.out)
        assert (tmp_path / name).read_bytes() == (root / "cache_fp32" / name).read_bytes(), name


def _loss_inputs(m):
    return m.trainable, m.frozen, m.vae_state, m.text_state


def test_cached_loss_equals_in_step_encoding_and_training_reads_the_cache(setup):
    root, workdir, config, _ = setup
    trainer = Trainer(config, workdir)
    m, settings, key = trainer.models, trainer.loss_settings, jax.random.fold_in(jax.random.key(config.seed), 0)
    assert trainer.cached and all(not jax.tree.leaves(s) for s in trainer._encoder_states())
    pixel_config = dataclasses.replace(
        trainer.data_config, paths=str(root / "records"), tokenizer=m.tokenizer, crop_scale=(1.0, 1.0)
    )
    pixels = next(Loader(pixel_config))
    in_step = jax.jit(make_loss(m, settings))(*_loss_inputs(m), m.uncond_embedding(), _numeric(pixels), key)
    cached_fn = jax.jit(make_loss(m, settings, cached=True))
    by_dtype, batches = {}, {}
    for dtype in ("fp32", "bf16", "fp16"):
        cache = root / f"cache_{dtype}"
        if dtype != "fp32":
            _cache(root / "records", cache, workdir / "tiny_base", dtype)
        data = LatentLoader(dataclasses.replace(trainer.data_config, paths=str(cache)))
        batches[dtype] = batch = next(data)
        np.testing.assert_array_equal(batch["index"], pixels["index"])
        by_dtype[dtype] = cached_fn(*_loss_inputs(m), data.uncond, _numeric(batch), key)
    latent_errors = _latent_errors(m, key, pixels, batches)
    reference = float(in_step[0])
    diffs = {d: abs(float(loss[0]) - reference) for d, loss in by_dtype.items()}
    print(json.dumps({"in_step_loss": reference, "loss_abs_diff": diffs, "latent_max_abs_diff": latent_errors}))
    assert latent_errors["fp32"] < 1e-5 and 0 < latent_errors["fp16"] < latent_errors["bf16"] < 0.05
    for name in ("loss_rgb", "loss_dense"):
        np.testing.assert_allclose(by_dtype["fp32"][1][name], in_step[1][name], rtol=2e-6, atol=1e-7)
    assert 0 < diffs["bf16"] < 1e-2 * reference and diffs["fp16"] < 1e-3 * reference
    history = trainer.train()  # the sharded step from the cache: the same first-step loss
    np.testing.assert_allclose(history[0]["loss"], reference, rtol=1e-5)
    assert trainer.data.num_corrupt == 0


def _latent_errors(m, key, pixels, batches) -> dict[str, float]:
    """Max |x0 cached - x0 in-step| over both branches: the posterior samples the loss sees (same keys)."""
    vae, k = nnx.merge(m.vae_def, m.vae_state), _per_example_keys(key, pixels["index"], 9)
    in_step = [encode_latents(vae, pixels[name], k[:, j]) for j, name in enumerate(("image", "depth"))]
    errors = {}
    for dtype, batch in batches.items():
        cached = [
            sample_latents(DiagonalGaussian(batch[f"{n}_mean"], batch[f"{n}_logvar"]), k[:, j], vae.scaling_factor)
            for j, n in enumerate(("image", "depth"))
        ]
        errors[dtype] = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(cached, in_step, strict=True)
        )
    return errors


def _numeric(batch):
    return {k: v for k, v in batch.items() if v.dtype.kind in "biuf"}


def test_resume_after_a_killed_shard_and_a_damaged_input_shard(setup, tmp_path):
    root, workdir, _, _ = setup
    inputs = tmp_path / "records"
    shutil.copytree(root / "records", inputs)
    out = tmp_path / "cache"
    shutil.copytree(root / "cache_fp32", out)
    done = out / "latents-00000-of-00002.array_record"
    killed = out / "latents-00001-of-00002.array_record"
    temp = out / f".{killed.name}.tmp-deadbeef"  # what a worker killed while writing shard 1 leaves behind
    temp.mkdir()
    (temp / ".latents-00000.array_record.tmp-deadbeef").write_bytes(killed.read_bytes()[:100])
    killed.unlink()
    mtime = os.stat(done).st_mtime_ns
    counts = _cache(inputs, out, workdir / "tiny_base", extra=["--normal"])
    assert (counts["shards_skipped"], counts["shards_written"], counts["read"], counts["written"]) == (1, 1, 4, 4)
    assert os.stat(done).st_mtime_ns == mtime and len(records.RecordReader(out)) == NUM_RECORDS
    with pytest.raises(FileExistsError, match="other settings"):
        _cache(inputs, out, workdir / "tiny_base", "bf16")

    (inputs / "labelled-00000-of-00002.array_record").write_bytes(b"not an array record file")
    with records.ShardWriter(inputs / "extra", "labelled", num_shards=1) as writer:
        writer.write(synthetic.make_example(99, 48))
        writer.write(b"corrupt record bytes")
    counts = _cache([str(inputs / "labelled-*"), str(inputs / "extra")], tmp_path / "cache2", workdir / "tiny_base")
    assert {k: counts[k] for k in ("shards", "shards_failed", "shards_written", "read", "failed", "written")} == {
        "shards": 3,
        "shards_failed": 1,
        "shards_written": 2,
        "read": 6,
        "failed": 1,
        "written": 5,
    }


def test_bad_input_is_one_sentence(setup, tmp_path, capsys):
    _, workdir, _, _ = setup
    argv = ["--out", str(tmp_path / "out"), "--model", str(workdir / "tiny_base")]
    assert latents.cli(["--input", str(tmp_path / "missing"), *argv]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    pixel_base = tmp_path / "pixel_base"
    shutil.copytree(workdir / "tiny_base", pixel_base, ignore=shutil.ignore_patterns("vae"))
    records_dir = setup[0] / "records"
    assert latents.cli(["--input", str(records_dir), "--out", str(tmp_path / "o"), "--model", str(pixel_base)]) == 1
    assert "pixel-space" in capsys.readouterr().err


def test_a_corrupt_cached_record_is_counted_and_skipped(setup, tmp_path):
    root, _, _, _ = setup
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache_fp32", cache, ignore=shutil.ignore_patterns("*.array_record"))
    good = list(records.RecordReader(root / "cache_fp32", decode=False))
    example = latent_records.decode_latent_example(good[3])
    del example.arrays["text"]
    damaged = [*good[:2], b"\x00garbage", latent_records.encode_latent_example(example, "fp32"), *good[4:]]
    records.write_shards(damaged, cache, "latents", num_shards=1)
    config = LoaderConfig(paths=str(cache), resolution=RESOLUTION, batch_size=4, flip=True, corrupt_check_after=100)
    data = LatentLoader(config, process_index=0, process_count=1)
    batches = [next(data) for _ in range(2)]
    state = data.get_state()
    batches.append(next(data))  # 12 valid records: all of epoch 1 (6 valid) and part of epoch 2
    assert data.num_seen - data.num_corrupt == 12 and 2 <= data.num_corrupt <= 4
    resumed = LatentLoader(config, process_index=0, process_count=1)
    resumed.set_state(state)
    again = next(resumed)
    np.testing.assert_array_equal(again["index"], batches[2]["index"])
    np.testing.assert_array_equal(again["image_mean"], batches[2]["image_mean"])
    assert (resumed.num_seen, resumed.num_corrupt) == (data.num_seen, data.num_corrupt)
    resumed.close()
    assert all(batch["valid"].all() for batch in batches) and not {2, 3} & {int(i) for b in batches for i in b["index"]}
    data.close()
    held_out = LatentLoader(dataclasses.replace(config, training=False), process_index=0, process_count=1)
    first, second = next(held_out), next(held_out)
    assert list(first["valid"]) == [True, True, False, False] and second["valid"].all()
    strict = LatentLoader(dataclasses.replace(config, corrupt_check_after=4), process_index=0, process_count=1)
    with pytest.raises(TooManyCorruptRecordsError, match="corrupt"):
        [next(strict) for _ in range(3)]
    strict.close()
    held_out.close()
    with pytest.raises(ValueError, match="resolution"):
        LatentLoader(dataclasses.replace(config, resolution=64), process_index=0, process_count=1)
