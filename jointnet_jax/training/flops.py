"""Model FLOPs of a JAX function, counted from its jaxpr, for MFU.

Why not XLA's own count: ``compiled.cost_analysis()["flops"]`` leaves out the convolutions that XLA's GPU
backend hands to cuDNN (they are custom calls to it), which is most of a UNet's work, so an MFU built on it
reads several times too low on GPUs. The count here is analytic and backend-independent: it walks the traced
program and adds up its matrix work, ``dot_general`` (2 x batch x M x N x K) and ``conv_general_dilated``
(2 x output elements x input features per group x the kernel taps that read real input, so that taps falling
on padding, or between the rows that ``lhs_dilation`` spreads out in a transposed convolution, cost
nothing). Those are XLA's CPU formulas (``HloCostAnalysis``), and a single dot or convolution, the
transposed and batch-grouped ones of its gradients included, gets exactly XLA's CPU count
(``tests/test_flops.py``). Elementwise work, reductions and random-number generation are not counted: on
the project's models XLA's CPU count, which does include them, is 1-5% higher.

Dead code is removed first, as XLA removes it, because the traced program holds some: ``models/conv.py``'s
custom backward computes both the input and the kernel gradient where a frozen branch needs only the first,
and its GPU branch (``jax.vjp`` of XLA's convolution) recomputes the forward; counting those would
over-count a gradient by up to 1.5x. Nested programs are followed: calls (``jit``, ``remat``, custom
JVP/VJP functions, whose forward alone is in a jaxpr), ``cond`` (the costliest branch, see
:func:`jaxpr_flops`), ``scan`` (its body times its length) and ``while`` (its body once: the trip count is
not known from the program, and the project's train steps have no while loop).

Not counted: primitives other than the two above, such as the cuDNN fused-attention calls that
``jax.nn.dot_product_attention(implementation="cudnn")`` traces to; count a program whose attention is
plain dots (``models/attention.py``'s ``impl="xla"`` in float32, or the CPU's block-wise form) for those.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var, jaxprs_in_params

# Call primitives whose one jaxpr takes the call's operands and gives its results, one to one.
_CALLS = frozenset({"jit", "pjit", "closed_call", "call", "core_call", "remat2", "checkpoint"})
_CALLS |= {"custom_jvp_call", "custom_vjp_call"}


def count_flops(fn, *args, **kwargs) -> float:
    """Matrix FLOPs of ``fn(*args, **kwargs)``: traced with ``jax.make_jaxpr``, dead code removed
    (:func:`dce_jaxpr`), then counted by :func:`jaxpr_flops` with its default (the costliest branch of each
    ``cond``); for one backend's branches, ``jaxpr_flops(dce_jaxpr(jax.make_jaxpr(fn)(*args))[0],
    platform=...)``. ``args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is run or compiled. A jitted
    ``fn`` is traced through its own ``trace`` (its jit, with its shardings and compiler options, stays the
    top level, as when it runs)."""
    closed = fn.trace(*args, **kwargs).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args, **kwargs)
    return jaxpr_flops(dce_jaxpr(closed)[0])


def jaxpr_flops(jaxpr: ClosedJaxpr | Jaxpr, *, platform: str | None = None) -> float:
    """Matrix FLOPs of ``jaxpr`` as it stands: dead code is counted too, so pass :func:`dce_jaxpr`'s
    result for the work that runs (``count_flops`` does).

    A ``cond`` counts its costliest branch: an upper bound, exact where one branch holds all the work. The
    project's conds come from ``lax.platform_dependent`` (``models/conv.py``): a CPU and a GPU branch of
    which only the backend's is compiled. The costlier is the CPU's, whose im2col dots also multiply the
    padding, so the default count is right on the CPU and high on a GPU by the padded taps (19% for
    a 3x3 convolution at 8x8, 44% at 4x4). ``platform`` (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``, or
    ``"gpu"`` for either GPU) counts the branch that backend compiles instead. A ``scan`` counts its body
    times its length, a ``while`` its body and condition once."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    return float(sum(_eqn_flops(eqn, platform) for eqn in jaxpr.eqns))


def _eqn_flops(eqn, platform) -> float:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        return _dot_flops(eqn)
    if name == "conv_general_dilated":
        return _conv_flops(eqn)
    if name == "cond":
        branches = _platform_branches(params, platform) or params["branches"]
        return max(jaxpr_flops(branch, platform=platform) for branch in branches)
    if name == "scan":
        return params["length"] * jaxpr_flops(params["jaxpr"], platform=platform)
    # Calls, while and anything else nested.
    return sum(jaxpr_flops(inner, platform=platform) for inner in jaxprs_in_params(params))


def _platform_branches(params, platform) -> list:
    """The branch of a ``lax.platform_dependent`` cond that ``platform`` compiles (as a list), else []."""
    names = params.get("branches_platforms")
    if platform is None or not names:
        return []
    wanted = {"cuda", "rocm"} if platform == "gpu" else {platform}
    chosen = [b for b, n in zip(params["branches"], names, strict=True) if n is not None and wanted & set(n)]
    return chosen[:1] or [b for b, n in zip(params["branches"], names, strict=True) if n is None]


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = int(np.prod([lhs[d] for d in lhs_contract], dtype=np.int64))
    return 2.0 * int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * k


def _conv_flops(eqn) -> float:
    """XLA's ``HloCostAnalysis::GetConvolutionFlops``: 2 x (batch / batch groups) x (input features / feature
    groups) x output features x the (output position, kernel tap) pairs that read an input element."""
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    pairs = 1
    for d, (low, _high) in enumerate(p["padding"]):
        pairs *= _valid_pairs(
            lhs[lhs_spec[d + 2]],
            rhs[rhs_spec[d + 2]],
            out[out_spec[d + 2]],
            p["window_strides"][d],
            low,
            p["lhs_dilation"][d],
            p["rhs_dilation"][d],
        )
    batch = lhs[lhs_spec[0]] // p["batch_group_count"]
    features_in = lhs[lhs_spec[1]] // p["feature_group_count"]
    return 2.0 * batch * features_in * out[out_spec[1]] * pairs


def _valid_pairs(size_in, size_kernel, size_out, stride, pad_low, lhs_dilation, rhs_dilation) -> int:
    """In one spatial dimension, the (output position, kernel tap) pairs whose input position is a real
    element: inside the input and, with ``lhs_dilation``, not one of the holes between its elements."""
    at = np.arange(size_out)[:, None] * stride - pad_low + np.arange(size_kernel)[None, :] * rhs_dilation
    real = (at >= 0) & (at % lhs_dilation == 0) & (at // lhs_dilation < size_in)
    return int(real.sum())


def dce_jaxpr(jaxpr: ClosedJaxpr | Jaxpr, used_outputs=None):
    """(``jaxpr`` without the equations that no used output needs, the inputs that the used outputs read).

    ``used_outputs``: a bool per output, all by default. Equations are walked in reverse and kept when one of
    their results is live or they have effects; liveness is carried into the jaxprs of calls and ``cond``
    branches through their live-output mask, while ``scan``, ``while`` and other nested programs keep all
    their results (and read all their operands). Inputs and outputs are kept, so the result is a valid jaxpr
    with the same signature: an output nothing needs becomes a literal zero (it keeps its computation only
    where its type has no zero, such as a PRNG key)."""
    closed = isinstance(jaxpr, ClosedJaxpr)
    inner = jaxpr.jaxpr if closed else jaxpr
    used = [True] * len(inner.outvars) if used_outputs is None else [bool(u) for u in used_outputs]
    new, used_inputs = _dce(inner, used)
    return (jaxpr.replace(jaxpr=new) if closed else new), used_inputs


def _dce(jaxpr: Jaxpr, used_outputs: list[bool]) -> tuple[Jaxpr, list[bool]]:
    used_outputs = [u or _zero(v.aval) is None for v, u in zip(jaxpr.outvars, used_outputs, strict=True)]
    live = {v for v, u in zip(jaxpr.outvars, used_outputs, strict=True) if u and isinstance(v, Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        used = [isinstance(v, Var) and v in live for v in eqn.outvars]
        if eqn.effects:
            used = [True] * len(eqn.outvars)
        elif not any(used):
            continue
        eqn, reads = _dce_eqn(eqn, used)
        live.update(v for v, r in zip(eqn.invars, reads, strict=True) if r and isinstance(v, Var))
        kept.append(eqn)
    outvars = [v if u else _zero(v.aval) for v, u in zip(jaxpr.outvars, used_outputs, strict=True)]
    return jaxpr.replace(eqns=kept[::-1], outvars=outvars), [v in live for v in jaxpr.invars]


def _dce_eqn(eqn, used: list[bool]):
    """(``eqn`` with its nested jaxprs pruned for the results ``used``, which of its operands it reads)."""
    name, params = eqn.primitive.name, eqn.params
    if name == "cond":
        pruned = [_dce(branch.jaxpr, used) for branch in params["branches"]]
        branches = tuple(b.replace(jaxpr=j) for b, (j, _) in zip(params["branches"], pruned, strict=True))
        reads = [True] + [any(col) for col in zip(*(r for _, r in pruned), strict=True)]
        return eqn.replace(params={**params, "branches": branches}), reads
    if name in _CALLS:
        keys = [k for k, v in params.items() if isinstance(v, ClosedJaxpr | Jaxpr)]
        if len(keys) == 1:
            call = params[keys[0]]
            inner = call.jaxpr if isinstance(call, ClosedJaxpr) else call
            if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
                new, reads = _dce(inner, used)
                call = call.replace(jaxpr=new) if isinstance(call, ClosedJaxpr) else new
                return eqn.replace(params={**params, keys[0]: call}), reads
    nested = {k: dce_jaxpr(v)[0] for k, v in params.items() if isinstance(v, ClosedJaxpr | Jaxpr)}
    if nested:  # scan, while and the rest: all results kept, all operands read
        eqn = eqn.replace(params={**params, **nested})
    return eqn, [True] * len(eqn.invars)


def _zero(aval):
    """A literal zero of ``aval`` (a broadcast view: no memory), or None for types without one."""
    dtype, shape = getattr(aval, "dtype", None), getattr(aval, "shape", None)
    if not isinstance(dtype, np.dtype) or shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return Literal(np.broadcast_to(np.zeros((), dtype), shape), aval)
