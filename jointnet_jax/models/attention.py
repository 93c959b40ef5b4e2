"""Scaled dot-product attention and the diffusers ``Attention`` projection module.

The kernel goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU in half precision).
XLA's CPU implementation of that call is slow for long sequences (4096 tokens at a 64x64 latent: see
``benchmarks/RESULTS.md``), so on CPU long sequences are processed in query chunks, which keeps the
logits block in cache. Softmax is always computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.layers import linear

# Query-chunking pays off on CPU once the logits matrix stops fitting in cache.
_CPU_CHUNK_MIN_TOKENS = 2048
_CPU_QUERY_CHUNK = 512


def _reference_attention(q, k, v, scale, upcast):
    """Plain attention on (B, N, H, D) tensors with float32 logits and softmax."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _query_chunked_attention(q, k, v, scale, upcast, chunk):
    b, n, h, d = q.shape
    pad = (-n) % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qp.reshape(b, (n + pad) // chunk, chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qi: _reference_attention(qi, k, v, scale, upcast), qc)
    return out.swapaxes(0, 1).reshape(b, n + pad, h, d)[:, :n]


def dot_product_attention(q, k, v, *, upcast=False, impl="auto"):
    """Attention over (B, N, H, D) inputs.

    ``impl``: ``auto`` picks per backend; ``xla``/``cudnn`` force ``jax.nn.dot_product_attention``;
    ``chunked`` forces query-chunked attention; ``reference`` the plain einsum form.
    """
    scale = q.shape[-1] ** -0.5
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            impl = "chunked" if q.shape[1] >= _CPU_CHUNK_MIN_TOKENS else "reference"
        elif backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
            impl = "cudnn"
        else:
            impl = "xla"
    if impl == "chunked":
        return _query_chunked_attention(q, k, v, scale, upcast, _CPU_QUERY_CHUNK)
    if impl == "reference":
        return _reference_attention(q, k, v, scale, upcast)
    if impl in ("xla", "cudnn"):
        if upcast and impl == "xla":
            return _reference_attention(q, k, v, scale, upcast)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    raise ValueError(f"unknown attention implementation {impl!r}; use auto, xla, cudnn, chunked or reference")


class Attention(nnx.Module):
    """diffusers ``Attention``: to_q/to_k/to_v projections, multi-head attention, ``to_out.0``."""

    def __init__(
        self,
        query_dim,
        *,
        heads,
        head_dim,
        context_dim=None,
        qkv_bias=False,
        upcast=False,
        dtype=jnp.float32,
        rngs,
    ):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = linear(query_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(context_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(context_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([linear(inner, query_dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)
        out = dot_product_attention(q, k, v, upcast=self.upcast)
        return self.to_out[0](out.reshape(b, n, -1))
