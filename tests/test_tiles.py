"""Tile-based generation: the tile schedule and weights, equivalence with non-tiled denoising, wrap, seeds,
batching, the panorama/refine CLI and bad input.

The twin here is built from a 2-level UNet (smaller than tests/tiny_sd.py's, on its VAE and text encoder)
so that the few compiled loops of this file stay fast on CPU: tile = 8 latent = 16 px (VAE factor 2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jointnet_jax as jj
from jointnet_jax import io_utils, sample
from jointnet_jax.pipelines import loop, tiles
from jointnet_jax.pipelines.tiles import TileGrid, Tiling
from tests.tiny_sd import TEXT_DIM, make_tiny_base

TILE = 8  # latent
PANO = dict(height=16, width=64)  # pixels: an 8x32 latent canvas, 4 tiles wide like 2048x512
WRAPPED = Tiling(TILE, 4, batch=3, wrap=True, random_offset=True, ramp=2, full_view_fraction=0.0)
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
def model_dirs(tmp_path_factory):
    """(tiny SD base, a twin from the small UNet saved in the official layout)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("tiles")
    base = make_tiny_base(root / "base")
    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_UNET).save_pretrained(root / "small_unet")
    jj.JointNet.from_unet(jj.load_unet(root / "small_unet")).save(root / "twin")
    return base, root / "twin"


@pytest.fixture(scope="module")
def pipe(model_dirs):
    return jj.Pipeline.from_pretrained(*model_dirs)


@pytest.fixture(scope="module")
def panoramas(pipe):
    """Wrapped panoramas of two prompts (one compiled loop): seed 0 twice, seed 1, and seed 0 from noise
    rolled by one stride."""
    noise = np.asarray(jax.random.normal(jax.random.key(9), (2, 8, 32, 8)))
    kw = dict(steps=2, progress=False, tiling=WRAPPED, **PANO)
    prompts = ["a cat", "a dog"]
    return {
        "a": pipe.panorama(prompts, seed=0, init_noise=noise, **kw),
        "b": pipe.panorama(prompts, seed=0, init_noise=noise, **kw),
        "c": pipe.panorama(prompts, seed=1, init_noise=noise, **kw),
        "rolled": pipe.panorama(prompts, seed=0, init_noise=np.roll(noise, WRAPPED.stride, axis=2), **kw),
    }


def _brute_force_count(grid, offset):
    """Per-pixel weight sum from the tile list, one tile at a time (numpy)."""
    rows, cols, on = (np.asarray(a).reshape(-1) for a in grid.tiles(jnp.asarray(offset)))
    count = np.zeros((grid.height, grid.width), np.float32)
    for r, c, o in zip(rows, cols, on, strict=True):
        count[r : r + TILE, (c + np.arange(TILE)) % grid.width] += o * grid.weight()
    return count


@pytest.mark.parametrize(
    "tiling,height,width",
    [
        (WRAPPED, 8, 32),
        (Tiling(TILE, 3, batch=4, random_offset=True, ramp=3), 13, 27),  # clamped shifted grid, both axes
        (Tiling(TILE, 8, batch=2, random_offset=False, ramp=0, full_view_fraction=0.4), 8, 20),
    ],
)
def test_aggregation_weights_cover_and_normalise(tiling, height, width):
    """The scattered weight sum equals the tile-by-tile sum at every pixel for several offsets (wrap or not),
    every pixel is covered, and averaging identical values gives them back exactly (weights normalise)."""
    grid = TileGrid(tiling, height, width)
    x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
    text = jnp.zeros((2, 1, 1))
    agg = jax.jit(lambda x, o, full: tiles.aggregate(grid, lambda x, *_: x, (x, None, None), text, o, full))
    full = jnp.bool_(True) if tiling.full_view_fraction else None
    for offset in [(0, 0), (1, 2), (tiling.stride - 1, tiling.stride - 1)]:
        value, count = agg(x, jnp.asarray(offset), full)
        expected = _brute_force_count(grid, offset) + (tiling.full_view_weight if full is not None else 0)
        np.testing.assert_allclose(count, expected, rtol=1e-6)
        assert count.min() > 0
        np.testing.assert_allclose(value / count[None, :, :, None], x, rtol=1e-5, atol=1e-6)
    if tiling is WRAPPED:  # stride = tile/2 with wrap: every column lies in exactly two tiles
        plain = TileGrid(Tiling(TILE, 4, wrap=True, random_offset=False, ramp=0, full_view_fraction=0), 8, 32)
        np.testing.assert_array_equal(_brute_force_count(plain, (0, 0)), 2.0)


def test_official_ramp_and_tile_counts():
    """Official weights min(x+0.5, 63.5-x, 8)/8 on columns only for one-row panoramas; tile counts."""
    grid = TileGrid(Tiling(), 64, 256)
    w = grid.weight()
    assert (
        np.allclose(w[0, :8], (np.arange(8) + 0.5) / 8) and np.allclose(w[:, 8:56], 1) and np.allclose(w[:, 0], w[0, 0])
    )
    assert grid.num_tiles == 8 and grid.num_batches == 1 and grid.full_view_last_step(50) == 20
    up = TileGrid(Tiling.preset("upsample", 64), 128, 512)  # official upsample: 3 x 15 tiles, ramps on both axes
    assert up.num_tiles == 45 and up.num_batches == 6 and up.full_view_last_step(50) is None
    assert np.allclose(up.weight()[0, 32], 0.0625)


def test_tiles_run_in_batches_with_one_model_trace():
    """All tiles of a step go through ceil(tiles / batch) iterations of one scan whose body traces the model
    once; the full view is one more trace, under a cond."""
    grid = TileGrid(WRAPPED, 8, 32)
    traces = []

    def eps_fn(x, *_):
        traces.append(x.shape)
        return x

    x = jnp.zeros((2, 8, 32, 8))
    jaxpr = jax.make_jaxpr(
        lambda x: tiles.tiled_eps(grid, eps_fn, (x, None, None), jnp.zeros((2, 1, 1)), jax.random.key(0))
    )(x)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert grid.num_tiles == 8 and grid.num_batches == math.ceil(8 / 3) == 3
    assert [e.params["length"] for e in scans] == [grid.num_batches]
    assert traces == [(WRAPPED.batch * 2, TILE, TILE, 8)]


def test_resized_full_view_is_identity_on_one_tile_and_differs_on_a_wider_canvas():
    """``full_view_resize``: on a one-tile canvas the resize is the identity, so both full-view forms agree;
    on a 1 x 4 canvas the full view sees a tile-sized input and changes the canvas eps."""
    text = jnp.zeros((2, 1, 1))

    def eps_fn(x, *_):  # depends on the whole view, like a model with attention
        return jnp.tanh(x) * (1 + x.mean(axis=(1, 2), keepdims=True))

    def run(width, resize):
        tiling = Tiling(TILE, 4, batch=3, ramp=2, full_view_fraction=0.5, full_view_resize=resize)
        x = jax.random.normal(jax.random.key(1), (2, TILE, width, 8))
        return tiles.tiled_eps(TileGrid(tiling, TILE, width), eps_fn, (x, None, None), text, key, jnp.bool_(True))

    key = jax.random.key(0)
    np.testing.assert_allclose(run(TILE, True), run(TILE, False), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(run(32, True) - run(32, False))).max() > 1e-2


def test_resized_full_view_panorama_sees_only_tile_sized_inputs_and_reproduces(pipe, monkeypatch):
    """Through the pipeline: with ``full_view_resize`` every model call (tiles and full view) is tile-sized
    (the full view would otherwise be the whole 8x32 canvas), and a seed reproduces the panorama."""
    seen = []
    guided_eps = loop.guided_eps
    monkeypatch.setattr(loop, "guided_eps", lambda model, x, *a: seen.append(x.shape) or guided_eps(model, x, *a))
    kw = dict(steps=2, progress=False, **PANO)
    resized = dataclasses.replace(WRAPPED, full_view_fraction=0.5, full_view_resize=True)
    a, b, c = (pipe.panorama("a cat", seed=s, tiling=resized, **kw)["latents"] for s in (0, 0, 1))
    assert seen == [(3, TILE, TILE, 8), (1, TILE, TILE, 8)]  # traced once: a tile batch, then the full view
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_tile_text_pairs_each_canvas_with_its_prompt():
    """Several canvases per run (the official panorama pipeline only works at batch 1): each tile of canvas b is
    guided by prompt b's embeddings."""
    b, grid = 2, TileGrid(WRAPPED, 8, 32)
    text = jnp.arange(2 * b, dtype=jnp.float32)[:, None, None]  # [uncond 0, 1; cond 2, 3]

    def eps_fn(x, _r, _d, text):  # a guided model's view: [x; x] meets text, keep the cond half's text id
        n = x.shape[0]
        return jnp.broadcast_to(text[n:, 0, 0][:, None, None, None], x.shape)

    eps = tiles.tiled_eps(grid, eps_fn, (jnp.zeros((b, 8, 32, 1)), None, None), text, jax.random.key(0))
    np.testing.assert_allclose(eps[..., 0], np.broadcast_to(np.array([2.0, 3.0])[:, None, None], (b, 8, 32)))


def test_one_tile_canvas_equals_non_tiled(pipe):
    """Untrained twin, constant weights: a canvas exactly one tile large gives the non-tiled result, with the
    full view active too (it sees the same canvas)."""
    tiling = Tiling(TILE, 4, batch=2, ramp=0, full_view_fraction=0.5)
    kw = dict(steps=2, height=16, width=16, seed=4, progress=False)
    whole = pipe.generate("a cat", **kw)
    tiled = pipe.run("generate", "a cat", tiling=tiling, **kw)
    np.testing.assert_allclose(tiled["latents"], whole["latents"], atol=2e-5, rtol=0)


def test_seed_fixes_offsets_and_panorama(pipe, panoramas, monkeypatch):
    """The grid offsets the compiled loop really uses, recorded from inside it, are the documented derivation
    from the seed (the run key's third split, folded with the step, then with stream 1, drawn in [0, stride)):
    the same for the same seed, different for another, so the seed fixes the panorama."""
    a, b, c = panoramas["a"], panoramas["b"], panoramas["c"]
    assert a["rgb"].shape == (2, 16, 64, 3) and a["depth"].shape == (2, 16, 64)
    np.testing.assert_array_equal(a["latents"], b["latents"])
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    assert not np.allclose(a["latents"], c["latents"])  # same noise, different seed: only the offsets differ

    seen = []
    offsets = TileGrid.offsets

    def recording(self, key):
        value = offsets(self, key)
        jax.debug.callback(lambda v: seen.append(tuple(int(x) for x in v)), value, ordered=True)
        return value

    monkeypatch.setattr(TileGrid, "offsets", recording)
    loop.denoise.clear_cache()  # retrace, so that the loop calls the recording version
    noise = np.asarray(jax.random.normal(jax.random.key(9), (2, 8, 32, 8)))  # as in the panoramas fixture
    kw = dict(steps=2, progress=False, tiling=WRAPPED, init_noise=noise, **PANO)
    recorded = []
    try:
        for seed in (0, 0, 1):
            seen.clear()
            latents = pipe.panorama(["a cat", "a dog"], seed=seed, **kw)["latents"]
            jax.effects_barrier()
            recorded.append((list(seen), latents))
    finally:
        monkeypatch.undo()
        loop.denoise.clear_cache()  # drop the recording trace

    def derived(seed):  # pipeline.run: key_loop = split(key(seed), 3)[2]; loop_step/tiled_eps: fold step, then 1
        key_loop = jax.random.split(jax.random.key(seed), 3)[2]
        keys = [jax.random.fold_in(jax.random.fold_in(key_loop, i), 1) for i in range(2)]
        return [tuple(int(x) for x in jax.random.randint(k, (2,), 0, WRAPPED.stride)) for k in keys]

    (s0, lat0), (s0_again, lat0_again), (s1, lat1) = recorded
    assert s0 == derived(0) and s0_again == derived(0) and s1 == derived(1)
    assert s0 != s1
    np.testing.assert_array_equal(lat0, a["latents"])  # the recorded runs are the fixture's runs
    np.testing.assert_array_equal(lat0_again, a["latents"])
    np.testing.assert_array_equal(lat1, c["latents"])


def test_wrap_is_seamless(panoramas):
    """With wrap, rolling the initial noise by a stride rolls the panorama: the seam is an ordinary column."""
    a, rolled = panoramas["a"]["latents"], panoramas["rolled"]["latents"]
    np.testing.assert_allclose(rolled, np.roll(a, WRAPPED.stride, axis=2), atol=2e-5, rtol=0)


def test_cli_panorama_then_refine(model_dirs, pipe, tmp_path):
    base, twin = model_dirs
    common = ["--base", str(base), "--model", str(twin), "--prompt", "a cat", "--prompt", "a dog", "--steps", "2"]
    pano = ["panorama", *common, "--height", "16", "--width", "64", "--wrap", "--stride", "4", "--tile-batch", "3"]
    pano += ["--ramp", "2", "--full-view-fraction", "0", "--full-view-resize", "--out", str(tmp_path / "pano")]
    assert sample.main(pano) == 0
    meta = (tmp_path / "pano" / "0001.json").read_text()
    assert '"wrap": true' in meta and '"full_view_resize": true' in meta and '"prompt": "a dog"' in meta
    assert io_utils.read_image(tmp_path / "pano" / "0000_rgb.png").shape == (16, 64, 3)
    refine = ["refine", "--base", str(base), "--model", str(twin), "--prompt", "a cat", "--steps", "5"]
    refine += ["--image", str(tmp_path / "pano" / "0000_rgb.png"), "--depth", str(tmp_path / "pano" / "0000_depth.png")]
    assert sample.main([*refine, "--preset", "depth", "--scale", "1", "--out", str(tmp_path / "ref")]) == 0
    assert np.load(tmp_path / "ref" / "0000.npz")["depth"].shape == (16, 64)
    meta = (tmp_path / "ref" / "0000.json").read_text()  # official upsample settings
    assert '"strength": 0.4' in meta and '"random_offset": false' in meta and '"full_view_fraction": 0.0' in meta
    # The CLI equals the API with the same settings (seed 0, strength 0.4, the upsample tiling).
    image = io_utils.read_image(tmp_path / "pano" / "0000_rgb.png")
    depth = io_utils.read_depth(tmp_path / "pano" / "0000_depth.png")
    api = pipe.refine("a cat", image, depth, preset="depth", scale=1, steps=5)
    refined = np.load(tmp_path / "ref" / "0000.npz")
    np.testing.assert_allclose(refined["rgb"], api["rgb"][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(refined["depth"], api["depth"][0], atol=1e-6, rtol=0)
    # Preset depth keeps the image: its RGB is the VAE round trip of the input (the seed's posterior sample of
    # [image; depth], pipeline.run), while the depth is regenerated, unlike the input and its round trip.
    key_vae = jax.random.split(jax.random.key(0), 3)[1]
    known = pipe.encode_images(np.stack([image, np.repeat(depth[..., None], 3, -1)]), key_vae)
    np.testing.assert_array_equal(api["latents"][0, ..., :4], np.asarray(known[0]))
    np.testing.assert_allclose(refined["rgb"], pipe.decode_latents(known[:1])[0], atol=1e-5, rtol=0)
    kept_depth = pipe.decode_latents(known[1:])[0, ..., 0]
    assert np.abs(refined["depth"] - depth).max() > 0.05 and np.abs(refined["depth"] - kept_depth).max() > 0.05


def test_bad_input_gives_clear_errors(pipe, model_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match="smaller than a tile"):
        pipe.panorama("a cat", steps=1, tiling=Tiling(16, 8), **PANO)
    with pytest.raises(ValueError, match="stride 12 must be between 1 and the tile size 8"):
        pipe.panorama("a cat", steps=1, tiling=Tiling(TILE, 12), **PANO)
    with pytest.raises(ValueError, match="multiple of 2 latent"):
        pipe.panorama("a cat", steps=1, tiling=Tiling(7, 4), **PANO)
    with pytest.raises(ValueError, match="unknown tiling mode"):
        pipe.panorama("a cat", steps=1, tiling="tiled")
    image, depth = np.zeros((16, 64, 3), np.float32), np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"depth input has shape \(8, 32\) but this run needs \(16, 64\)"):
        pipe.refine("a cat", image, depth, preset="image", scale=1)
    io_utils.write_png_depth16(tmp_path / "small_depth.png", depth)
    io_utils.write_png_rgb(tmp_path / "rgb.png", image)
    base, twin = model_dirs
    args = ["refine", "--base", str(base), "--model", str(twin), "--prompt", "x", "--preset", "image", "--scale", "1"]
    args += ["--image", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / "small_depth.png"), "--out", str(tmp_path)]
    assert sample.main(args) == 1
    assert "depth input has shape (8, 32)" in capsys.readouterr().err


def test_intra_lpips_averages_all_crop_pairs():
    """SyncDiffusion's protocol: non-overlapping height-sized crops (4 for 1:4), all 6 pairs averaged."""
    from jointnet_jax.evaluation.panorama import intra_lpips

    image = np.concatenate([np.full((4, 4, 3), v, np.float32) for v in (0.0, 0.1, 0.3, 0.6)], axis=1)
    pairs = []
    score = intra_lpips(image, lambda a, b: pairs.append(1) or abs(a.mean() - b.mean()))
    assert len(pairs) == 6 and score == pytest.approx((0.1 + 0.3 + 0.6 + 0.2 + 0.5 + 0.3) / 6)
    with pytest.raises(ValueError, match="twice as wide"):
        intra_lpips(image[:, :6], lambda a, b: 0.0)


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calls torchvision's old API
def test_intra_lpips_with_the_lpips_package(tmp_path):
    """Real LPIPS (random AlexNet, non-negative heads as trained LPIPS keeps them) through intra_lpips: one
    repeated crop scores 0, varied crops more; crops under AlexNet's 31 px give a clear error, not a crash."""
    from jointnet_jax.evaluation.panorama import intra_lpips, lpips_distance, write_random_lpips_weights

    write_random_lpips_weights(tmp_path / "alex.pth")
    distance = lpips_distance(tmp_path / "alex.pth")
    crop = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    assert intra_lpips(np.tile(crop, (1, 4, 1)), distance) == 0.0
    assert intra_lpips(np.concatenate([crop, crop[::-1], crop[:, ::-1], 1 - crop], axis=1), distance) > 0.0
    with pytest.raises(ValueError, match=r"LPIPS \(alex\) needs crops of at least 31 px; these are 16x16"):
        intra_lpips(np.tile(crop[:16, :16], (1, 4, 1)), distance)
