"""Thin builders over flax.nnx layers with PyTorch's defaults.

Every model here is a port of a PyTorch model, so layer hyper-parameters (padding, norm epsilons, exact
two-pass variance) follow torch rather than flax defaults. Parameters are always float32; ``dtype`` is the
compute dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

zeros = nnx.initializers.zeros


def conv(cin, cout, kernel=3, *, stride=1, padding=None, dtype=jnp.float32, rngs, zero_init=False):
    """A torch-style Conv2d in NHWC: symmetric padding (k-1)//2 unless ``padding`` is given."""
    pad = (kernel - 1) // 2 if padding is None else padding
    kwargs = dict(kernel_init=zeros, bias_init=zeros) if zero_init else {}
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def linear(cin, cout, *, bias=True, dtype=jnp.float32, rngs):
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, rngs=rngs)


def group_norm(channels, groups, eps, *, dtype=jnp.float32, rngs):
    """torch.nn.GroupNorm: contiguous channel groups, statistics in float32, two-pass variance."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


def layer_norm(channels, eps=1e-5, *, dtype=jnp.float32, rngs):
    return nnx.LayerNorm(channels, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)
