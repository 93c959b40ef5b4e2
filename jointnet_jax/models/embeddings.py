"""Sinusoidal timestep features and the timestep MLP, as in diffusers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.layers import linear


def timestep_features(t, dim, *, flip_sin_to_cos, freq_shift, max_period=10000.0):
    """diffusers ``get_timestep_embedding``: (B,) timesteps -> (B, dim) float32 features."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1`` -> SiLU -> ``linear_2``."""

    def __init__(self, cin, dim, *, dtype=jnp.float32, rngs):
        self.linear_1 = linear(cin, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
