"""``models/functional.jit``: the project's programs take XLA's own CPU convolution instead of YNNPACK's, per
program, and behave as ``jax.jit`` otherwise."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jointnet_jax.models import functional

CONV = ("NHWC", "HWIO", "NHWC")


def _conv_grads(x, k):
    def loss(x, k):
        y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=CONV)
        return jnp.sum(jnp.tanh(y))

    return jax.grad(loss, (0, 1))(x, k)


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, jnp.float32)
    return x, k


def _ynn_fusions(jitted, *args) -> int:
    return jitted.lower(*args).compile().as_text().count("__ynn_fusion")


def test_cpu_convolutions_leave_ynnpack_and_dots_stay():
    assert jax.default_backend() == "cpu"
    x, k = _inputs()
    assert _ynn_fusions(jax.jit(_conv_grads), x, k) >= 3  # XLA's default: forward, input and kernel gradient
    assert _ynn_fusions(functional.jit(_conv_grads), x, k) == 0
    a = jnp.ones((64, 64))
    dots = _ynn_fusions(jax.jit(lambda a: a @ a), a)
    assert dots >= 1 and _ynn_fusions(functional.jit(lambda a: a @ a), a) == dots


def test_same_values_as_jax_jit():
    x, k = _inputs()
    for ours, plain in zip(functional.jit(_conv_grads)(x, k), jax.jit(_conv_grads)(x, k), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-4, atol=1e-4)  # float32 rounding


def test_decorator_form_static_arguments_and_jit_attributes():
    @functools.partial(functional.jit, static_argnames=("power",))
    def f(a, *, power):
        return a**power

    a = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(f(a, power=3)), np.arange(4.0) ** 3)
    assert f.__name__ == "f"
    assert "power" not in f.lower(a, power=2).as_text()  # a static argument, folded into the program
    f.clear_cache()


def test_no_options_off_the_cpu(monkeypatch):
    assert functional.compiler_options() == functional.CPU_COMPILER_OPTIONS
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert functional.compiler_options() is None
