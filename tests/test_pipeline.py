"""Sampling pipelines: peer check against diffusers, the official step, tasks, reproducibility, compile counts."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jointnet_jax as jj
from jointnet_jax import sample, sharding
from jointnet_jax.diffusion.schedule import load_schedule
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.pipelines import loop
from tests.conftest import nhwc
from tests.tiny_sd import make_tiny_base

SIZE = 32  # pixels; latent 16x16 with the tiny VAE (factor 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def twin_from_base(base):
    """A JointNet built from the base UNet: exchange layers zero, so its RGB branch is the base model."""
    return jj.JointNet.from_unet(jj.load_unet(base / "unet"))


@pytest.fixture(scope="module")
def pipe(base, twin_from_base):
    return jj.Pipeline.from_pretrained(base, twin_from_base)


@pytest.fixture(scope="module")
def fixture_pipe(base, official):
    """The official tiny generation model on the tiny base (same text width)."""
    return jj.Pipeline.from_pretrained(base, official / "rgbd_finetune")


def _diffusers_pipeline(base, scheduler):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    cls = {"ddim": DDIMScheduler, "dpmpp2m": DPMSolverMultistepScheduler}[scheduler]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(base / "vae"),
            text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(base / "unet"),
            scheduler=cls.from_pretrained(base / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp2m"])
def test_generate_rgb_matches_diffusers_stable_diffusion(base, pipe, scheduler):
    """Peer check: with zero exchange layers the RGB branch is exactly SD, so the RGB output must equal
    diffusers' own StableDiffusionPipeline for the same initial latents, prompt and CFG 7.5."""
    noise = np.random.default_rng(0).standard_normal((1, SIZE // 2, SIZE // 2, 8), dtype=np.float32)
    ours = pipe.generate("a cat", steps=4, cfg=7.5, scheduler=scheduler, height=SIZE, width=SIZE, init_noise=noise)
    ref = _diffusers_pipeline(base, scheduler)(
        "a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=torch.from_numpy(noise[..., :4].transpose(0, 3, 1, 2).copy()),
        output_type="np",
    ).images
    assert ref.shape == ours["rgb"].shape
    np.testing.assert_allclose(ours["rgb"], ref, atol=1e-3, rtol=0)


def test_one_denoising_step_matches_official(base, official, fixture_pipe):
    """The loop's step on the official fixture: the two-branch eps equals the official ``denoiseV2`` and the
    update is the DDIM rule of the spec (x0 = (x - sqrt(1-a_t) eps)/sqrt(a_t), x' = sqrt(a') x0 + sqrt(1-a') eps)."""
    io = load_file(official / "io_gen.safetensors")
    sampler = fixture_pipe.sampler("ddim", 2)
    assert list(sampler.timesteps) == [501, 1] and int(io["scalar_t.timesteps"]) == 501
    x = np.concatenate([nhwc(io["scalar_t.rgb_latent"]), nhwc(io["scalar_t.depth_latent"])], axis=-1)
    text = jnp.asarray(io["scalar_t.encoder_hidden_states"])
    inputs = loop.LoopInputs(x=x, noise=x, known=None, generate=None, cond_rgb=None, cond_dense=None, text=text)

    @jax.jit
    def step(model, x):
        eps = loop.guided_eps(model, x, sampler.timestep_at(0), text, None, None, 1.0, 0.0, False)
        x_prev, _ = loop.loop_step(model, sampler, inputs, 1.0, 0.0, jax.random.key(0), False, 0, (x, ()))
        return eps, x_prev

    eps, x_prev = step(fixture_pipe.jointnet, jnp.asarray(x))
    np.testing.assert_allclose(eps, nhwc(io["scalar_t.noise_pred"]), atol=1e-4, rtol=0)
    acp = load_schedule(base / "scheduler").alphas_cumprod.astype(np.float64)
    a_t, a_prev = acp[501], acp[1]
    e = nhwc(io["scalar_t.noise_pred"]).astype(np.float64)
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    np.testing.assert_allclose(x_prev, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e, atol=1e-4, rtol=0)


@pytest.fixture
def record_steps(monkeypatch):
    """The latents after every step of the compiled loop, sent to the host by a callback. The loop is traced
    again with the recording step, and its cache is cleared afterwards so that no other test runs it."""
    seen = {}
    original = loop.loop_step

    def recording(*args, **kwargs):
        x, state = original(*args, **kwargs)
        jax.debug.callback(lambda i, x: seen.__setitem__(int(i), np.asarray(x)), args[7], x)  # args[7]: step i
        return x, state

    monkeypatch.setattr(loop, "loop_step", recording)
    loop.denoise.clear_cache()
    yield seen
    loop.denoise.clear_cache()


@pytest.fixture
def loop_inputs(monkeypatch):
    """The ``LoopInputs`` each pipeline run hands to the compiled loop."""
    seen = []
    original = loop.denoise

    def recording(graphdef, state, sampler, inputs, *args, **kwargs):
        seen.append(inputs)
        return original(graphdef, state, sampler, inputs, *args, **kwargs)

    monkeypatch.setattr(loop, "denoise", recording)
    return seen


def _known_latents(p, seed, rgb, dense_rgb):
    """The pipeline's known latents: one VAE batch [RGB inputs; dense inputs] from the seed's VAE key."""
    key_vae = jax.random.split(jax.random.key(seed), 3)[1]
    lat = np.asarray(p.encode_images(np.concatenate([rgb, dense_rgb]), key_vae))
    return lat[: len(rgb)], lat[len(rgb) :]


def test_depth_task_keeps_the_known_image_latents(fixture_pipe, record_steps):
    """Image -> depth with the fixture's non-zero exchange layers: at every step the RGB latent is the known
    latent re-noised to the next timestep, add_noise(known, eps, t) with the initial noise; after the last step
    it is the clean known latent; the depth is generated and depends on the image (through the exchange)."""
    rng = np.random.default_rng(1)
    image, other = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    noise = rng.standard_normal((2, SIZE // 2, SIZE // 2, 8), dtype=np.float32)
    out = fixture_pipe.depth(["a cat", "a dog"], image, steps=3, seed=3, init_noise=noise)
    assert out["rgb"].shape == (2, SIZE, SIZE, 3) and out["depth"].shape == (2, SIZE, SIZE)
    known, _ = _known_latents(fixture_pipe, 3, np.stack([image, image]), np.zeros((2, SIZE, SIZE, 3)))
    np.testing.assert_array_equal(out["latents"][..., :4], known)
    timesteps = fixture_pipe.sampler("ddim", 3).timesteps
    acp = fixture_pipe.schedule.alphas_cumprod.astype(np.float64)
    for i in range(2):  # after step i the known region is at timestep t_{i+1}
        a = acp[int(timesteps[i + 1])]
        renoised = np.sqrt(a) * known + np.sqrt(1 - a) * noise[..., :4]
        np.testing.assert_allclose(record_steps[i][..., :4], renoised, atol=1e-5, rtol=0)
        dense_if_kept = np.sqrt(a) * 0 + np.sqrt(1 - a) * noise[..., 4:]
        assert np.abs(record_steps[i][..., 4:] - dense_if_kept).max() > 1e-2  # the depth side is generated
    changed = fixture_pipe.depth(["a cat", "a dog"], other, steps=3, seed=3, init_noise=noise)
    assert np.abs(changed["latents"][..., 4:] - out["latents"][..., 4:]).max() > 1e-3  # conditioned on the image


def test_inpaint_with_masked_conditioning(base, official, loop_inputs):
    """The official inpainting model, batch 2 with a different mask per element, one of them off the latent grid:
    the masked-latent conditioning each branch receives is [latent mask | latent where kept], with the latent
    mask the nearest sample of the pixel mask (torch's F.interpolate, as the official pipeline), and each
    element's kept regions are pasted back exactly."""
    p = jj.Pipeline.from_pretrained(base, official / "rgbd_inpaint")
    rng = np.random.default_rng(2)
    image, depth = rng.uniform(size=(2, SIZE, SIZE, 3)), rng.uniform(size=(2, SIZE, SIZE))
    mask = np.zeros((2, SIZE, SIZE), np.float32)
    mask[0, :, SIZE // 2 :] = 1  # on the latent grid: the right half
    mask[1, 3:21, 5:28] = 1  # odd borders: off the 2-pixel latent grid
    depth_mask = 1 - mask
    depth_mask[1, :7] = 1
    out = p.inpaint(["a cat", "a dog"], image, depth, mask, depth_mask, steps=2, seed=0, strength=0.9)
    known_rgb, known_dense = _known_latents(p, 0, image, np.repeat(depth[..., None], 3, -1))

    def latent_mask(m):  # the official nearest interpolation, NCHW
        t = torch.nn.functional.interpolate(torch.from_numpy(m[:, None]), size=(SIZE // 2, SIZE // 2), mode="nearest")
        return t.numpy()[:, 0, :, :, None]

    lm_rgb, lm_dense = latent_mask(mask), latent_mask(depth_mask)
    assert not np.array_equal(lm_rgb[0], lm_rgb[1]) and 0 < lm_rgb[1].mean() < 1
    (inputs,) = loop_inputs
    np.testing.assert_array_equal(inputs.cond_rgb, np.concatenate([lm_rgb, (lm_rgb < 0.5) * known_rgb], -1))
    np.testing.assert_array_equal(inputs.cond_dense, np.concatenate([lm_dense, (lm_dense < 0.5) * known_dense], -1))
    np.testing.assert_array_equal(
        inputs.generate, np.concatenate([np.repeat(lm_rgb, 4, -1), np.repeat(lm_dense, 4, -1)], -1)
    )
    kept_rgb, kept_dense = (
        np.broadcast_to(lm_rgb == 0, known_rgb.shape),
        np.broadcast_to(lm_dense == 0, known_dense.shape),
    )
    np.testing.assert_array_equal(out["latents"][..., :4][kept_rgb], known_rgb[kept_rgb])
    np.testing.assert_array_equal(out["latents"][..., 4:][kept_dense], known_dense[kept_dense])
    assert np.abs(out["latents"][..., :4][~kept_rgb] - known_rgb[~kept_rgb]).max() > 1e-2  # repainted


def test_bad_inputs_give_clear_errors(pipe):
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate("a cat", steps=1, height=24, width=SIZE)
    with pytest.raises(ValueError, match=r"image input has shape \(16, 16, 3\)"):
        pipe.depth("a cat", image[:16, :16], steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"RGB mask has shape \(8, 8\)"):
        pipe.inpaint("a cat", image, image[..., 0], np.zeros((8, 8)), np.zeros((SIZE, SIZE)), steps=1)
    with pytest.raises(ValueError, match="no jointnet_masked_latent_conv"):
        pipe.depth("a cat", image, steps=1, masked_conditioning=True)
    with pytest.raises(ValueError, match="initial noise has shape"):
        pipe.generate("a cat", steps=1, height=SIZE, width=SIZE, init_noise=np.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match="NaN"):
        pipe.depth("a cat", image * np.nan, steps=1)


def test_loop_traces_the_model_once_whatever_the_step_count(pipe, monkeypatch):
    calls = []
    original = JointNet.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(JointNet, "__call__", counting)
    loop.denoise.clear_cache()
    kw = dict(height=SIZE, width=SIZE, cfg=2.0, progress=False)
    pipe.generate("a dog", steps=2, **kw)
    assert len(calls) == 1
    pipe.generate("a dog", steps=2, seed=5, **kw)  # same task, shape and steps: no new trace
    assert len(calls) == 1
    pipe.generate("a dog", steps=7, **kw)  # a new step count compiles once more, still one model trace
    assert len(calls) == 2


def test_cli_writes_outputs_and_is_reproducible(base, official, tmp_path):
    args = ["generate", "--base", str(base), "--model", str(official / "rgbd_finetune"), "--prompt", "a cat"]
    args += ["--prompt", "a dog", "--steps", "2", "--height", str(SIZE), "--width", str(SIZE)]
    assert sample.main([*args, "--seed", "7", "--out", str(tmp_path / "a")]) == 0
    assert sample.main([*args, "--seed", "7", "--repeats", "2", "--out", str(tmp_path / "b")]) == 0
    assert sample.main([*args, "--seed", "8", "--out", str(tmp_path / "c")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    expected = [
        f"{i:04d}{s}" for i in range(2) for s in (".json", ".npz", "_depth.png", "_depth_color.png", "_rgb.png")
    ]
    assert names == sorted(expected)
    for name in names:
        if name.endswith(".json"):
            continue  # records absolute output-independent settings; compared below
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "0000_rgb.png").read_bytes() != (tmp_path / "c" / "0000_rgb.png").read_bytes()
    meta = json.loads((tmp_path / "a" / "0001.json").read_text())
    assert meta["prompt"] == "a dog" and meta["settings"]["seed"] == 7 and meta["settings"]["steps"] == 2
    repeated = json.loads((tmp_path / "b" / "0001.json").read_text())["timings_s"]  # --repeats 2: the same outputs
    assert len(meta["timings_s"]["sample"]) == 1 and len(repeated["sample"]) == 2
    assert all(t > 0 for t in repeated["sample"]) and repeated["load"] > 0
    arrays = np.load(tmp_path / "a" / "0000.npz")
    assert arrays["rgb"].shape == (SIZE, SIZE, 3) and arrays["depth"].shape == (SIZE, SIZE)
    assert arrays["depth"].dtype == np.float32 and 0 <= arrays["depth"].min() <= arrays["depth"].max() <= 1


def test_cli_reports_bad_input(base, official, tmp_path, capsys):
    args = ["depth", "--base", str(base), "--model", str(official / "rgbd_finetune"), "--prompt", "x"]
    assert sample.main([*args, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_batch_is_data_parallel_over_local_devices(pipe):
    """8 samples are split over the 8 (fake) local devices; each sample equals its unsharded result."""
    assert jax.local_device_count() == 8
    x = jnp.zeros((8, 4, 4, 8))
    inputs = loop.LoopInputs(x=x, noise=x, known=None, generate=None, cond_rgb=None, cond_dense=None, text=x[:, 0])
    assert len(sharding.shard_batch(inputs, 8).x.sharding.device_set) == 8
    noise = np.random.default_rng(4).standard_normal((8, SIZE // 2, SIZE // 2, 8), dtype=np.float32)
    kw = dict(steps=2, height=SIZE, width=SIZE, progress=False)
    sharded = pipe.generate(["a cat"] * 8, init_noise=noise, **kw)
    single = pipe.generate(["a cat"] * 3, init_noise=noise[:3], **kw)  # 3 does not divide 8: one device
    np.testing.assert_allclose(sharded["latents"][:3], single["latents"], atol=1e-4, rtol=0)


def test_every_sampler_name_works_at_every_layer(pipe):
    """One table of sampler names (``diffusion.SAMPLERS``): each name the CLI accepts (``--sampler``, and the old
    ``--scheduler``) builds the same sampler through ``Pipeline.sampler`` and ``make_sampler``, and reaches the
    run through ``SampleSettings`` (``scheduler=`` still meaning ``sampler=``)."""
    from jointnet_jax.diffusion import SAMPLER_NAMES, make_sampler, sampler_name
    from jointnet_jax.pipelines.pipeline import _split_settings

    args = ["generate", "--base", "b", "--model", "m", "--prompt", "x", "--out", "o"]
    for name in SAMPLER_NAMES:
        for flag in ("--sampler", "--scheduler"):
            assert sample.build_parser().parse_args([*args, flag, name]).sampler == name
        assert (
            pipe.sampler(name, 4)
            == make_sampler(name, pipe.schedule, 4)
            == make_sampler(sampler_name(name), pipe.schedule, 4)
        )
        assert jj.SampleSettings(scheduler=name).sampler == name
        assert _split_settings(jj.SampleSettings(), {"scheduler": name})[0].sampler == name
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args([*args, "--sampler", "plms"])


def test_tasks_are_data_and_official_preset_names_are_aliases(pipe):
    """Each task's inputs, masks and strength rule come from its ``Task`` row; the official preset names map to
    the same rows; the branches are reachable by name."""
    from jointnet_jax.pipelines.tasks import ALIASES, TASKS, get_task

    assert get_task("rgb2j") is TASKS["depth"] and get_task("j2rgb") is TASKS["image"] and set(ALIASES) >= {"custom"}
    m_rgb, m_dense = TASKS["depth"].masks(2, 4, 4, {})
    assert not m_rgb.any() and m_dense.all()
    mask = np.zeros((4, 4))
    mask[:, 2:] = 1
    m_rgb, m_dense = TASKS["inpaint"].masks(1, 4, 4, {"mask": mask, "depth_mask": 1 - mask})
    np.testing.assert_array_equal(m_rgb[0], mask)
    np.testing.assert_array_equal(m_dense[0], 1 - mask)
    with pytest.raises(ValueError, match="task 'inpaint' needs an input RGB mask and depth mask"):
        pipe.inpaint("a cat", np.zeros((SIZE, SIZE, 3)), np.zeros((SIZE, SIZE)), None, None, steps=1)
    with pytest.raises(ValueError, match="refine is SDEdit"):
        pipe.run("both", "a cat", image=np.zeros((SIZE, SIZE, 3)), depth=np.zeros((SIZE, SIZE)), steps=1)
    with pytest.raises(ValueError, match="generate starts from noise"):
        pipe.generate("a cat", steps=1, strength=0.5)
    with pytest.raises(ValueError, match="unknown task 'depht'"):
        pipe.run("depht", "a cat")
    assert pipe.jointnet.rgb is pipe.jointnet.unet and pipe.jointnet.dense is pipe.jointnet.jointnet
