"""One 3x3 convolution on CPU: XLA's convolution, im2col + one dot, the project's conv, and torch.

Why this exists: the SD2.1-shaped training step spends a quarter of its time in XLA CPU's reversed-kernel copies
and is slow in wide convs at tiny spatial sizes (RESULTS.md, "Where the JAX step time goes"). This measures
whether an im2col formulation would be a better CPU conv path, per shape, for the forward, the input gradient
(frozen kernel, as in the RGB branch) and the input + kernel gradient (trained branch). ``project`` is
``jointnet_jax.models.conv.conv2d``: XLA's forward with the dot backward (a ``custom_vjp``). Each is compiled
twice: with ``jax.jit`` (XLA's CPU defaults, where YNNPACK runs the convolutions: ``, ynnpack``) and with the
project's ``models.functional.jit`` (XLA's own convolution: ``, project``).

    python benchmarks/conv.py                                     # the default shapes
    python benchmarks/conv.py --shapes 1x8x1280 16x32x32          # batch x side x channels

Medians of 5 calls after a warm-up, 2 threads for torch; fp32. Prints one JSON line per shape and a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample import machine  # noqa: E402
from twin_forward import emit  # noqa: E402

DEFAULT_SHAPES = ["1x8x1280", "1x32x1280", "2x64x320", "2x32x320", "16x32x32", "16x16x64", "16x32x64"]


def median_ms(fn, repeats=5) -> float:
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 1)


def jax_convs():
    import jax
    import jax.numpy as jnp

    def xla(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def im2col(x, k):
        _, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
        return patches @ k.reshape(9 * c, -1)

    def project(x, k):
        from jointnet_jax.models.conv import conv2d

        return conv2d(x, k, (1, 1), ((1, 1), (1, 1)))

    return {"xla": xla, "im2col": im2col, "project": project}


def time_jax(conv, x, k, jit) -> dict:
    import jax
    import jax.numpy as jnp

    def loss(x, k):
        return jnp.sum(conv(x, k) ** 2)

    out = {}
    for name, fn in {
        "fwd": jit(conv),
        "grad_x": jit(jax.grad(loss)),
        "grad_xk": jit(jax.grad(loss, argnums=(0, 1))),
    }.items():
        compiled = fn.lower(x, k).compile()
        out[f"{name}_ms"] = median_ms(lambda c=compiled: jax.block_until_ready(c(x, k)))
    return out


def time_torch(n, s, c) -> dict:
    import torch

    torch.set_num_threads(2)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    x = torch.randn(n, c, s, s)
    with torch.no_grad():
        fwd = median_ms(lambda: conv(x))
    xg = x.clone().requires_grad_(True)
    conv.requires_grad_(False)
    grad_x = median_ms(lambda: (conv(xg) ** 2).sum().backward())
    conv.requires_grad_(True)
    grad_xk = median_ms(lambda: (conv(xg) ** 2).sum().backward())
    return dict(fwd_ms=fwd, grad_x_ms=grad_x, grad_xk_ms=grad_xk)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch x side x channels")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    import numpy as np

    from jointnet_jax.models import functional

    emit(dict(part="start", script="conv.py", argv=sys.argv[1:], **machine()))
    rows = []
    for shape in args.shapes:
        n, s, c = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        x = jax.numpy.asarray(rng.standard_normal((n, s, s, c), dtype=np.float32))
        k = jax.numpy.asarray(rng.standard_normal((3, 3, c, c), dtype=np.float32) * 0.01)
        convs = jax_convs()
        np.testing.assert_allclose(convs["xla"](x, k), convs["im2col"](x, k), rtol=1e-3, atol=1e-3)
        for impl, conv in convs.items():
            for options, jit in (("ynnpack", jax.jit), ("project", functional.jit)):
                rows.append(dict(part="conv", shape=shape, impl=f"{impl}, {options}", **time_jax(conv, x, k, jit)))
                emit(rows[-1])
        if not args.skip_torch:
            rows.append(dict(part="conv", shape=shape, impl="torch", **time_torch(n, s, c)))
            emit(rows[-1])
    print("\n| batch x side x channels | impl | forward (ms) | input grad (ms) | input + kernel grad (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']} | {r['grad_x_ms']} | {r['grad_xk_ms']} |")


if __name__ == "__main__":
    main()
