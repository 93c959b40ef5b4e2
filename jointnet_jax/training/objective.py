"""The JointNet training loss (paper Eq. 1): eps-MSE of both branches at one shared timestep (and, for
evaluation, the RGB loss of the model's RGB marginal: ``LossSettings.marginal``).

Randomness is drawn per example from ``fold_in(step_key, record index)``, so a batch's loss does not
depend on how the global batch is laid out over hosts and devices (one process x 8 devices gives the
same losses as two processes x 4 devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jointnet_jax.diffusion.schedule import NoiseSchedule, add_noise, training_target
from jointnet_jax.models.vae import DiagonalGaussian
from jointnet_jax.training.masks import conditioning, sample_masks


@dataclass(frozen=True)
class LossSettings:
    modality: str = "depth"
    text_drop: float = 0.15
    noise_offset: float = 0.05
    masks: bool = False  # stage 3: per-example inpainting masks as masked-latent conditioning
    # Evaluation: also ``loss_rgb_marginal``, the RGB loss with the dense input replaced by its pure noise (it
    # carries no information about the scene, as at the last timestep), i.e. the model's RGB marginal.
    marginal: bool = False


def _per_example_keys(key, index, n):
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), n))(index)


def _offset_noise(key, shape, offset):
    """N(0, 1) plus a per-channel constant of std ``offset`` (Lin et al. 2023 "noise offset")."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, shape)
    return noise + offset * jax.random.normal(k2, (1, 1, shape[-1]))


def sample_latents(posterior: DiagonalGaussian, keys, scaling_factor):
    """Posterior samples (one key per example), scaled as the diffusion model sees them."""
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape))(keys, posterior.mean)
    return (posterior.mean + posterior.std * eps) * scaling_factor


def encode_latents(codec, images, keys):
    """Posterior samples (one key per image) of a VAE or ``PixelSpace`` codec, scaled as the diffusion
    model sees them."""
    return sample_latents(codec.encode(images), keys, codec.scaling_factor)


def denoise_branches(model, x_t: list, t, text, conds):
    """Every branch's prediction: the base UNet ``model(x, t, text)`` for one branch, else the two-branch
    ``model(x_rgb, x_dense, t, text, cond_rgb, cond_dense)``."""
    if len(x_t) == 1:
        return (model(x_t[0], t, text),)
    return model(*x_t, t, text, *(conds or (None, None)))


def joint_loss(model, codecs, text_encoder, schedule: NoiseSchedule, uncond, batch, key, s: LossSettings):
    """Returns (loss, metrics). ``codecs``: one codec per branch (``pixel_space.branch_codecs``), or a VAE
    shared by the two branches; ``uncond``: the empty prompt's embedding (1, L, D), used for text drop. One
    branch (``codecs`` of length 1) trains the base text-to-image UNet on the RGB data alone, with the same
    per-example randomness as the RGB branch of a two-branch model."""
    codecs = codecs if isinstance(codecs, tuple) else (codecs, codecs)
    k = _per_example_keys(key, batch["index"], 9)  # 0/1: posteriors, 2: text drop, 3: t, 4/5: noise, 6: masks
    data = (batch["image"], batch.get(s.modality))[: len(codecs)]
    x0 = [encode_latents(c, images, k[:, j]) for j, (c, images) in enumerate(zip(codecs, data, strict=True))]
    return _diffusion_loss(model, schedule, x0, text_encoder(batch["input_ids"]), uncond, batch, k, s)


def cached_loss(model, scaling_factor: float, branches: int, schedule, uncond, batch, key, s: LossSettings):
    """``joint_loss`` on a batch of the latent cache (``data.loader.LatentLoader``): the posteriors come from
    the cached moments (``{map}_mean``, ``{map}_logvar``) and are sampled with the same per-example keys as
    in-step encoding; the text embedding is the cached ``text``. ``branches``: 1 (the base UNet) or 2."""
    k = _per_example_keys(key, batch["index"], 9)
    names = ("image", s.modality)[:branches]
    posteriors = [DiagonalGaussian(batch[f"{n}_mean"], batch[f"{n}_logvar"]) for n in names]
    x0 = [sample_latents(p, k[:, j], scaling_factor) for j, p in enumerate(posteriors)]
    return _diffusion_loss(model, schedule, x0, batch["text"], uncond, batch, k, s)


def _diffusion_loss(model, schedule: NoiseSchedule, x0: list, text, uncond, batch, k, s: LossSettings):
    """The loss from the branches' clean latents ``x0`` and the caption embeddings ``text``; ``k`` are the
    per-example keys of ``joint_loss``."""
    drop = jax.vmap(lambda kk: jax.random.uniform(kk) < s.text_drop)(k[:, 2])
    text = jnp.where(drop[:, None, None], uncond.astype(text.dtype), text)
    t = jax.vmap(lambda kk: jax.random.randint(kk, (), 0, schedule.num_train_timesteps))(k[:, 3])
    eps = [
        jax.vmap(lambda kk, x=x: _offset_noise(kk, x.shape[1:], s.noise_offset))(k[:, 4 + j]) for j, x in enumerate(x0)
    ]
    x_t = [add_noise(schedule, x, e, t) for x, e in zip(x0, eps, strict=True)]
    conds = None
    if s.masks:
        masks = jax.vmap(lambda kk: sample_masks(kk, *x0[0].shape[1:3]))(k[:, 6])
        conds = tuple(conditioning(m, x) for m, x in zip(masks, x0, strict=True))
    valid = batch.get("valid", jnp.ones((x0[0].shape[0],), bool)).astype(jnp.float32)

    def mse(pred, x, e):
        err = (pred.astype(jnp.float32) - training_target(schedule, x, e, t)) ** 2
        return (err.mean(axis=(1, 2, 3)) * valid).sum() / jnp.maximum(valid.sum(), 1.0)

    preds = denoise_branches(model, x_t, t, text, conds)
    losses = [mse(p, x, e) for p, x, e in zip(preds, x0, eps, strict=True)]
    metrics = dict(zip(("loss_rgb", "loss_dense")[: len(losses)], losses, strict=True))
    if s.marginal:  # one branch: the base model, whose RGB loss is its marginal
        marginal = preds if len(x_t) == 1 else denoise_branches(model, [x_t[0], eps[1]], t, text, conds)
        metrics["loss_rgb_marginal"] = mse(marginal[0], x0[0], eps[0])
    return sum(losses), metrics
