"""ResnetBlock2D, Downsample2D and Upsample2D (diffusers), shared by the UNet and the VAE. NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jointnet_jax.models.layers import conv, group_norm, linear


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with an optional timestep bias and a 1x1 shortcut when widths differ."""

    def __init__(self, cin, cout, *, temb_channels, groups, eps, dtype=jnp.float32, rngs):
        self.norm1 = group_norm(cin, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        if temb_channels is not None:
            self.time_emb_proj = linear(temb_channels, cout, dtype=dtype, rngs=rngs)
        self.norm2 = group_norm(cout, groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        if cin != cout:
            self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's asymmetric (0, 1) padding; 1 is the UNet's."""

    def __init__(self, channels, *, padding=1, dtype=jnp.float32, rngs):
        self.padding = padding
        self.conv = conv(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x, size):
    """torch ``F.interpolate(mode='nearest')`` on NHWC: source index floor(i * in / out)."""
    (h, w), (oh, ow) = x.shape[1:3], size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.floor(np.arange(oh) * np.float32(h / oh)).astype(np.int32)
    cols = np.floor(np.arange(ow) * np.float32(w / ow)).astype(np.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest upsampling (2x, or to an explicit size as diffusers forwards for odd latents), then 3x3 conv."""

    def __init__(self, channels, *, dtype=jnp.float32, rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x, size=None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(nearest_resize(x, size))
