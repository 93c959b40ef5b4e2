"""The analytic FLOP count (training/flops.py) against XLA's CPU cost analysis, which counts convolutions.

Gradients are taken of losses with a random target (or ``jax.vjp`` with a random cotangent): a constant
cotangent, as from ``jnp.sum(f(x))``, lets XLA turn dots into reductions, and its count is then no check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.extend.core import jaxpr_as_fun

from jointnet_jax.diffusion.schedule import NoiseSchedule
from jointnet_jax.models import conv as C
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.tiny import SCHEDULER, UNET, UNET_2LEVEL
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.training.flops import count_flops, dce_jaxpr, jaxpr_flops
from jointnet_jax.training.objective import LossSettings, cached_loss
from jointnet_jax.training.partition import split_trainable

NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _random(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize(
    "spec, lhs, rhs",
    [("bij,bjk->bik", (3, 5, 7), (3, 7, 4)), ("bxy,byzc->bcxz", (2, 3, 5), (2, 5, 4, 6)), ("ij,j->i", (6, 5), (5,))],
)
def test_a_dot_is_counted_as_xla_does(spec, lhs, rhs):
    fn = functools.partial(jnp.einsum, spec)
    args = _random(*lhs), _random(*rhs, seed=1)
    assert count_flops(fn, *args) == pytest.approx(_xla_flops(fn, *args), rel=1e-6)


# (input NHWC, kernel HWIO, conv keywords): padded 'SAME' and 'VALID', strided, asymmetric (the VAE's (0, 1)
# downsampler), feature groups, kernel dilation, input dilation, batch groups and a 1x1 conv.
CONVS = {
    "same": ((2, 9, 7, 3), (3, 3, 3, 5), dict(window_strides=(1, 1), padding="SAME")),
    "same-stride2": ((2, 9, 8, 4), (3, 3, 4, 6), dict(window_strides=(2, 2), padding="SAME")),
    "valid-stride2": ((1, 9, 9, 4), (3, 3, 4, 4), dict(window_strides=(2, 2), padding="VALID")),
    "asymmetric": ((1, 5, 6, 2), (3, 3, 2, 3), dict(window_strides=(1, 1), padding=((2, 0), (1, 2)))),
    "asymmetric-stride2": ((1, 8, 8, 4), (3, 3, 4, 4), dict(window_strides=(2, 2), padding=((0, 1), (0, 1)))),
    "groups-stride2": ((2, 9, 8, 8), (3, 3, 2, 8), dict(window_strides=(2, 2), padding="SAME", feature_group_count=4)),
    "kernel-dilation": ((1, 9, 9, 2), (3, 3, 2, 3), dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2))),
    "input-dilation": (
        (1, 5, 5, 2),
        (3, 3, 2, 3),
        dict(window_strides=(1, 1), padding=((2, 2), (1, 2)), lhs_dilation=(2, 2)),
    ),
    "batch-groups": ((4, 5, 5, 6), (3, 3, 6, 6), dict(window_strides=(1, 1), padding="SAME", batch_group_count=2)),
    "1x1": ((2, 5, 5, 3), (1, 1, 3, 7), dict(window_strides=(1, 1), padding="VALID")),
}


@pytest.mark.parametrize("case", CONVS)
def test_a_conv_and_its_two_transposes_are_counted_as_xla_does(case):
    """The forward, and the input and kernel gradients alone (``jax.vjp`` with a random cotangent): the
    transposed convolutions with input dilation, and the batch-grouped kernel gradient of grouped convs."""
    lhs, rhs, kw = CONVS[case]
    x, k = _random(*lhs), _random(*rhs, seed=1)

    def conv(a, b):
        return lax.conv_general_dilated(a, b, dimension_numbers=NHWC, **kw)

    y, vjp = jax.vjp(conv, x, k)
    dy = _random(*y.shape, seed=2)
    for fn, args in [(conv, (x, k)), (lambda c: vjp(c)[0], (dy,)), (lambda c: vjp(c)[1], (dy,))]:
        assert count_flops(fn, *args) == pytest.approx(_xla_flops(fn, *args), rel=1e-6)
    if case == "groups-stride2":  # the gradients are the transposed and batch-grouped convolutions
        eqns = [e for arg in (0, 1) for e in jax.make_jaxpr(lambda c, i=arg: vjp(c)[i])(dy).eqns]
        params = [e.params for e in eqns if e.primitive.name == "conv_general_dilated"]
        assert any(p["lhs_dilation"] == (2, 2) for p in params) and any(p["batch_group_count"] == 4 for p in params)


@pytest.mark.parametrize("wrt", ["input", "kernel"])
def test_the_project_conv_gradient_alone_needs_dead_code_elimination(wrt):
    """``models/conv.py``'s wide convolution (its dot backward on the CPU) differentiated w.r.t. one operand:
    its backward computes both gradients, and the unused one is dead code, for XLA and for the count."""
    x, k = _random(2, 4, 4, 256), _random(3, 3, 256, 256, seed=1) * 0.02
    target = _random(2, 4, 4, 256, seed=2)

    def grad(conv):
        def loss(a, b):
            return jnp.mean((conv(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC) - target) ** 2)

        return jax.grad(loss, argnums=0 if wrt == "input" else 1)

    ours, xla = count_flops(grad(C.conv_general_dilated), x, k), _xla_flops(grad(C.conv_general_dilated), x, k)
    assert ours == pytest.approx(xla, rel=0.01)  # measured 0.998 (input), 0.9998 (kernel)
    # Without the elimination: the forward, both gradients, and the larger CPU branch of each cond.
    closed = jax.make_jaxpr(grad(C.conv_general_dilated))(x, k)
    assert jaxpr_flops(closed) > 1.4 * ours  # measured 1.54x: 116 M against 75 M
    # The GPU branch (jax.vjp of XLA's conv) without its recomputed forward: the plain convolution's count.
    gpu = jaxpr_flops(dce_jaxpr(closed)[0], platform="cuda")
    assert gpu == count_flops(grad(lax.conv_general_dilated), x, k) < ours


@pytest.fixture(scope="module")
def unet():
    """A two-level UNet wide enough (128, 256 channels) that matrix work dominates as in the real models, and
    whose 256-channel level takes ``models/conv.py``'s dot backward; an 8x8 latent keeps it quick."""
    config = {**UNET, **UNET_2LEVEL, "block_out_channels": [128, 256]}
    return UNet2DConditionModel(UNetConfig.from_dict(config), rngs=nnx.Rngs(0))


def _inputs(size=8):
    return _random(2, size, size, 4), jnp.array([3, 700]), _random(2, 5, UNET["cross_attention_dim"], seed=1)


def test_unet_forward_is_counted_within_5_percent_below_xla(unet):
    graphdef, state = nnx.split(unet)

    def forward(s, x, t, text):
        return nnx.merge(graphdef, s)(x, t, text)

    args = (state, *_inputs())
    ratio = count_flops(forward, *args) / _xla_flops(forward, *args)
    assert 0.95 <= ratio <= 1.0  # measured 0.983: XLA also counts the norms, activations and softmax


def test_stage1_gradient_is_counted_within_5_percent_below_xla(unet):
    """The stage-1 loss differentiated w.r.t. the dense branch and the exchange layers only: the frozen RGB
    branch needs input gradients alone, and its kernel gradients are dead code."""
    graphdef, params, frozen = split_trainable(JointNet.from_unet(unet), stage=1)
    assert jax.tree.leaves(frozen)
    x, _, text = _inputs()
    batch = {"index": jnp.arange(2), "text": text}
    for name, seed in (("image", 3), ("depth", 4)):
        batch[f"{name}_mean"], batch[f"{name}_logvar"] = _random(*x.shape, seed=seed), jnp.full(x.shape, -2.0)
    schedule, uncond = NoiseSchedule.from_config(SCHEDULER), jnp.zeros((1, 5, text.shape[-1]))

    def step(p, frozen, batch):
        def loss(p):
            model = nnx.merge(graphdef, p, frozen)
            return cached_loss(model, 0.18215, 2, schedule, uncond, batch, jax.random.key(0), LossSettings())

        return jax.value_and_grad(loss, has_aux=True)(p)

    ours, xla = count_flops(step, params, frozen, batch), _xla_flops(step, params, frozen, batch)
    assert 0.95 <= ours / xla <= 1.0  # measured 0.985
    assert jaxpr_flops(jax.make_jaxpr(step)(params, frozen, batch)) > 1.05 * ours  # measured 1.13x without DCE


W = _random(16, 16, seed=5) * 0.1
MATMUL = 2 * 4 * 16 * 16  # one (4, 16) @ (16, 16)


def test_scan_counts_its_body_times_its_length_and_while_its_body_once():
    x = _random(4, 16)

    def body(c, _):
        return jnp.tanh(c @ W), None

    def unrolled(c):
        for _ in range(5):
            c = body(c, None)[0]
        return c

    assert count_flops(lambda c: lax.scan(body, c, None, length=5)[0], x) == count_flops(unrolled, x) == 5 * MATMUL
    assert count_flops(lambda c, n: lax.fori_loop(0, n, lambda i, c: c @ W, c), x, 5) == MATMUL


def test_cond_counts_its_costliest_branch():
    def fn(p, c):
        return lax.cond(p, lambda c: c @ W @ W, lambda c: 2 * c, c)

    assert count_flops(fn, False, _random(4, 16)) == 2 * MATMUL
    # lax.platform_dependent is a cond of which only the backend's branch is compiled: still the larger one.
    platform = functools.partial(lax.platform_dependent, cpu=lambda c: c @ W, default=lambda c: c @ W @ W)
    assert count_flops(platform, _random(4, 16)) == 2 * MATMUL
    closed = jax.make_jaxpr(platform)(_random(4, 16))
    assert [jaxpr_flops(closed, platform=p) for p in ("cpu", "cuda", "gpu", "tpu")] == [MATMUL] + [2 * MATMUL] * 3


def test_dead_code_is_removed_inside_calls_and_branches_and_the_result_still_runs():
    def fn(c, p):
        a, b = jax.jit(lambda u: (u @ W, u @ W @ W))(c)  # b is dead
        d, e = lax.cond(p, lambda u: (u @ W, u @ W @ W), lambda u: (u, u @ W), a)  # e is dead
        f, _ = jax.checkpoint(lambda u: (jnp.sin(u) @ W, u @ W))(d)
        return f

    closed = jax.make_jaxpr(fn)(_random(4, 16), True)
    pruned, used_inputs = dce_jaxpr(closed)
    assert jaxpr_flops(closed) == 8 * MATMUL and jaxpr_flops(pruned) == 3 * MATMUL
    assert count_flops(fn, _random(4, 16), True) == 3 * MATMUL and used_inputs == [True, True]
    for p in (True, False):
        np.testing.assert_allclose(jaxpr_as_fun(pruned)(_random(4, 16), p)[0], fn(_random(4, 16), p), rtol=1e-6)
    _, used = dce_jaxpr(jax.make_jaxpr(lambda a, b: (a @ W, b @ W))(_random(4, 16), _random(4, 16)), [False, True])
    assert used == [False, True]


def test_attention_traced_as_plain_dots_counts_what_the_cpu_kernel_counts():
    """``attention.auto_as("xla")`` (how the trainer traces the step it counts, so that a GPU's cuDNN call does
    not hide attention's FLOPs) counts the FLOPs of the CPU's block-wise kernel; ``auto_as`` picks the
    implementation within its block only."""
    from jointnet_jax.models import attention

    q, k, v = (_random(2, 1024, 4, 32, seed=s) for s in range(3))
    # A new function each time: jax caches the trace of a function it has seen with the same shapes.
    fresh = lambda: lambda *a: attention.dot_product_attention(*a)  # noqa: E731

    def primitives():
        return {e.primitive.name for e in jax.make_jaxpr(fresh())(q, k, v).eqns}

    assert "scan" in primitives()  # the CPU's block-wise kernel (lax.map over query blocks)
    blockwise = count_flops(fresh(), q, k, v)
    with attention.auto_as("xla"):
        plain = count_flops(fresh(), q, k, v)
    with attention.auto_as("reference"):
        assert "scan" not in primitives()  # the einsum form
        reference = count_flops(fresh(), q, k, v)
    assert plain == blockwise == reference == 2 * (2 * 2 * 4 * 1024 * 1024 * 32)  # q k^T and p v
    assert "scan" in primitives()
