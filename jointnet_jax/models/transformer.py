"""diffusers ``Transformer2DModel`` (SD's spatial transformer) and its ``BasicTransformerBlock``. NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.attention import Attention
from jointnet_jax.models.layers import conv, group_norm, layer_norm, linear


class GEGLU(nnx.Module):
    """``proj`` to twice the width, then value * GELU(gate) (exact erf GELU, as torch's default)."""

    def __init__(self, cin, cout, *, dtype=jnp.float32, rngs):
        self.proj = linear(cin, 2 * cout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net.0`` = GEGLU, ``net.1`` = dropout (no parameters), ``net.2`` = output projection."""

    def __init__(self, dim, *, mult=4, dtype=jnp.float32, rngs):
        inner = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner, dtype=dtype, rngs=rngs),
                nnx.Dropout(0.0),
                linear(inner, dim, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN self-attention, cross-attention over the text states, and a GEGLU feed-forward."""

    def __init__(self, dim, *, heads, head_dim, context_dim, upcast, dtype=jnp.float32, rngs):
        kw = dict(heads=heads, head_dim=head_dim, upcast=upcast, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, **kw)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, context_dim=context_dim, **kw)
        self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> transformer blocks over H*W tokens -> proj_out, plus a residual.

    ``linear_projection`` selects SD2's Linear proj_in/out; SD1 uses 1x1 convs (same maths, other weight
    layout, applied before the reshape to tokens).
    """

    def __init__(
        self,
        channels,
        *,
        heads,
        context_dim,
        groups,
        num_layers=1,
        linear_projection,
        upcast=False,
        dtype=jnp.float32,
        rngs,
    ):
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, groups, 1e-6, dtype=dtype, rngs=rngs)
        if linear_projection:
            self.proj_in = linear(channels, channels, dtype=dtype, rngs=rngs)
            self.proj_out = linear(channels, channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
            self.proj_out = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        block = dict(
            heads=heads,
            head_dim=channels // heads,
            context_dim=context_dim,
            upcast=upcast,
            dtype=dtype,
            rngs=rngs,
        )
        self.transformer_blocks = nnx.List([BasicTransformerBlock(channels, **block) for _ in range(num_layers)])

    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.reshape(b, h * w, c))
        else:
            y = self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, c))
        return y + x
