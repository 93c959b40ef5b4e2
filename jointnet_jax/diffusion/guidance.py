"""Classifier-free guidance (Ho & Salimans, 2022) and its rescaling (Lin et al., 2023, Sec. 3.4)."""

from __future__ import annotations

import jax.numpy as jnp


def cfg(eps_uncond: jnp.ndarray, eps_cond: jnp.ndarray, scale) -> jnp.ndarray:
    """eps_uncond + scale * (eps_cond - eps_uncond); works for any prediction type (eps or v)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_guidance(eps_cfg: jnp.ndarray, eps_cond: jnp.ndarray, guidance_rescale) -> jnp.ndarray:
    """Match the per-sample std of the guided prediction to the conditional one, to avoid over-exposure.

    Same as diffusers' ``rescale_noise_cfg``: unbiased std over all non-batch axes, then a
    ``guidance_rescale`` blend of the rescaled and the plain guided prediction (0 = no-op).
    """
    axes = tuple(range(1, eps_cond.ndim))
    std_cond = jnp.std(eps_cond, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(eps_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = eps_cfg * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * eps_cfg
