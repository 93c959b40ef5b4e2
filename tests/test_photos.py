"""Depth from photos (``pipelines/photos.py``, ``sample depth``): processing sizes, one compile per size,
ensembles, refinement of a given depth, normals, and a folder of mixed real-world files through the CLI.

The model is the 2-level twin of tests/test_sample_cli.py on the tiny SD base: VAE factor 2, size multiple 4,
native size 16 px. Runs use 2 steps and cfg 1, so the compiled loops are small and shared between tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jointnet_jax as jj
from jointnet_jax import io_utils, sample
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.pipelines import loop, photos
from tests.test_sample_cli import SMALL_UNET
from tests.tiny_sd import make_tiny_base

STEPS, SEED = 2, 3
API = dict(steps=STEPS, seed=SEED)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("photos")
    base = make_tiny_base(root / "base")
    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_UNET).save_pretrained(root / "small_unet")
    jj.JointNet.from_unet(jj.load_unet(root / "small_unet")).save(root / "twin")
    return {"base": base, "twin": root / "twin"}


@pytest.fixture(scope="module")
def pipe(models):
    return jj.Pipeline.from_pretrained(models["base"], models["twin"])


@pytest.fixture
def traces(monkeypatch):
    """How many times the loop traced the model from now on (one trace per compiled loop)."""
    calls = []
    original = JointNet.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(JointNet, "__call__", counting)
    loop.denoise.clear_cache()
    return calls


def _image(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=(*shape, 3)).astype(np.float32)


def test_processing_size():
    """Longest side to the resolution, each side rounded half up to the multiple (never below one)."""
    assert photos.processing_size((480, 640), 512, 64) == (384, 512)  # NYU
    assert photos.processing_size((375, 1242), 512, 64) == (128, 512)  # KITTI: 154.6 -> 128
    assert photos.processing_size((480, 640), 0, 64) == (512, 640)  # own size: 7.5 multiples -> 8
    assert photos.processing_size((10, 1000), 512, 64) == (64, 512)  # at least one multiple
    assert photos.processing_size((512, 512), 512, 64) == (512, 512)


def test_alignment_and_ensemble_on_known_cases():
    """fit_affine recovers a known scale and shift; samples that are affine maps of one map x, whose per-pixel
    median is x itself, all align onto x; identical samples have zero uncertainty; disagreeing ones do not."""
    x = np.random.default_rng(0).uniform(0.5, 1.0, (6, 7))
    assert photos.fit_affine(x, 3.0 * x + 0.2) == pytest.approx((3.0, 0.2))
    # For x in [0.5, 1]: 2x - 0.3 >= x >= 0.5x + 0.25, so the median of the three samples is x.
    merged, spread = photos.ensemble_depth(np.stack([2 * x - 0.3, x, 0.5 * x + 0.25]))
    np.testing.assert_allclose(merged, x, atol=1e-6)
    assert np.abs(spread).max() < 1e-6
    merged, spread = photos.ensemble_depth(np.stack([x, x, x]))
    np.testing.assert_array_equal(merged, x.astype(np.float32))
    assert (spread == 0).all()
    noisy = x + np.random.default_rng(1).normal(0, 0.05, x.shape)
    assert photos.ensemble_depth(np.stack([x, noisy]))[1].mean() > 1e-3
    normals, spread = photos.ensemble_normals(np.stack([_image((6, 7))] * 3))
    assert normals.shape == (6, 7, 3) and (spread == 0).all()


def test_one_sample_is_the_plain_depth_task_and_refinement_ends(pipe):
    """K = 1 at a native-size photo equals the fixed-size depth task bit for bit. With an initial depth,
    strength 1 is that same result, and strength 0 returns the initial depth through the VAE."""
    image, init = _image((16, 16)), np.random.default_rng(2).uniform(size=(16, 16)).astype(np.float32)
    plain = pipe.run("depth", "", image=image, cfg=1.0, progress=False, **API)["depth"][0]
    result = pipe.depth(image, **API)
    assert result["processing_size"] == (16, 16) and (result["uncertainty"] == 0).all()
    np.testing.assert_array_equal(result["depth"], plain)
    np.testing.assert_array_equal(pipe.depth(image, init_depth=init, strength=1.0, **API)["depth"], plain)
    import jax

    key_vae = jax.random.split(jax.random.key(SEED), 3)[1]
    latents = pipe.encode_images(np.stack([image, np.repeat(init[..., None], 3, -1)]), key_vae)
    round_trip = pipe.decode_latents(latents[1:])[0, ..., 0]
    np.testing.assert_allclose(pipe.depth(image, init_depth=init, strength=0.0, **API)["depth"], round_trip, atol=1e-6)


def test_mixed_sizes_compile_once_per_processing_size(pipe, traces):
    """Five photos of three processing sizes, two per batch (the third of a size padded): three compiles, and
    every result at its photo's own size; an ensemble of 2 gives a non-zero uncertainty map."""
    shapes = [(48, 64), (375, 1242), (24, 32), (480, 640), (64, 48)]  # -> (12,16), (4,16), (12,16)x2, (16,12)
    results = pipe.depth([_image(s, i) for i, s in enumerate(shapes)], batch_size=2, **API)
    assert [r["depth"].shape for r in results] == shapes
    assert [r["processing_size"] for r in results] == [(12, 16), (4, 16), (12, 16), (12, 16), (16, 12)]
    assert len(traces) == 3
    assert all(0 <= r["depth"].min() <= r["depth"].max() <= 1 for r in results)
    ensemble = pipe.depth(_image((64, 48), 4), ensemble=2, **API)
    assert ensemble["depth"].shape == (64, 48) and ensemble["uncertainty"].max() > 0


def _write_photos(folder):
    """The files users bring: a 640x480 JPEG, a 1242x375 PNG, a phone JPEG stored 640x480 with EXIF orientation
    6 (displayed 480 wide, 640 high), a greyscale JPEG, an RGBA PNG, a 16-bit PNG, a palette PNG, a CMYK JPEG,
    a WebP, a TIFF, and a truncated JPEG."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    folder.mkdir()
    Image.fromarray(rgb(480, 640)).save(folder / "nyu.jpg")
    Image.fromarray(rgb(375, 1242)).save(folder / "kitti.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb(480, 640)).save(folder / "phone.jpg", exif=exif)
    Image.fromarray(rgb(480, 640)[..., 0]).save(folder / "grey.jpg")
    Image.fromarray(np.concatenate([rgb(480, 640), rgb(480, 640)[..., :1]], -1), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, (375, 1242), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb(480, 640)).convert("P", palette=Image.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.fromarray(rgb(480, 640)).convert("CMYK").save(folder / "print.jpg")
    Image.fromarray(rgb(480, 640)).save(folder / "web.webp")
    Image.fromarray(rgb(480, 640)).save(folder / "scan.tif")
    (folder / "broken.jpg").write_bytes((folder / "nyu.jpg").read_bytes()[:2000])
    landscape = {name: (480, 640) for name in ("nyu", "grey", "alpha", "palette", "print", "web", "scan")}
    return landscape | {"kitti": (375, 1242), "deep": (375, 1242), "phone": (640, 480)}


def test_cli_folder_of_mixed_photos(models, pipe, tmp_path, traces, capsys):
    """One 16-bit depth PNG per readable photo at its displayed size, named by stem, with its preview, .npy and
    record; the truncated file is named in one sentence and the run exits 1 listing it; one compile per
    processing size; the phone photo (alone at its size) equals the API's result for it."""
    sizes = _write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    args = ["depth", "--base", str(models["base"]), "--model", str(models["twin"]), "--steps", str(STEPS)]
    args += ["--seed", str(SEED), "--image", str(tmp_path / "photos"), "--batch-size", "2", "--out", str(out)]
    capsys.readouterr()
    assert sample.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "broken.jpg" in err[0] and err[1].startswith("error: 1 of 11 photos failed (")
    assert len(traces) == 3  # (12, 16), (4, 16), (16, 12)
    expected = {f"{s}{suffix}" for s in sizes for suffix in ("_depth.png", "_depth_color.png", ".npy", ".json")}
    assert {p.name for p in out.iterdir()} == expected
    for stem, size in sizes.items():
        assert io_utils.load_image_array(out / f"{stem}_depth.png").dtype == np.uint16
        depth = np.load(out / f"{stem}.npy")
        assert depth.shape == size and depth.dtype == np.float32, stem
        np.testing.assert_allclose(io_utils.read_depth(out / f"{stem}_depth.png"), depth, atol=0.5 / 65535 + 1e-7)
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["input_size"] == list(size) and Path(record["input"]).stem == stem
    api = pipe.depth(io_utils.read_image(tmp_path / "photos" / "phone.jpg"), **API)
    np.testing.assert_allclose(np.load(out / "phone.npy"), api["depth"], atol=1e-6)


def test_cli_ensemble_and_refinement_of_a_given_depth(models, pipe, tmp_path):
    """``--ensemble 2`` writes the uncertainty map and equals the API; ``--init-depth DIR --strength 0`` returns
    each photo's given depth (found by stem) through the VAE, as the API does."""
    io_utils.write_png_rgb(tmp_path / "a.png", _image((64, 48), 4))
    (tmp_path / "init").mkdir()
    init = np.random.default_rng(3).uniform(size=(64, 48)).astype(np.float32)
    np.save(tmp_path / "init" / "a.npy", init)
    args = ["depth", "--base", str(models["base"]), "--model", str(models["twin"]), "--steps", str(STEPS)]
    args += ["--seed", str(SEED), "--image", str(tmp_path / "a.png")]
    assert sample.main([*args, "--ensemble", "2", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "a_uncertainty.png").is_file()
    api = pipe.depth(io_utils.read_image(tmp_path / "a.png"), ensemble=2, **API)
    np.testing.assert_allclose(np.load(tmp_path / "e" / "a.npy"), api["depth"], atol=1e-6)
    assert (
        sample.main([*args, "--init-depth", str(tmp_path / "init"), "--strength", "0", "--out", str(tmp_path / "r")])
        == 0
    )
    api = pipe.depth(io_utils.read_image(tmp_path / "a.png"), init_depth=init, strength=0.0, **API)
    np.testing.assert_allclose(np.load(tmp_path / "r" / "a.npy"), api["depth"], atol=1e-6)
    assert json.loads((tmp_path / "r" / "a.json").read_text())["inputs"]["init_depth"].endswith("init")


def test_normals_from_a_photo(models, tmp_path):
    """``--modality normal``: ``{stem}_normal.png`` and an HW3 ``{stem}.npy`` at the photo's size."""
    io_utils.write_png_rgb(tmp_path / "n.png", _image((20, 30), 5))
    args = ["depth", "--base", str(models["base"]), "--model", str(models["twin"]), "--steps", str(STEPS)]
    assert (
        sample.main([*args, "--image", str(tmp_path / "n.png"), "--modality", "normal", "--out", str(tmp_path / "o")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["n.json", "n.npy", "n_normal.png"]
    assert np.load(tmp_path / "o" / "n.npy").shape == (20, 30, 3)


def test_cli_refines_a_dpt_estimate(models, pipe, tmp_path):
    """``--init-depth-model``: the labelling job's DPT estimator predicts each photo's depth, which is then
    refined; at strength 0 the output is exactly that DPT depth through the VAE, as the API gives it."""
    import torch
    import transformers

    from jointnet_jax.data.depth_estimator import DepthEstimator, tiny_hybrid_config

    torch.manual_seed(0)
    dpt = transformers.DPTForDepthEstimation(tiny_hybrid_config(32))
    with torch.no_grad():  # a random head ends in a ReLU and barely varies: lift and spread its output
        dpt.head.head[-2].bias.fill_(0.5)
        dpt.head.head[-2].weight.mul_(300.0)
    dpt.save_pretrained(tmp_path / "dpt")
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dpt")
    io_utils.write_png_rgb(tmp_path / "a.png", _image((64, 48), 4))
    args = ["depth", "--base", str(models["base"]), "--model", str(models["twin"]), "--steps", str(STEPS)]
    args += ["--seed", str(SEED), "--image", str(tmp_path / "a.png"), "--init-depth-model", str(tmp_path / "dpt")]
    assert sample.main([*args, "--strength", "0", "--out", str(tmp_path / "o")]) == 0
    rgb8 = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    estimate = DepthEstimator.from_pretrained(str(tmp_path / "dpt"))([rgb8])[0][0]
    assert estimate.shape == (64, 48) and np.ptp(estimate) > 0.1
    api = pipe.depth(io_utils.read_image(tmp_path / "a.png"), init_depth=estimate, strength=0.0, **API)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "a.npy"), api["depth"], atol=1e-6)
