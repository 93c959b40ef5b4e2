"""The JointNet training loss (paper Eq. 1): eps-MSE of both branches at one shared timestep.

Randomness is drawn per example from ``fold_in(step_key, record index)``, so a batch's loss does not
depend on how the global batch is laid out over hosts and devices (one process x 8 devices gives the
same losses as two processes x 4 devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jointnet_jax.diffusion.schedule import NoiseSchedule, add_noise, training_target
from jointnet_jax.training.masks import conditioning, sample_masks


@dataclass(frozen=True)
class LossSettings:
    modality: str = "depth"
    text_drop: float = 0.15
    noise_offset: float = 0.05
    stage: int = 1


def _per_example_keys(key, index, n):
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), n))(index)


def _offset_noise(key, shape, offset):
    """N(0, 1) plus a per-channel constant of std ``offset`` (Lin et al. 2023 "noise offset")."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, shape)
    return noise + offset * jax.random.normal(k2, (1, 1, shape[-1]))


def encode_latents(codec, images, keys):
    """Posterior samples (one key per image) of a VAE or ``PixelSpace`` codec, scaled as the diffusion
    model sees them."""
    posterior = codec.encode(images)
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape))(keys, posterior.mean)
    return (posterior.mean + posterior.std * eps) * codec.scaling_factor


def joint_loss(model, codecs, text_encoder, schedule: NoiseSchedule, uncond, batch, key, s: LossSettings):
    """Returns (loss, metrics). ``codecs``: a VAE shared by both branches, or the (RGB, dense) pair
    (``pixel_space.branch_codecs``); ``uncond``: the empty prompt's embedding (1, L, D), used for text drop.
    Stage 0 trains the base text-to-image UNet ``model(x, t, text)`` on the RGB half alone, with the same
    per-example randomness as the RGB half of the later stages."""
    codecs = codecs if isinstance(codecs, tuple) else (codecs, codecs)
    k = _per_example_keys(key, batch["index"], 9)
    b = batch["image"].shape[0]
    x0 = encode_latents(codecs[0], batch["image"], k[:, 0])
    text = text_encoder(batch["input_ids"])
    drop = jax.vmap(lambda kk: jax.random.uniform(kk) < s.text_drop)(k[:, 2])
    text = jnp.where(drop[:, None, None], uncond.astype(text.dtype), text)
    t = jax.vmap(lambda kk: jax.random.randint(kk, (), 0, schedule.num_train_timesteps))(k[:, 3])
    eps_x = jax.vmap(lambda kk: _offset_noise(kk, x0.shape[1:], s.noise_offset))(k[:, 4])
    x_t = add_noise(schedule, x0, eps_x, t)
    valid = batch.get("valid", jnp.ones((b,), bool)).astype(jnp.float32)
    denom = jnp.maximum(valid.sum(), 1.0)

    def mse(pred, x0_, eps, t_):
        err = (pred.astype(jnp.float32) - training_target(schedule, x0_, eps, t_)) ** 2
        return (err.mean(axis=(1, 2, 3)) * valid).sum() / denom

    if s.stage == 0:
        loss_rgb = mse(model(x_t, t, text), x0, eps_x, t)
        return loss_rgb, {"loss_rgb": loss_rgb}
    y0 = encode_latents(codecs[1], batch[s.modality], k[:, 1])
    eps_y = jax.vmap(lambda kk: _offset_noise(kk, y0.shape[1:], s.noise_offset))(k[:, 5])
    y_t = add_noise(schedule, y0, eps_y, t)
    cond_x = cond_y = None
    if s.stage == 3:
        m_x, m_y = jax.vmap(lambda kk: sample_masks(kk, *x0.shape[1:3]))(k[:, 6])
        cond_x, cond_y = conditioning(m_x, x0), conditioning(m_y, y0)
    pred_x, pred_y = model(x_t, y_t, t, text, cond_x, cond_y)
    loss_rgb, loss_dense = mse(pred_x, x0, eps_x, t), mse(pred_y, y0, eps_y, t)
    return loss_rgb + loss_dense, {"loss_rgb": loss_rgb, "loss_dense": loss_dense}
