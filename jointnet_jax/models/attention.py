"""Scaled dot-product attention and the diffusers ``Attention`` projection module.

On GPU the kernel goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention in half precision).
XLA's CPU implementation of that call, and the plain einsum+softmax form, are slow for long sequences
(4096 tokens at a 64x64 latent: see ``benchmarks/RESULTS.md``). On CPU attention is therefore computed
block-wise in a head-major ``(B*H, N, D)`` layout: queries in blocks of ``_CPU_Q_BLOCK`` (``lax.map``), keys
in blocks of ``_CPU_K_BLOCK`` with an online (flash-style) softmax (``lax.scan``), so the logits block stays
in cache. Short key sequences (cross-attention over 77 text tokens) take one key block, i.e. an exact softmax.
Logits, softmax statistics and the output accumulator are always float32.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.layers import linear

# CPU block sizes (measured on the SD2.1 shapes, 2 cores, fp32; see benchmarks/RESULTS.md).
_CPU_Q_BLOCK = 512
_CPU_K_BLOCK = 512
# Below this many logits per (batch*head) group a single query block is used.
_CPU_MIN_Q_CHUNK_LOGITS = 1 << 20
# What ``impl="auto"`` resolves to inside ``auto_as`` (None: the backend's choice).
_AUTO = contextvars.ContextVar("jointnet_attention_auto", default=None)


@contextlib.contextmanager
def auto_as(impl: str):
    """Within it, ``impl="auto"`` resolves to ``impl`` when programs are traced. ``training/flops.py`` counts
    dots and convolutions, and cuDNN's fused attention is one opaque call to it: the trainer traces the step
    it counts with ``auto_as("xla")``, whose attention is plain dots of the same FLOPs. It acts when a
    function is traced: one that jax has already traced for the same shapes keeps its cached program."""
    token = _AUTO.set(impl)
    try:
        yield
    finally:
        _AUTO.reset(token)


def _reference_attention(q, k, v, scale, upcast):
    """Plain attention on (B, N, H, D) tensors with float32 logits and softmax."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _blockwise_attention(q, k, v, scale, upcast, q_block=_CPU_Q_BLOCK, k_block=_CPU_K_BLOCK):
    """(B, N, H, D) attention computed per query block with an online softmax over key blocks."""
    b, n, h, dq = q.shape
    m, dv = k.shape[1], v.shape[-1]
    g = b * h
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if q.dtype == jnp.float32:  # fold the scale into q (one multiply over N*D instead of N*M)
        q, logit_scale = q * jnp.asarray(scale, q.dtype), None
    else:
        logit_scale = scale
    qf = q.transpose(0, 2, 1, 3).reshape(g, n, dq)
    kf = k.transpose(0, 2, 1, 3).reshape(g, m, dq)
    vf = v.transpose(0, 2, 1, 3).reshape(g, m, dv)

    def logits(qi, ki):
        s = jnp.einsum("gqd,gkd->gqk", qi, ki, preferred_element_type=jnp.float32)
        return s if logit_scale is None else s * logit_scale

    def pv(p, vi):
        return jnp.einsum("gqk,gkd->gqd", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)

    kb = m if m <= k_block else k_block
    kpad = (-m) % kb
    if kpad:  # padded keys get -inf logits; every key block keeps at least one real key
        kf = jnp.pad(kf, ((0, 0), (0, kpad), (0, 0)))
        vf = jnp.pad(vf, ((0, 0), (0, kpad), (0, 0)))
    nkb = (m + kpad) // kb
    key_bias = jnp.where(jnp.arange(m + kpad) < m, 0.0, -jnp.inf).astype(jnp.float32).reshape(nkb, 1, 1, kb)

    if nkb == 1:

        def one(qi):
            s = logits(qi, kf)
            if kpad:
                s = s + key_bias[0]
            s = s - jnp.max(s, axis=-1, keepdims=True)
            e = jnp.exp(s)
            return pv(e, vf) / jnp.sum(e, axis=-1, keepdims=True)

    else:
        kblocks = kf.reshape(g, nkb, kb, dq).swapaxes(0, 1)
        vblocks = vf.reshape(g, nkb, kb, dv).swapaxes(0, 1)

        def one(qi):
            def body(carry, blk):
                acc, mx, denom = carry
                ki, vi, bias = blk
                s = logits(qi, ki)
                if kpad:
                    s = s + bias
                mnew = jnp.maximum(mx, jnp.max(s, axis=-1))
                corr = jnp.exp(mx - mnew)
                p = jnp.exp(s - mnew[..., None])
                denom = denom * corr + jnp.sum(p, axis=-1)
                acc = acc * corr[..., None] + pv(p, vi)
                return (acc, mnew, denom), None

            nq = qi.shape[1]
            init = (
                jnp.zeros((g, nq, dv), jnp.float32),
                jnp.full((g, nq), -jnp.inf, jnp.float32),
                jnp.zeros((g, nq), jnp.float32),
            )
            (acc, _, denom), _ = jax.lax.scan(body, init, (kblocks, vblocks, key_bias))
            return acc / denom[..., None]

    if n > q_block and n * (m + kpad) >= _CPU_MIN_Q_CHUNK_LOGITS:
        qpad = (-n) % q_block
        qp = jnp.pad(qf, ((0, 0), (0, qpad), (0, 0)))
        qc = qp.reshape(g, (n + qpad) // q_block, q_block, dq).swapaxes(0, 1)
        out = jax.lax.map(one, qc).swapaxes(0, 1).reshape(g, n + qpad, dv)[:, :n]
    else:
        out = one(qf)
    return out.astype(v.dtype).reshape(b, h, n, dv).transpose(0, 2, 1, 3)


def _cudnn_supports(q, k) -> bool:
    """cuDNN flash attention: half precision, head dim a multiple of 8 up to 128, and (for its backward pass)
    sequence lengths that tile evenly; the 77-token text cross-attention therefore stays on XLA (measured on
    an H100: "Unsupported sequence length Q 4096, KV 77" in the gradient)."""
    d, n, m = q.shape[-1], q.shape[1], k.shape[1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128 and n % 64 == 0 and m % 64 == 0


def dot_product_attention(q, k, v, *, upcast=False, impl="auto"):
    """Attention over (B, N, H, D) inputs.

    ``impl``: ``auto`` picks per backend (``blockwise`` on CPU); ``xla``/``cudnn`` force
    ``jax.nn.dot_product_attention``; ``blockwise`` the CPU flash-style kernel; ``reference`` the plain
    einsum form.
    """
    scale = q.shape[-1] ** -0.5
    if impl == "auto" and _AUTO.get() is not None:
        impl = _AUTO.get()
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            impl = "blockwise"
        elif backend == "gpu" and _cudnn_supports(q, k):
            impl = "cudnn"
        else:
            impl = "xla"
    if impl == "blockwise":
        return _blockwise_attention(q, k, v, scale, upcast)
    if impl == "reference":
        return _reference_attention(q, k, v, scale, upcast)
    if impl in ("xla", "cudnn"):
        if upcast and impl == "xla":
            return _reference_attention(q, k, v, scale, upcast)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    raise ValueError(f"unknown attention implementation {impl!r}; use auto, xla, cudnn, blockwise or reference")


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
