"""The UNet's down, mid and up blocks (diffusers CrossAttn*/plain variants in one class each).

A block with ``heads=None`` is the plain ``DownBlock2D``/``UpBlock2D``; otherwise it carries one
``Transformer2DModel`` after each resnet, exactly as the CrossAttn variants do. Parameter names
(``resnets.j``, ``attentions.j``, ``downsamplers.0``, ``upsamplers.0``) are diffusers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jointnet_jax.models.transformer import Transformer2DModel


@dataclass(frozen=True)
class BlockOptions:
    """What every block of one UNet shares."""

    temb_channels: int
    groups: int
    eps: float
    context_dim: int
    linear_projection: bool
    upcast_attention: bool
    dtype: object = jnp.float32


def _transformer(channels, heads, layers, o: BlockOptions, rngs):
    return Transformer2DModel(
        channels,
        heads=heads,
        context_dim=o.context_dim,
        groups=o.groups,
        num_layers=layers,
        linear_projection=o.linear_projection,
        upcast=o.upcast_attention,
        dtype=o.dtype,
        rngs=rngs,
    )


def _resnet(cin, cout, o: BlockOptions, rngs):
    return ResnetBlock2D(cin, cout, temb_channels=o.temb_channels, groups=o.groups, eps=o.eps, dtype=o.dtype, rngs=rngs)


class DownBlock(nnx.Module):
    def __init__(self, cin, cout, *, num_layers, heads, transformer_layers, add_downsample, o, rngs):
        self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, o, rngs) for i in range(num_layers)])
        if heads is not None:
            self.attentions = nnx.List(
                [_transformer(cout, heads, transformer_layers, o, rngs) for _ in range(num_layers)]
            )
        if add_downsample:
            self.downsamplers = nnx.List([Downsample2D(cout, padding=1, dtype=o.dtype, rngs=rngs)])

    def __call__(self, h, temb, context):
        """Returns the block output and the skip tensors it contributes, in order."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
            skips.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) pairs."""

    def __init__(self, channels, *, heads, transformer_layers, num_layers=1, o, rngs):
        self.resnets = nnx.List([_resnet(channels, channels, o, rngs) for _ in range(num_layers + 1)])
        self.attentions = nnx.List(
            [_transformer(channels, heads, transformer_layers, o, rngs) for _ in range(num_layers)]
        )

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            h = resnet(attn(h, context), temb)
        return h


class UpBlock(nnx.Module):
    def __init__(self, cin, prev_cout, cout, *, num_layers, heads, transformer_layers, add_upsample, o, rngs):
        resnets = []
        for i in range(num_layers):
            skip_channels = cin if i == num_layers - 1 else cout
            resnets.append(_resnet((prev_cout if i == 0 else cout) + skip_channels, cout, o, rngs))
        self.resnets = nnx.List(resnets)
        if heads is not None:
            self.attentions = nnx.List(
                [_transformer(cout, heads, transformer_layers, o, rngs) for _ in range(num_layers)]
            )
        if add_upsample:
            self.upsamplers = nnx.List([Upsample2D(cout, dtype=o.dtype, rngs=rngs)])

    def __call__(self, h, skips, temb, context, upsample_size=None):
        """Consumes ``skips`` from the end (last skip first), as diffusers pops them."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips[-1 - i]], axis=-1), temb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, upsample_size)
        return h
