"""The training objective's conditioning dropout and noise, with stand-in models (no compile-heavy UNet)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jointnet_jax.diffusion.schedule import NoiseSchedule
from jointnet_jax.models.vae import DiagonalGaussian
from jointnet_jax.training.objective import LossSettings, joint_loss

B, H, L, D = 64, 4, 5, 3
SCHEDULE = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
VAE = SimpleNamespace(
    encode=lambda x: DiagonalGaussian(x[..., :1].repeat(4, -1), jnp.full(x.shape[:3] + (4,), -60.0)), scaling_factor=1.0
)
TEXT = lambda ids: jnp.ones((ids.shape[0], L, D))  # noqa: E731
UNCOND = jnp.zeros((1, L, D))
BATCH = {
    "image": jnp.zeros((B, H, H, 3)),
    "depth": jnp.zeros((B, H, H, 3)),
    "input_ids": jnp.zeros((B, L), jnp.int32),
    "index": jnp.arange(B),
}


def _run(settings, model):
    return jax.jit(lambda: joint_loss(model, VAE, TEXT, SCHEDULE, UNCOND, BATCH, jax.random.key(0), settings))()


def _observe(settings):
    """(caption kept per example, timestep per example) as the model saw them."""

    def run():
        seen = {}

        def model(x, y, t, text, cx, cy):
            seen.update(kept=text[:, 0, 0], t=t)
            return x * 0, y * 0

        joint_loss(model, VAE, TEXT, SCHEDULE, UNCOND, BATCH, jax.random.key(0), settings)
        return seen["kept"], seen["t"]

    return [np.asarray(a) for a in jax.jit(run)()]


def test_text_drop_uses_the_empty_prompt_at_the_configured_rate():
    assert np.all(_observe(LossSettings(text_drop=0.0))[0] == 1)
    assert np.all(_observe(LossSettings(text_drop=1.0))[0] == 0)
    kept, t = _observe(LossSettings(text_drop=0.5))
    assert 0.25 < kept.mean() < 0.75  # about half the examples keep their caption
    assert t.min() >= 0 and t.max() < 1000 and len(np.unique(t)) > B // 2  # uniform timesteps per example


def test_zero_prediction_loss_is_the_noise_energy_with_offset():
    """Clean latents are 0, so eps-MSE of a zero prediction is E[eps^2] = 1 + offset^2 per branch."""
    zero = lambda x, y, *_: (x * 0, y * 0)  # noqa: E731
    for offset in (0.0, 0.5):
        _, m = _run(LossSettings(noise_offset=offset), zero)
        for k in ("loss_rgb", "loss_dense"):
            np.testing.assert_allclose(float(m[k]), 1 + offset**2, rtol=0.15)


def test_v_prediction_loss_is_the_mse_against_velocity():
    """A ``v_prediction`` scheduler config makes the loss the MSE against v = sqrt(a) eps - sqrt(1 - a) x0,
    with eps recovered from the noised latents the model saw; the epsilon config (same keys, same x_t) gives
    the MSE against eps instead, which is a different number."""
    k_image, k_depth = jax.random.split(jax.random.key(3))
    batch = BATCH | {
        "image": jax.random.uniform(k_image, (B, H, H, 3), minval=-1, maxval=1),
        "depth": jax.random.uniform(k_depth, (B, H, H, 3), minval=-1, maxval=1),
    }
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

    def run(prediction_type):
        schedule = NoiseSchedule.from_config(config | {"prediction_type": prediction_type})

        def loss():
            seen = {}

            def model(x, y, t, *_):
                seen.update(x=x, y=y, t=t)
                return 0.5 * x, -0.5 * y

            _, metrics = joint_loss(model, VAE, TEXT, schedule, UNCOND, batch, jax.random.key(0), LossSettings())
            return metrics, seen

        metrics, seen = jax.jit(loss)()
        return {k: float(v) for k, v in metrics.items()}, {k: np.asarray(v, np.float64) for k, v in seen.items()}

    (v_loss, seen), (eps_loss, seen_eps) = run("v_prediction"), run("epsilon")
    for k in seen:
        np.testing.assert_array_equal(seen[k], seen_eps[k])
    a = SCHEDULE.alphas_cumprod.astype(np.float64)[seen["t"].astype(int)][:, None, None, None]
    for name, images, x_t, pred in (
        ("loss_rgb", batch["image"], seen["x"], 0.5 * seen["x"]),
        ("loss_dense", batch["depth"], seen["y"], -0.5 * seen["y"]),
    ):
        x0 = np.repeat(np.asarray(images, np.float64)[..., :1], 4, axis=-1)  # the stand-in VAE's latents
        eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
        v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
        np.testing.assert_allclose(v_loss[name], np.mean((pred - v) ** 2), rtol=1e-4)
        np.testing.assert_allclose(eps_loss[name], np.mean((pred - eps) ** 2), rtol=1e-4)
        assert abs(v_loss[name] - eps_loss[name]) > 0.1 * eps_loss[name]
