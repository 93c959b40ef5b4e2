"""Calling NNX modules as compiled pure functions.

Hot paths jit a pure function of the split state instead of calling ``nnx.jit`` (whose graph traversal
runs on every call) or running modules eagerly (one dispatch per op).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


def compiled(module: nnx.Module, method: str = "__call__", **jit_kwargs):
    """``compiled(model)(*args)`` == ``model(*args)``, traced once per input shape and compiled."""
    graphdef, state = nnx.split(module)

    def pure(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return functools.partial(jax.jit(pure, **jit_kwargs), state)
