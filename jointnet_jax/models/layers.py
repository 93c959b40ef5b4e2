"""Thin builders over flax.nnx layers with PyTorch's defaults.

Every model here is a port of a PyTorch model, so layer hyper-parameters (padding, norm epsilons, exact
two-pass variance) follow torch rather than flax defaults. Parameters are always float32; ``dtype`` is the
compute dtype.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.conv import conv_general_dilated

_ABSTRACT = contextvars.ContextVar("abstract_params", default=False)


@contextlib.contextmanager
def abstract_params():
    """Build models with shape-only parameters (``jax.ShapeDtypeStruct``): no memory, no init compute.

    Used to load checkpoints: the model is built abstractly, then filled tensor by tensor. (``nnx.eval_shape``
    does the same by tracing, but its per-layer RNG updates make tracing quadratic: ~80 s for a UNet.)
    """
    token = _ABSTRACT.set(True)
    try:
        yield
    finally:
        _ABSTRACT.reset(token)


def _shape_only(key, shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def init(default):
    """``default`` initialiser, or a shape-only one inside ``abstract_params()``."""
    return _shape_only if _ABSTRACT.get() else default


zeros = nnx.initializers.zeros


def conv(cin, cout, kernel=3, *, stride=1, padding=None, dtype=jnp.float32, rngs, zero_init=False):
    """A torch-style Conv2d in NHWC: symmetric padding (k-1)//2 unless ``padding`` is given. The convolution
    is :mod:`jointnet_jax.models.conv`'s (XLA's forward; on the CPU, a backward through dots for wide convs)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    kernel_init = zeros if zero_init else nnx.initializers.lecun_normal()
    kwargs = dict(kernel_init=init(kernel_init), bias_init=init(zeros))
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
        **kwargs,
    )


def linear(cin, cout, *, bias=True, dtype=jnp.float32, rngs):
    return nnx.Linear(
        cin,
        cout,
        use_bias=bias,
        dtype=dtype,
        kernel_init=init(nnx.initializers.lecun_normal()),
        bias_init=init(zeros),
        rngs=rngs,
    )


def group_norm(channels, groups, eps, *, dtype=jnp.float32, rngs):
    """torch.nn.GroupNorm: contiguous channel groups, statistics in float32, two-pass variance."""
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=init(nnx.initializers.ones),
        bias_init=init(zeros),
        rngs=rngs,
    )


def layer_norm(channels, eps=1e-5, *, dtype=jnp.float32, rngs):
    return nnx.LayerNorm(
        channels,
        epsilon=eps,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=init(nnx.initializers.ones),
        bias_init=init(zeros),
        rngs=rngs,
    )


def embed(num, features, *, dtype=jnp.float32, rngs):
    return nnx.Embed(num, features, dtype=dtype, embedding_init=init(nnx.initializers.normal(0.02)), rngs=rngs)
