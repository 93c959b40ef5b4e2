"""The attention kernels agree with the plain einsum reference; the cuDNN choice avoids unsupported shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jointnet_jax.models.attention import _cudnn_supports, dot_product_attention


@pytest.mark.parametrize("n,m", [(64, 64), (600, 77), (1100, 1000), (2304, 2304)])
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_kernels_match_reference(n, m, impl):
    kq, kk, kv = jax.random.split(jax.random.key(n + m), 3)
    q = jax.random.normal(kq, (1, n, 2, 16))
    k, v = jax.random.normal(kk, (1, m, 2, 16)), jax.random.normal(kv, (1, m, 2, 16))
    ref = dot_product_attention(q, k, v, impl="reference")
    np.testing.assert_allclose(dot_product_attention(q, k, v, impl=impl), ref, atol=1e-5, rtol=0)


def test_cudnn_only_for_supported_shapes():
    x = lambda n, d, dt=jnp.bfloat16: jax.ShapeDtypeStruct((2, n, 5, d), dt)  # noqa: E731
    assert _cudnn_supports(x(4096, 64), x(4096, 64))
    assert not _cudnn_supports(x(4096, 64), x(77, 64))  # text cross-attention
    assert not _cudnn_supports(x(256, 4), x(256, 4))  # head dim not a multiple of 8
    assert not _cudnn_supports(x(4096, 64, jnp.float32), x(4096, 64, jnp.float32))


def _eqns(jaxpr):
    """Every equation of a jaxpr, recursing into the sub-jaxprs of scan, map, cond, pjit and custom_jvp."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def exp_dtypes(fn, *args) -> list:
    """The input dtypes of every ``exp`` in the traced program: where the softmax's exponentials run."""
    return [e.invars[0].aval.dtype for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "exp"]


@pytest.mark.parametrize("impl", ["blockwise", "xla", "reference"])
@pytest.mark.parametrize("m", [77, 1100])  # one key block (cross-attention) and an online softmax over blocks
def test_softmax_runs_in_float32_under_bfloat16(impl, m):
    """bf16 queries, keys and values: the logits' exponentials (and so the softmax) are float32, the output is
    bf16. A kernel that took the softmax in the input dtype would show bf16 ``exp`` here."""
    q = jnp.zeros((1, 600, 2, 16), jnp.bfloat16)
    k = v = jnp.zeros((1, m, 2, 16), jnp.bfloat16)
    dtypes = exp_dtypes(lambda q, k, v: dot_product_attention(q, k, v, impl=impl), q, k, v)
    assert dtypes and all(d == jnp.float32 for d in dtypes), dtypes
    assert dot_product_attention(q, k, v, impl=impl).dtype == jnp.bfloat16
