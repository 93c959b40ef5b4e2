"""The sampling CLI (``python -m jointnet_jax.sample``) against the Python API, task by task: prompts files,
negative prompts, initial noise, image->depth, depth->image, inpainting (plain and masked-input models),
bf16, normals, panorama inpainting, the tiling baselines and ``mesh``.

Models are built once per module: the tiny SD base of tests/tiny_sd.py and twins from a 2-level UNet (as in
tests/test_tiles.py), so one tile is 8 latent = 16 px. Every run uses the same canvas (16x32 px, one row of
two tiles), 2 steps and one seed, so the compiled loops are shared between the CLI and the API calls. The CLI
loads its pipeline with ``Pipeline.from_pretrained``; that call is memoised per (base, model, dtype,
modality) for this module, because building the modules costs seconds per call while what is tested here is
how the CLI maps its flags onto the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trimesh

import jointnet_jax as jj
from jointnet_jax import io_utils, mesh, sample
from jointnet_jax.pipelines import loop
from tests.tiny_sd import TEXT_DIM, make_tiny_base

TILE = 8  # latent pixels (the small UNet's sample_size); 16 px with the tiny VAE (factor 2)
H, W = 16, 32  # pixels: a one-row canvas two tiles wide, used by every run
LATENT = (H // 2, W // 2)
PROMPTS = ["a cat", "a dog"]
STEPS, SEED = 2, 3
API = dict(steps=STEPS, seed=SEED)
SMALL_UNET = dict(
    sample_size=TILE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=4,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders: the tiny SD base, a twin of the small UNet in the official layout, and that twin with a
    masked-latent conv whose weights are non-zero (so the masked conditioning changes the result)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sample_cli")
    base = make_tiny_base(root / "base")
    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_UNET).save_pretrained(root / "small_unet")
    jj.JointNet.from_unet(jj.load_unet(root / "small_unet")).save(root / "twin")
    masked = jj.load_jointnet(root / "twin")
    masked.add_masked_latent_conv()
    rng = np.random.default_rng(0)
    for branch in (masked.unet, masked.jointnet):
        conv = branch.jointnet_masked_latent_conv
        conv.kernel[...] = jnp.asarray(0.1 * rng.standard_normal(conv.kernel.shape), jnp.float32)
    masked.save(root / "masked")
    return {"base": base, "twin": root / "twin", "masked": root / "masked"}


@pytest.fixture(scope="module", autouse=True)
def loaded():
    """``Pipeline.from_pretrained`` memoised by its arguments for this module (CLI and API calls alike); yields
    the loaded pipelines by key."""
    original = jj.Pipeline.from_pretrained
    cache = {}

    def from_pretrained(base, model, *, dtype=jnp.float32, modality="depth", **kw):
        key = (str(Path(base).resolve()), str(Path(model).resolve()), jnp.dtype(dtype).name, modality)
        key += tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = original(base, model, dtype=dtype, modality=modality, **kw)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jj.Pipeline, "from_pretrained", from_pretrained)
        yield cache


@pytest.fixture(scope="module")
def pipe(models):
    return jj.Pipeline.from_pretrained(models["base"], models["twin"])


@pytest.fixture(scope="module")
def masked_pipe(models):
    return jj.Pipeline.from_pretrained(models["base"], models["masked"])


@pytest.fixture(scope="module")
def normal_pipe(models):
    return jj.Pipeline.from_pretrained(models["base"], models["twin"], modality="normal")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files on the canvas: RGB and 16-bit depth PNGs, the depth also as .npy, a 3-channel normal PNG,
    an RGB mask (repaint the right half) and a depth mask (repaint the left half); plus their read-back values."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    io_utils.write_png_rgb(d / "image.png", rng.uniform(size=(H, W, 3)))
    # Depth on the 16-bit grid, computed as read_depth does, so the PNG and the .npy hold the same floats.
    depth = rng.integers(0, 65536, size=(H, W)).astype(np.uint16).astype(np.float32) / 65535.0
    io_utils.write_png_depth16(d / "depth.png", depth)
    np.save(d / "depth.npy", depth)
    io_utils.write_png_rgb(d / "normal.png", rng.uniform(size=(H, W, 3)))
    mask = np.zeros((H, W), np.float32)
    mask[:, W // 2 :] = 1
    io_utils.write_png_rgb(d / "mask.png", np.repeat(mask[..., None], 3, -1))
    io_utils.write_png_rgb(d / "depth_mask.png", np.repeat(1 - mask[..., None], 3, -1))
    files = {k: d / f"{k}.png" for k in ("image", "depth", "normal", "mask", "depth_mask")}
    values = {
        "image": io_utils.read_image(files["image"]),
        "depth": io_utils.read_depth(files["depth"]),
        "normal": io_utils.read_image(files["normal"]),
        "mask": io_utils.read_mask(files["mask"]),
        "depth_mask": io_utils.read_mask(files["depth_mask"]),
    }
    np.testing.assert_array_equal(values["depth"], depth)
    return files | {"depth_npy": d / "depth.npy"}, values


def _cli(models, out, task, *extra, model="twin", prompts=PROMPTS) -> Path:
    args = [task, "--base", str(models["base"]), "--model", str(models[model]), "--steps", str(STEPS)]
    args += ["--seed", str(SEED), "--out", str(out), *extra]
    for p in prompts:
        args += ["--prompt", p]
    assert sample.main(args) == 0
    return Path(out)


def _npz(out, i=0) -> dict:
    with np.load(Path(out) / f"{i:04d}.npz") as f:
        return dict(f)


def _meta(out, i=0) -> dict:
    return json.loads((Path(out) / f"{i:04d}.json").read_text())


def _same(cli_out, api, keys=("rgb", "depth")):
    """Every sample of a CLI output folder equals the API result."""
    for i in range(len(api["rgb"])):
        arrays = _npz(cli_out, i)
        assert sorted(arrays) == sorted(keys)
        for k in keys:
            np.testing.assert_allclose(arrays[k], api[k][i], atol=1e-6, rtol=0, err_msg=f"{i}: {k}")


def _known_latents(pipe, rgb, dense):
    """The clean known latents of a run from its seed: the VAE posterior sample of [rgb; dense] drawn with the
    run key's second split (pipeline.run), as (rgb latent, dense latent), each (h, w, 4)."""
    key_vae = jax.random.split(jax.random.key(SEED), 3)[1]
    lat = np.asarray(pipe.encode_images(np.stack([rgb, dense]), key_vae))
    return lat[0], lat[1]


def _gray(depth):
    return np.repeat(depth[..., None], 3, -1)


GEN = ["--height", str(H), "--width", str(W)]


@pytest.fixture(scope="module")
def generated(models, tmp_path_factory):
    """The CLI's plain ``generate`` of the two prompts on the canvas (fp32, depth)."""
    return _cli(models, tmp_path_factory.mktemp("generated"), "generate", *GEN)


def test_prompts_file_and_negative_prompt(models, pipe, generated, tmp_path):
    """A prompts file gives byte-identical outputs to the same ``--prompt``s, and the same records but for
    their timings; a negative prompt changes the samples and equals the API's ``negative_prompt``."""
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    from_file = _cli(
        models, tmp_path / "file", "generate", *GEN, "--prompts-file", str(tmp_path / "prompts.txt"), prompts=()
    )
    names = sorted(p.name for p in generated.iterdir())
    assert names == sorted(p.name for p in from_file.iterdir()) and len(names) == 10
    untimed = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "timings_s"}  # noqa: E731
    for name in names:
        if name.endswith(".json"):
            assert untimed(from_file / name) == untimed(generated / name), name
        else:
            assert (from_file / name).read_bytes() == (generated / name).read_bytes(), name
    negative = _cli(models, tmp_path / "neg", "generate", *GEN, "--negative-prompt", "x")
    assert _meta(negative)["settings"]["negative_prompt"] == "x"
    for i in range(2):
        assert np.abs(_npz(negative, i)["rgb"] - _npz(generated, i)["rgb"]).max() > 1e-3
    _same(negative, pipe.generate(PROMPTS, height=H, width=W, negative_prompt="x", **API))


def test_init_noise_file(models, pipe, tmp_path, capsys):
    """``--init-noise``: equals the API with that array; with DDIM eta 0 the noise fixes the result whatever
    the seed; a wrong shape is one clear error line and exit 1."""
    noise = np.random.default_rng(5).standard_normal((2, *LATENT, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    a = _cli(models, tmp_path / "a", "generate", *GEN, "--init-noise", str(tmp_path / "noise.npy"))
    _same(a, pipe.generate(PROMPTS, height=H, width=W, init_noise=noise, **API))
    b = _cli(models, tmp_path / "b", "generate", *GEN, "--init-noise", str(tmp_path / "noise.npy"), "--seed", "9")
    assert _meta(b)["settings"]["seed"] == 9
    for i in range(2):
        for k in ("rgb", "depth"):
            np.testing.assert_array_equal(_npz(b, i)[k], _npz(a, i)[k])
    np.save(tmp_path / "wrong.npy", noise[:, :, : LATENT[1] // 2])
    capsys.readouterr()
    args = ["generate", "--base", str(models["base"]), "--model", str(models["twin"]), *GEN, "--out", str(tmp_path)]
    args += ["--prompt", "a cat", "--prompt", "a dog", "--init-noise", str(tmp_path / "wrong.npy")]
    assert sample.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: initial noise has shape (2, 8, 8, 8); this run needs (2, {LATENT[0]}, {LATENT[1]}, 8) (B, h, w, 8)"
    ]


def test_depth_task(models, pipe, inputs, tmp_path):
    """Image -> depth of one photo: its files named by the photo's stem, the .npy equals ``pipe.depth`` (run at
    the native processing size and resized back), the 16-bit PNG keeps the depth to 1/65535 and the colour
    preview is the Turbo map of it."""
    files, values = inputs
    out = _cli(models, tmp_path / "d", "depth", "--image", str(files["image"]), prompts=["a cat"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image.json", "image.npy", "image_depth.png", "image_depth_color.png"]
    api = pipe.depth(values["image"], prompt="a cat", **API)
    depth = np.load(out / "image.npy")
    np.testing.assert_allclose(depth, api["depth"], atol=1e-6, rtol=0)
    assert depth.shape == (H, W) and api["processing_size"] == (8, 16)
    assert io_utils.load_image_array(out / "image_depth.png").dtype == np.uint16
    np.testing.assert_allclose(io_utils.read_depth(out / "image_depth.png"), depth, atol=1 / 65535, rtol=0)
    preview = io_utils.read_image(out / "image_depth_color.png")
    np.testing.assert_allclose(preview, io_utils.turbo_colormap(depth), atol=0.5 / 255 + 1e-6, rtol=0)
    meta = json.loads((out / "image.json").read_text())
    assert meta["inputs"] == {"image": str(files["image"].resolve())} and meta["settings"]["cfg"] == 1.0


def test_image_task_from_png_and_npy_depth(models, pipe, inputs, tmp_path):
    """Depth -> image: a 16-bit PNG and a .npy of the same depth give the same samples, equal to
    ``pipe.image``; the depth side is kept, i.e. it is the VAE round trip of the input."""
    files, values = inputs
    png = _cli(models, tmp_path / "png", "image", "--depth", str(files["depth"]), prompts=["a cat"])
    npy = _cli(models, tmp_path / "npy", "image", "--depth", str(files["depth_npy"]), prompts=["a cat"])
    for k in ("rgb", "depth"):
        np.testing.assert_array_equal(_npz(png)[k], _npz(npy)[k])
    api = pipe.image("a cat", values["depth"], **API)
    _same(png, api)
    _, dense = _known_latents(pipe, np.zeros((H, W, 3), np.float32), _gray(values["depth"]))
    np.testing.assert_allclose(_npz(png)["depth"], pipe.decode_latents(dense[None])[0, ..., 0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(api["latents"][0, ..., 4:], dense)


def test_image_task_reads_8_bit_16_bit_and_grey_rgb_depth_pngs(models, pipe, tmp_path, capsys):
    """Depth PNGs as users save them: 8-bit grey (/255), 16-bit grey (/65535) and 8-bit RGB with equal channels
    (read as its one channel) each give ``pipe.image`` of the map read at its bit depth; an RGB PNG whose
    channels differ is refused with one sentence naming it, before any sampling."""
    from PIL import Image

    ramp = np.linspace(0, 1, H * W).reshape(H, W)
    files = {
        "grey8": (np.round(ramp * 255).astype(np.uint8), 255),
        "grey16": (np.round(ramp * 65535).astype(np.uint16), 65535),
        "rgb8": (np.repeat(np.round(ramp * 255).astype(np.uint8)[..., None], 3, -1), 255),
    }
    for name, (pixels, _) in files.items():
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    for name, (pixels, levels) in files.items():
        out = _cli(models, tmp_path / name, "image", "--depth", str(tmp_path / f"{name}.png"), prompts=["a cat"])
        expected = (pixels[..., 0] if pixels.ndim == 3 else pixels).astype(np.float32) / levels
        _same(out, pipe.image("a cat", expected, **API))
    colour = np.repeat(np.round(ramp * 255).astype(np.uint8)[..., None], 3, -1)
    colour[0, 0] = (10, 200, 30)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    capsys.readouterr()
    args = ["image", "--base", str(models["base"]), "--model", str(models["twin"]), "--prompt", "a cat"]
    assert sample.main([*args, "--depth", str(tmp_path / "colour.png"), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "colour.png") in err[0] and "channels differ" in err[0], err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_inpaint_task(models, pipe, inputs, tmp_path):
    """RGBD inpainting from PNG masks with SDEdit strength 0.9: equals ``pipe.inpaint``; outside each mask
    the latents are the known ones (from the seed's VAE sample), inside they are generated."""
    files, values = inputs
    flags = [f"--{k.replace('_', '-')}={files[k]}" for k in ("image", "depth", "mask", "depth_mask")]
    out = _cli(models, tmp_path / "i", "inpaint", *flags, "--strength", "0.9", prompts=["a cat"])
    v = values
    api = pipe.inpaint("a cat", v["image"], v["depth"], v["mask"], v["depth_mask"], strength=0.9, **API)
    _same(out, api)
    assert _meta(out)["settings"]["strength"] == 0.9
    rgb, dense = _known_latents(pipe, v["image"], _gray(v["depth"]))
    half = LATENT[1] // 2
    lat = api["latents"][0]
    np.testing.assert_array_equal(lat[:, :half, :4], rgb[:, :half])  # RGB kept on the left
    np.testing.assert_array_equal(lat[:, half:, 4:], dense[:, half:])  # depth kept on the right
    assert (
        np.abs(lat[:, half:, :4] - rgb[:, half:]).max() > 0.1
        and np.abs(lat[:, :half, 4:] - dense[:, :half]).max() > 0.1
    )


def test_masked_input_model(models, masked_pipe, pipe, generated, inputs, tmp_path, monkeypatch):
    """An inpainting (masked-input) model: ``inpaint`` conditions on the masked latents by default
    (``auto`` equals the API with it on) and ``off`` changes the result (equal to the API with it off).
    Plain ``generate`` works with all-ones masks and no masked latents, equals the API, and the
    conditioning matters (it differs from the same twin without the conv)."""
    files, v = inputs
    flags = [f"--{k.replace('_', '-')}={files[k]}" for k in ("image", "depth", "mask", "depth_mask")]
    flags += ["--strength", "0.9"]
    auto = _cli(models, tmp_path / "auto", "inpaint", *flags, model="masked", prompts=["a cat"])
    off = _cli(
        models, tmp_path / "off", "inpaint", *flags, "--masked-conditioning", "off", model="masked", prompts=["a cat"]
    )
    args = ("a cat", v["image"], v["depth"], v["mask"], v["depth_mask"])
    _same(auto, masked_pipe.inpaint(*args, strength=0.9, masked_conditioning=True, **API))
    _same(off, masked_pipe.inpaint(*args, strength=0.9, masked_conditioning=False, **API))
    assert np.abs(_npz(auto)["rgb"] - _npz(off)["rgb"]).max() > 1e-3

    seen = []
    denoise = loop.denoise
    monkeypatch.setattr(loop, "denoise", lambda *a, **k: seen.append(a[3]) or denoise(*a, **k))
    gen = _cli(models, tmp_path / "gen", "generate", *GEN, model="masked")
    (given,) = seen
    for cond in (given.cond_rgb, given.cond_dense):  # [mask | masked latent]: everything generated
        assert cond.shape == (2, *LATENT, 5)
        np.testing.assert_array_equal(cond[..., 0], 1)
        np.testing.assert_array_equal(cond[..., 1:], 0)
    _same(gen, masked_pipe.generate(PROMPTS, height=H, width=W, **API))
    assert np.abs(_npz(gen)["rgb"] - _npz(generated)["rgb"]).max() > 1e-3


def test_bf16(models, generated, tmp_path):
    """``--dtype bf16`` is recorded and really computes in bf16: close to fp32 but not bit-identical."""
    out = _cli(models, tmp_path / "bf16", "generate", *GEN, "--dtype", "bf16")
    assert _meta(out)["dtype"] == "bf16"
    for i in range(2):
        half, full = _npz(out, i), _npz(generated, i)
        for k in ("rgb", "depth"):
            assert not np.array_equal(half[k], full[k])
            np.testing.assert_allclose(half[k], full[k], atol=0.05, rtol=0)


def test_normal_modality(models, normal_pipe, generated, inputs, tmp_path):
    """``--modality normal``: ``generate`` writes normal files (no depth ones) with all 3 decoded channels,
    equal to the API; channel 0 is what the depth modality keeps from the same latents. ``image`` takes a
    3-channel normal PNG as its known input and keeps it (VAE round trip), equal to the API."""
    out = _cli(models, tmp_path / "gen", "generate", *GEN, "--modality", "normal")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i:04d}{s}" for i in range(2) for s in (".json", ".npz", "_normal.png", "_rgb.png"))
    _same(out, normal_pipe.generate(PROMPTS, height=H, width=W, **API), keys=("rgb", "normal"))
    for i in range(2):
        normal = _npz(out, i)["normal"]
        assert normal.shape == (H, W, 3) and np.abs(normal[..., 1] - normal[..., 0]).max() > 1e-3
        np.testing.assert_array_equal(normal[..., 0], _npz(generated, i)["depth"])
        png = io_utils.read_image(out / f"{i:04d}_normal.png")
        np.testing.assert_allclose(png, normal, atol=0.5 / 255 + 1e-6, rtol=0)
    assert _meta(out)["modality"] == "normal"

    files, values = inputs
    img = _cli(
        models, tmp_path / "img", "image", "--modality", "normal", "--depth", str(files["normal"]), prompts=["a cat"]
    )
    _same(img, normal_pipe.image("a cat", values["normal"], **API), keys=("rgb", "normal"))
    _, dense = _known_latents(normal_pipe, np.zeros((H, W, 3), np.float32), values["normal"])
    np.testing.assert_allclose(_npz(img)["normal"], normal_pipe.decode_latents(dense[None])[0], atol=1e-5, rtol=0)


def test_pano_inpaint_presets(models, pipe, inputs, tmp_path):
    """``pano-inpaint`` on a two-tile canvas: each preset equals the task it maps to, run tiled with the
    ``ours`` preset, and keeps its known side: rgb2j the image, j2rgb the depth, custom both outside the masks."""
    files, v = inputs
    tiling = pipe.native_tiling("ours")
    known_rgb, _ = _known_latents(pipe, v["image"], np.zeros((H, W, 3), np.float32))
    _, known_dense = _known_latents(pipe, np.zeros((H, W, 3), np.float32), _gray(v["depth"]))

    rgb2j = _cli(
        models,
        tmp_path / "rgb2j",
        "pano-inpaint",
        "--preset",
        "rgb2j",
        "--image",
        str(files["image"]),
        prompts=["a cat"],
    )
    api = pipe.run("depth", "a cat", image=v["image"], tiling=tiling, **API)
    _same(rgb2j, api)
    np.testing.assert_array_equal(api["latents"][0, ..., :4], known_rgb)
    np.testing.assert_allclose(_npz(rgb2j)["rgb"], pipe.decode_latents(known_rgb[None])[0], atol=1e-5, rtol=0)
    meta = _meta(rgb2j)
    assert meta["task"] == "pano-inpaint" and meta["tiling"]["stride"] == 4 and meta["tiling"]["random_offset"]

    j2rgb = _cli(
        models,
        tmp_path / "j2rgb",
        "pano-inpaint",
        "--preset",
        "j2rgb",
        "--depth",
        str(files["depth"]),
        prompts=["a cat"],
    )
    api = pipe.run("image", "a cat", depth=v["depth"], tiling=tiling, **API)
    _same(j2rgb, api)
    np.testing.assert_array_equal(api["latents"][0, ..., 4:], known_dense)
    np.testing.assert_allclose(
        _npz(j2rgb)["depth"], pipe.decode_latents(known_dense[None])[0, ..., 0], atol=1e-5, rtol=0
    )

    flags = [f"--{k.replace('_', '-')}={files[k]}" for k in ("image", "depth", "mask", "depth_mask")]
    custom = _cli(models, tmp_path / "custom", "pano-inpaint", "--preset", "custom", *flags, prompts=["a cat"])
    masks = dict(image=v["image"], depth=v["depth"], mask=v["mask"], depth_mask=v["depth_mask"])
    api = pipe.run("inpaint", "a cat", **masks, tiling=tiling, **API)
    _same(custom, api)
    rgb, dense = _known_latents(pipe, v["image"], _gray(v["depth"]))
    half = LATENT[1] // 2
    np.testing.assert_array_equal(api["latents"][0, :, :half, :4], rgb[:, :half])
    np.testing.assert_array_equal(api["latents"][0, :, half:, 4:], dense[:, half:])
    assert np.abs(api["latents"][0, :, half:, :4] - rgb[:, half:]).max() > 0.1


def test_panorama_tiling_baselines(models, pipe, tmp_path):
    """``--tiling none`` is plain non-tiled generation at the canvas size; ``multidiffusion`` differs from
    ``ours``, equals the API preset and records stride tile/8 and no random offset."""
    none = _cli(models, tmp_path / "none", "panorama", *GEN, "--tiling", "none")
    assert _meta(none)["tiling"] is None
    _same(none, pipe.generate(PROMPTS, height=H, width=W, **API))
    ours = _cli(models, tmp_path / "ours", "panorama", *GEN)
    md = _cli(models, tmp_path / "md", "panorama", *GEN, "--tiling", "multidiffusion")
    _same(md, pipe.panorama(PROMPTS, height=H, width=W, tiling="multidiffusion", **API))
    for i in range(2):
        assert np.abs(_npz(md, i)["rgb"] - _npz(ours, i)["rgb"]).max() > 1e-3
    tiling = _meta(md)["tiling"]
    assert tiling["tile"] == TILE and tiling["stride"] == TILE // 8 and tiling["random_offset"] is False
    assert tiling["ramp"] == 0 and tiling["full_view_fraction"] == 0
    ours_tiling = _meta(ours)["tiling"]
    assert ours_tiling["stride"] == TILE // 2 and ours_tiling["random_offset"] is True


def test_mesh(tmp_path, capsys):
    """``sample mesh`` to .glb and .ply: trimesh reads back one vertex per pixel, coloured by the RGB PNG, at
    the positions of ``mesh.panorama_to_mesh``; a missing input is exit 1 with one error line naming it."""
    h, w = 8, 16
    rng = np.random.default_rng(3)
    rgb_png, depth_png = tmp_path / "rgb.png", tmp_path / "depth.png"
    io_utils.write_png_rgb(rgb_png, rng.uniform(size=(h, w, 3)))
    io_utils.write_png_depth16(depth_png, rng.uniform(0.2, 1.0, size=(h, w)))
    ref = mesh.panorama_to_mesh(io_utils.read_image(rgb_png), io_utils.read_depth(depth_png))
    pixels = io_utils.load_image_array(rgb_png).reshape(-1, 3)
    for suffix in ("glb", "ply"):
        out = tmp_path / f"scene.{suffix}"
        assert sample.main(["mesh", "--rgb", str(rgb_png), "--depth", str(depth_png), "--out", str(out)]) == 0
        scene = trimesh.load(out, force="mesh", process=False)
        assert len(scene.vertices) == h * w and len(scene.faces) == len(ref.faces), suffix
        np.testing.assert_array_equal(scene.visual.vertex_colors[:, :3], pixels, err_msg=suffix)
        np.testing.assert_allclose(scene.vertices, ref.vertices, rtol=1e-5, atol=1e-6, err_msg=suffix)
    capsys.readouterr()
    missing = tmp_path / "missing.png"
    assert sample.main(["mesh", "--rgb", str(missing), "--depth", str(depth_png), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]
