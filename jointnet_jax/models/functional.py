"""Compiling the project's programs: ``jit`` (``jax.jit`` with this project's per-program CPU options) and
calling NNX modules as compiled pure functions.

Hot paths jit a pure function of the split state instead of calling ``nnx.jit`` (whose graph traversal
runs on every call) or running modules eagerly (one dispatch per op).

Why a ``jit`` of our own: on the CPU, this jaxlib's XLA hands every convolution to YNNPACK, which runs the
3x3 convolutions of these UNets slower than XLA's own (Eigen) convolution: forwards by 1.2-3.4x, gradients by
up to 1.8x, at 32-1280 channels (``benchmarks/conv.py``; RESULTS.md, 2026-12-03 evening). XLA's option
``xla_cpu_experimental_ynn_fusion_type`` lists what YNNPACK takes; :data:`CPU_COMPILER_OPTIONS` is its
default (dots, convolutions, reductions) without the convolutions. It is set per program through
``compiler_options``, never in ``XLA_FLAGS``, so a user's own flags and programs are untouched. The backend
is looked up at the first call, not at import: a process may pick its platform, or start
``jax.distributed``, after importing this module. GPUs and TPUs get no options.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def compiler_options() -> dict[str, str] | None:
    """The per-program XLA options of this project on the default backend (see the module docstring)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


class _Jit:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`, made at the first use. Attributes
    (``lower``, ``trace``, ``clear_cache``, ...) are the jitted function's."""

    def __init__(self, fun, kwargs):
        self._fun, self._kwargs, self._jitted = fun, kwargs, None
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun=None, **kwargs):
    """``jax.jit`` for the project's programs: the same arguments, plus :data:`CPU_COMPILER_OPTIONS` on the
    CPU. Usable as ``jit(f, ...)`` and as a decorator ``@functools.partial(jit, static_argnames=...)``."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jit(fun, kwargs)


def compiled(module: nnx.Module, method: str = "__call__", **jit_kwargs):
    """``compiled(model)(*args)`` == ``model(*args)``, traced once per input shape and compiled."""
    graphdef, state = nnx.split(module)

    def pure(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return functools.partial(jit(pure, **jit_kwargs), state)
