"""The 2-D convolution every model layer uses: XLA's forward, and on the CPU a backward written as dots.

Why this exists: XLA's CPU backend computes a convolution's input gradient as another convolution with a
spatially reversed, transposed kernel that it materialises, one copy per 3x3 conv and step, all of them
scheduled early because they depend only on parameters (7.3 GB of copies and a quarter of the step time for
the SD2.1-shaped stage 1; benchmarks/RESULTS.md). Its kernel gradient is also 1.5-3x slower than PyTorch's at
the demo's sizes. The backward here uses the im2col identity instead, with no reversed kernel at all:

* kernel gradient: ``patches(x)^T @ dy``, one dot over (batch x positions) with ``9 * C_in`` rows;
* input gradient: ``dy @ K^T`` gives the gradient of every patch, and each of the ``kh * kw`` kernel taps
  is added back at its offset (``lax.pad`` with interior padding places a strided tap), which XLA fuses into
  one loop.

Both are dots, which XLA's CPU backend runs well, but they pay for wide convolutions only. Measured on this
project's 2-core CPU (``benchmarks/conv.py``, RESULTS.md, 2026-12-03), the input + kernel gradient of a 3x3
conv is 1.3-2.2x faster than XLA's at 320-1280 channels, level at 256, and slower at 64-128, where XLA's own
backward is good. So the dot path is taken when both channel counts are at least
``DOT_BACKWARD_MIN_CHANNELS``, and XLA's convolution otherwise (the demo's 32/64-channel pixel UNet keeps it).

The forward stays XLA's convolution, except for outputs of at most ``DOT_FORWARD_MAX_ROWS`` positions
(batch x height x width: the 8x8 and smaller levels), where one dot of the patches is 2.6x faster than
XLA's convolution at 1280 channels; from 32x32 on XLA's is as fast and needs no ``9 x`` patch buffer. The
frozen RGB branch of stage 1 asks for the input gradient alone: the unused kernel gradient is dead code that
XLA removes.

Narrower convolutions are XLA's, and the project compiles every program (``models/functional.jit``) so that
XLA runs them with its own CPU kernels rather than YNNPACK's, which are 1.2-3.4x slower here.

On GPU and TPU the backward is XLA's own (cuDNN / the TPU convolution emitter are good at it): the choice is
made at lowering by ``lax.platform_dependent``, so one traced program is right on every backend.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature and is handed to
``nnx.Conv(conv_general_dilated=...)``. It takes the custom path for what the models use (NHWC input, HWIO
kernel, no dilation, no feature groups, explicit padding) and hands anything else to ``lax`` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
DOT_BACKWARD_MIN_CHANNELS = 256
DOT_FORWARD_MAX_ROWS = 512


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _xla_conv(x, k, strides, padding, precision):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _taps(k):
    """(i, j) for every kernel tap, in the order of the patch channels."""
    return [(i, j) for i in range(k.shape[0]) for j in range(k.shape[1])]


def _patches(xp, k, strides, out_hw):
    """(N, Ho, Wo, kh*kw*C): the input window of every output position, tap-major like ``k.reshape``."""
    (sh, sw), (ho, wo) = strides, out_hw
    cols = [xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i, j in _taps(k)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _dot_backward(strides, padding, precision, x, k, dy):
    """(dx, dk) of ``_xla_conv`` through dots: see the module docstring."""
    (pt, pb), (pl, pr) = padding
    (sh, sw), (n, ho, wo, co) = strides, dy.shape
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    hp, wp, ci = xp.shape[1], xp.shape[2], x.shape[3]
    rows = dy.reshape(n * ho * wo, co)
    patches = _patches(xp, k, strides, (ho, wo)).reshape(n * ho * wo, -1)
    # Contractions over the shared axis, written as dot_general so that no transposed copy is asked for.
    dk = lax.dot_general(patches, rows, (((0,), (0,)), ((), ())), precision, preferred_element_type=jnp.float32)
    dpatches = lax.dot_general(rows, k.reshape(-1, co), (((1,), (1,)), ((), ())), precision).reshape(n, ho, wo, -1)
    zero = jnp.zeros((), dpatches.dtype)
    dxp = 0
    for t, (i, j) in enumerate(_taps(k)):
        tap = dpatches[..., t * ci : (t + 1) * ci]
        config = (
            (0, 0, 0),
            (i, hp - i - sh * (ho - 1) - 1, sh - 1),
            (j, wp - j - sw * (wo - 1) - 1, sw - 1),
            (0, 0, 0),
        )
        dxp = dxp + lax.pad(tap, zero, config)
    dx = dxp[:, pt : pt + x.shape[1], pl : pl + x.shape[2]]
    return dx.astype(x.dtype), dk.reshape(k.shape).astype(k.dtype)


def _xla_backward(strides, padding, precision, x, k, dy):
    _, vjp = jax.vjp(lambda a, b: _xla_conv(a, b, strides, padding, precision), x, k)
    return vjp(dy)


def _dot_forward(strides, padding, precision, x, k):
    """The convolution as one dot of the patches with the (kh*kw*C_in, C_out) kernel."""
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - k.shape[0]) // strides[0] + 1
    wo = (xp.shape[2] - k.shape[1]) // strides[1] + 1
    return jnp.dot(_patches(xp, k, strides, (ho, wo)), k.reshape(-1, k.shape[-1]), precision=precision)


def _forward(x, k, strides, padding, precision):
    """On the CPU a dot when the output has at most ``DOT_FORWARD_MAX_ROWS`` positions (batch x height x
    width), where XLA's convolution is slowest (weights read per position); XLA's convolution otherwise."""
    (pt, pb), (pl, pr) = padding
    rows = x.shape[0] * ((x.shape[1] + pt + pb - k.shape[0]) // strides[0] + 1)
    rows *= (x.shape[2] + pl + pr - k.shape[1]) // strides[1] + 1
    if rows > DOT_FORWARD_MAX_ROWS:
        return _xla_conv(x, k, strides, padding, precision)
    cpu = functools.partial(_dot_forward, strides, padding, precision)
    return lax.platform_dependent(x, k, cpu=cpu, default=lambda a, b: _xla_conv(a, b, strides, padding, precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, k, strides, padding, precision=None):
    """NHWC x HWIO convolution with explicit ``padding`` ((top, bottom), (left, right))."""
    return _forward(x, k, strides, padding, precision)


def _conv2d_fwd(x, k, strides, padding, precision):
    return _forward(x, k, strides, padding, precision), (x, k)


def _conv2d_bwd(strides, padding, precision, residuals, dy):
    x, k = residuals
    args = (strides, padding, precision)
    return lax.platform_dependent(
        x,
        k,
        dy,
        cpu=functools.partial(_dot_backward, *args),
        default=functools.partial(_xla_backward, *args),
    )


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _plain(strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count) -> bool:
    return (
        len(strides) == 2
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and batch_group_count == 1
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """``lax.conv_general_dilated``, with :func:`conv2d`'s backward for plain, wide NHWC convolutions."""
    plain = _plain(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count)
    wide = min(rhs.shape[-2:]) >= DOT_BACKWARD_MIN_CHANNELS
    if (
        wide
        and plain
        and _is_nhwc(dimension_numbers)
        and preferred_element_type is None
        and not kwargs.get("out_sharding")
    ):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
