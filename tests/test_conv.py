"""The project's convolution (models/conv.py) against ``jax.grad`` of XLA's plain convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jointnet_jax.models import conv as C
from jointnet_jax.models import layers

# (batch, height, width, C_in, C_out, kernel, stride, padding): the UNet's 3x3 and 1x1 convs, its stride-2
# downsampler, the VAE's asymmetric (0, 1) downsampler (padding given to the conv as 0 after a jnp.pad, and
# also as an explicit asymmetric pair), odd sizes, and a valid conv.
CASES = [
    (2, 9, 7, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 8, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (1, 8, 8, 4, 4, 3, 2, ((0, 1), (0, 1))),
    (1, 9, 9, 4, 4, 3, 2, ((0, 0), (0, 0))),
    (2, 5, 5, 3, 7, 1, 1, ((0, 0), (0, 0))),
    (1, 6, 7, 2, 3, 3, 1, ((0, 0), (0, 0))),
    (1, 5, 6, 2, 3, 3, 1, ((2, 0), (1, 2))),
]


def _plain(x, k, strides, padding):
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _data(case, dtype, seed=0):
    n, h, w, ci, co, kk, s, pad = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)), dtype)
    k = jnp.asarray(rng.standard_normal((kk, kk, ci, co)), dtype)
    dy = jnp.asarray(rng.standard_normal(_plain(x, k, (s, s), pad).shape), dtype)
    return x, k, dy, (s, s), pad


@pytest.mark.parametrize("forward", ["dot", "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"p{c[7]}")
def test_conv2d_equals_the_plain_conv_and_its_gradient(case, forward, monkeypatch):
    """Both forwards (the patches dot, XLA's conv) and the dot backward, against XLA's conv and jax's vjp."""
    monkeypatch.setattr(C, "DOT_FORWARD_MAX_ROWS", 1 << 30 if forward == "dot" else 0)
    x, k, dy, strides, pad = _data(case, jnp.float32)
    y_ours, vjp_ours = jax.vjp(lambda a, b: C.conv2d(a, b, strides, pad), x, k)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _plain(a, b, strides, pad), x, k)
    if forward == "xla":
        np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_ref))
    else:
        assert "convolution" not in jax.jit(lambda a, b: C.conv2d(a, b, strides, pad)).lower(x, k).as_text()
        np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(jax.jit(vjp_ours)(dy), vjp_ref(dy), strict=True):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bf16_gradients_keep_their_dtype_and_match_within_bf16_rounding():
    x, k, dy, strides, pad = _data(CASES[1], jnp.bfloat16, seed=1)
    assert C.conv2d(x, k, strides, pad).dtype == jnp.bfloat16
    ours = jax.jit(jax.grad(lambda a, b: jnp.sum(C.conv2d(a, b, strides, pad) * dy), (0, 1)))(x, k)
    f32 = [v.astype(jnp.float32) for v in (x, k, dy)]
    ref = jax.grad(lambda a, b: jnp.sum(_plain(a, b, strides, pad) * f32[2]), (0, 1))(*f32[:2])
    for o, r in zip(ours, ref, strict=True):
        assert o.dtype == jnp.bfloat16
        scale = float(jnp.abs(r).max())
        assert float(jnp.abs(o.astype(jnp.float32) - r).max()) <= 0.02 * scale


def test_composes_with_jit_vmap_and_remat():
    """The conv composes with the transformations the trainer uses (jit, remat) and with vmap."""
    x, k, dy, strides, pad = _data(CASES[0], jnp.float32)

    def loss(a, b):
        return jnp.sum(jax.checkpoint(lambda u: C.conv2d(u, b, strides, pad))(a) * dy)

    g = jax.jit(jax.grad(loss, (0, 1)))(x, k)
    ref = jax.grad(lambda a, b: jnp.sum(_plain(a, b, strides, pad) * dy), (0, 1))(x, k)
    for o, r in zip(g, ref, strict=True):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-5)
    batched = jax.vmap(lambda a: C.conv2d(a[None], k, strides, pad)[0])(x)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(_plain(x, k, strides, pad)), rtol=1e-6, atol=1e-5)


def _reverses(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(" reverse(")


def test_wide_layers_take_the_dot_backward_and_materialise_no_reversed_kernel():
    """The dispatch: a conv layer with >= DOT_BACKWARD_MIN_CHANNELS channels has no ``reverse`` in its
    compiled CPU gradient (XLA's own input gradient reverses the kernel); a narrow one keeps XLA's."""
    wide, narrow = C.DOT_BACKWARD_MIN_CHANNELS, 8
    counts = {}
    for name, ch in (("wide", wide), ("narrow", narrow)):
        layer = layers.conv(ch, ch, 3, rngs=nnx.Rngs(0))
        x = jnp.ones((1, 4, 4, ch))
        graphdef, params = nnx.split(layer)

        def loss(p, a, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p)(a) ** 2)

        counts[name] = _reverses(jax.grad(loss, (0, 1)), params, x)
        g = jax.grad(loss, (0, 1))(params, x)
        kernel, bias = params["kernel"][...], params["bias"][...]

        def ref_loss(kk, a, bias=bias):
            return jnp.sum((_plain(a, kk, (1, 1), ((1, 1), (1, 1))) + bias) ** 2)

        ref = jax.grad(ref_loss, (0, 1))(kernel, x)
        np.testing.assert_allclose(np.asarray(g[0]["kernel"][...]), np.asarray(ref[0]), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.asarray(g[1]), np.asarray(ref[1]), rtol=1e-4, atol=1e-3)
    assert counts["wide"] == 0
    assert counts["narrow"] > 0


def test_other_convolutions_are_handed_to_lax_unchanged():
    x = jnp.ones((1, 6, 6, 4))
    k = jnp.ones((3, 3, 2, 4))
    grouped = C.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    ref = jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    np.testing.assert_array_equal(np.asarray(grouped), np.asarray(ref))
