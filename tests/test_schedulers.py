"""Schedules, samplers and guidance against diffusers, step by step."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from jointnet_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    cfg,
    load_schedule,
    make_sampler,
    rescale_guidance,
    timesteps,
    velocity,
)

SD21_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
DIFFUSERS = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
}
# diffusers' own numpy-2 DeprecationWarnings are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SHAPE = (2, 8, 8, 4)  # schedulers are elementwise, so diffusers happily takes NHWC too
# float32 agreement; relative too because Euler's sigma-space samples reach |x| ~ 40 (ulp ~ 4e-6).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _cfg(**overrides):
    return {**SD21_BASE, **overrides}


def _model(x, t, base):
    """Deterministic stand-in for the UNet: depends on both the input and the timestep."""
    return (0.9 * x + np.float32(0.3 * np.sin(float(t) / 50.0)) * base).astype(np.float32)


def _run_against_diffusers(kind, config, num_steps, monkeypatch, strength=1.0, eta=0.0, seed=0):
    schedule = NoiseSchedule.from_config(config)
    sampler = make_sampler(kind, schedule, num_steps, strength=strength, eta=eta)
    ref = DIFFUSERS[kind].from_config(config)
    ref.set_timesteps(num_steps)

    ref_ts, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=ref), num_steps, strength, "cpu"
    )
    assert n_run == sampler.num_steps
    np.testing.assert_array_equal(sampler.timesteps, ref_ts.numpy())
    assert sampler.timesteps.dtype == ref_ts.numpy().dtype

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    if strength < 1.0:
        x0 = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1])
        x = sampler.add_noise_at(jnp.asarray(x0), jnp.asarray(noise), 0)
    else:
        np.testing.assert_allclose(sampler.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
        x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
        x = jnp.asarray(noise) * sampler.init_noise_sigma
    np.testing.assert_allclose(np.asarray(x), x_ref.numpy(), **TOL)

    key = jax.random.key(seed)
    state = sampler.init_state(x)
    for i, t in enumerate(ref_ts):
        xin_ref = ref.scale_model_input(x_ref, t)
        xin = sampler.scale_model_input(x, i)
        np.testing.assert_allclose(np.asarray(xin), xin_ref.numpy(), **TOL)
        assert float(sampler.timestep_at(i)) == float(t)

        out_ref = torch.from_numpy(_model(xin_ref.numpy(), t, base))
        out = jnp.asarray(_model(np.asarray(xin), sampler.timesteps[i], base))
        step_key = jax.random.fold_in(key, i)
        kwargs = {}
        if sampler.stochastic:
            step_noise = torch.from_numpy(np.array(jax.random.normal(step_key, SHAPE, jnp.float32)))
            if kind == "ddim":
                kwargs = {"eta": eta, "variance_noise": step_noise}
            else:
                monkeypatch.setattr(
                    scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, _n=step_noise, **k: _n
                )
        x_ref = ref.step(out_ref, t, x_ref, **kwargs).prev_sample
        x, state = sampler.step(state, i, out, x, step_key if sampler.stochastic else None)
        np.testing.assert_allclose(np.asarray(x), x_ref.numpy(), **TOL, err_msg=f"{kind} step {i} (t={t})")
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize(
    ("kind", "num_steps"),
    [("ddim", 50), ("dpmpp_2m", 25), ("dpmpp_2m", 10), ("euler", 30), ("euler_ancestral", 20)],
)
def test_sd21_base_trajectory(kind, num_steps, monkeypatch):
    _run_against_diffusers(kind, SD21_BASE, num_steps, monkeypatch)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "euler", "euler_ancestral"])
def test_v_prediction(kind, monkeypatch):
    _run_against_diffusers(kind, _cfg(prediction_type="v_prediction"), 20, monkeypatch)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "euler", "euler_ancestral"])
def test_spacings(kind, spacing, monkeypatch):
    _run_against_diffusers(kind, _cfg(timestep_spacing=spacing), 15, monkeypatch)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "euler"])
def test_squaredcos_cap_v2(kind, monkeypatch):
    # Leading spacing: at t = 999 (alpha_bar ~ 1e-9) an epsilon model's x0 = (x - ...) / sqrt(a) explodes.
    config = _cfg(beta_schedule="squaredcos_cap_v2")
    _run_against_diffusers(kind, config, 12, monkeypatch)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
def test_rescale_betas_zero_snr(kind, monkeypatch):
    config = _cfg(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    _run_against_diffusers(kind, config, 20, monkeypatch)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "euler", "euler_ancestral"])
def test_strength(kind, monkeypatch):
    _run_against_diffusers(kind, SD21_BASE, 30, monkeypatch, strength=0.55)


def test_ddim_eta_and_clip_sample(monkeypatch):
    _run_against_diffusers("ddim", SD21_BASE, 25, monkeypatch, eta=0.7)
    config = {k: v for k, v in SD21_BASE.items() if k != "clip_sample"}  # diffusers DDIM default: clip
    _run_against_diffusers("ddim", config, 10, monkeypatch)


def test_missing_spacing_uses_class_default():
    config = {k: v for k, v in SD21_BASE.items() if k != "timestep_spacing"}
    schedule = NoiseSchedule.from_config(config)
    for kind in ["ddim", "dpmpp_2m", "euler"]:
        ref = DIFFUSERS[kind].from_config(config)
        ref.set_timesteps(20)
        np.testing.assert_array_equal(timesteps(schedule, 20, kind), ref.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_set_timesteps(spacing):
    config = _cfg(timestep_spacing=spacing)
    schedule = NoiseSchedule.from_config(config)
    for kind in ["ddim", "dpmpp_2m", "euler", "euler_ancestral"]:
        ref = DIFFUSERS[kind].from_config(config)
        for n in [1, 2, 3, 7, 10, 14, 15, 20, 25, 33, 50, 99, 100, 250, 1000]:
            ref.set_timesteps(n)
            ours = timesteps(schedule, n, kind)
            np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{kind} {spacing} n={n}")


def test_timesteps_for_strength():
    schedule = NoiseSchedule.from_config(SD21_BASE)
    ref = DDIMScheduler.from_config(SD21_BASE)
    for n, strength in [(50, 0.8), (50, 1.0), (30, 0.55), (7, 0.3), (10, 0.05), (10, 1.3)]:
        ref.set_timesteps(n)
        ref_ts, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            types.SimpleNamespace(scheduler=ref), n, strength, "cpu"
        )
        if strength * n >= 1:  # at least one step (else: the error below)
            np.testing.assert_array_equal(
                make_sampler("ddim", schedule, n, strength=strength).timesteps, ref_ts.numpy()
            )
    with pytest.raises(ValueError, match="no denoising step"):
        make_sampler("ddim", schedule, 10, strength=0.05)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_and_conversions(prediction_type):
    config = _cfg(prediction_type=prediction_type)
    schedule = NoiseSchedule.from_config(config)
    ref = DDIMScheduler.from_config(config)
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)

    rng = np.random.default_rng(1)
    x0, noise, out = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    t = np.array([3, 871], dtype=np.int64)
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    x_t = add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(x_t), ref.add_noise(tx0, tnoise, tt).numpy(), **TOL)
    v = velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), t)
    np.testing.assert_allclose(np.asarray(v), ref.get_velocity(tx0, tnoise, tt).numpy(), **TOL)

    # DDIM's step reports its x0 prediction: the sampler's own estimate must equal it.
    ref.set_timesteps(50)
    sampler = make_sampler("ddim", schedule, 50)
    for b in range(2):
        i = int(np.flatnonzero(sampler.timesteps == [1, 861][b])[0])  # step i runs at timestep ts[i]
        tb = int(sampler.timesteps[i])
        x0_ref = ref.step(torch.from_numpy(out[b : b + 1]), tb, torch.from_numpy(x0[b : b + 1])).pred_original_sample
        x0_hat = sampler.predict_x0(jnp.asarray(out[b : b + 1]), jnp.asarray(x0[b : b + 1]), i)
        np.testing.assert_allclose(np.asarray(x0_hat), x0_ref.numpy(), rtol=1e-5, atol=1e-4)


def test_guidance_rescale_matches_diffusers():
    rng = np.random.default_rng(2)
    uncond, cond = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    guided = cfg(jnp.asarray(uncond), jnp.asarray(cond), 7.5)
    np.testing.assert_allclose(np.asarray(guided), uncond + 7.5 * (cond - uncond), **TOL)
    for phi in [0.0, 0.7, 1.0]:
        ref = rescale_noise_cfg(torch.from_numpy(np.array(guided)), torch.from_numpy(cond), guidance_rescale=phi)
        ours = rescale_guidance(guided, jnp.asarray(cond), phi)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), **TOL)


@pytest.mark.parametrize(
    ("kind", "eta", "strength"),
    [
        ("ddim", 0.5, 1.0),
        ("dpmpp_2m", 0.0, 1.0),
        ("dpmpp_2m", 0.0, 0.6),
        ("euler", 0.0, 1.0),
        ("euler_ancestral", 0.0, 1.0),
    ],
)
def test_step_in_jitted_fori_loop(kind, eta, strength):
    schedule = NoiseSchedule.from_config(_cfg(prediction_type="v_prediction"))
    sampler = make_sampler(kind, schedule, 12, strength=strength, eta=eta)
    base = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32))
    key = jax.random.key(0)

    def body(i, carry):
        x, state = carry
        xin = sampler.scale_model_input(x, i)
        out = 0.1 * xin + jnp.sin(sampler.timestep_at(i).astype(jnp.float32) / 50.0) * base
        x0_clean = sampler.predict_x0(out, x, i)
        x, state = sampler.step(state, i, out, x, jax.random.fold_in(key, i))
        # RePaint-style replacement of one channel with the re-noised prediction (exercises add_noise_at).
        known = sampler.add_noise_at(x0_clean, base, i + 1)
        return x.at[..., :1].set(known[..., :1]), state

    x_init = sampler.add_noise_at(jnp.zeros(SHAPE), base, 0) if strength < 1 else base * sampler.init_noise_sigma

    @jax.jit
    def run(x):
        return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))[0]

    carry = (x_init, sampler.init_state(x_init))
    for i in range(sampler.num_steps):
        carry = body(i, carry)
    np.testing.assert_allclose(np.asarray(run(x_init)), np.asarray(carry[0]), rtol=1e-5, atol=1e-5)


def test_load_schedule(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_schedule(tmp_path)
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "trained_betas": None, **SD21_BASE}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    schedule = load_schedule(tmp_path)  # model root: falls back to the scheduler/ subfolder
    assert load_schedule(tmp_path / "scheduler").steps_offset == 1
    assert schedule.timestep_spacing == "leading" and not schedule.set_alpha_to_one
    for key, value in [
        ("beta_schedule", "cubic"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "middle"),
        ("thresholding", True),
    ]:
        with pytest.raises(ValueError, match=key):
            NoiseSchedule.from_config({**SD21_BASE, key: value})
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("pndm", schedule, 10)


def test_every_sampler_name_is_one_table():
    """Each accepted spelling (canonical names and aliases, any case) builds the same sampler as its
    canonical name; an unknown one is refused naming the accepted ones."""
    from jointnet_jax.diffusion import SAMPLER_NAMES, SAMPLERS, sampler_name

    schedule = NoiseSchedule.from_config(SD21_BASE)
    assert set(SAMPLERS) == {"ddim", "dpmpp_2m", "euler", "euler_ancestral"}
    for kind, aliases in SAMPLERS.items():
        for name in (kind, *aliases, kind.upper()):
            assert sampler_name(name) == kind
            assert make_sampler(name, schedule, 4) == make_sampler(kind, schedule, 4)
    assert {"dpmpp2m", "dpm++2m", "euler_a"} <= set(SAMPLER_NAMES)
    with pytest.raises(ValueError, match="unknown sampler 'plms'; expected one of ddim, dpmpp_2m, dpmpp2m"):
        make_sampler("plms", schedule, 4)
