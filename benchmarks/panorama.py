"""Tiled panorama denoising: the compiled loop (tiles batched inside ``loop.denoise``) against a tile-by-tile
Python loop that makes one jitted model call per view per step (the official code with view_batch_size 1:
crop, eps, DDIM step per view, then average x_{t-1}), in the same process. The Python loop is also an
independent implementation of the official semantics, so the final latents are compared.

    python benchmarks/panorama.py --model tiny --steps 10                  # tests' tiny twin, 2048x512-equivalent
    python benchmarks/panorama.py --model sd21 --steps 3 --dtype bf16      # SD2.1-base shape, random weights

Canvas: 1 x 4 tiles (latent T x 4T, T = the UNet's sample_size), official panorama settings (stride T/2,
8 tiles per call, ramp T/8, full view 0.4 x 5, random offset, wrap), DDIM, CFG 7.5, batch 1.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jointnet_jax as jj  # noqa: E402
from jointnet_jax.diffusion.samplers import make_sampler  # noqa: E402
from jointnet_jax.diffusion.schedule import load_schedule  # noqa: E402
from jointnet_jax.pipelines import loop  # noqa: E402
from jointnet_jax.pipelines.tiles import TileGrid, Tiling  # noqa: E402

SD21 = {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}


def build(kind: str, dtype):
    """(JointNet, text width, DDIM sampler factory)."""
    if kind == "tiny":
        from tests.tiny_sd import TEXT_DIM, make_tiny_base

        base = make_tiny_base(Path(tempfile.mkdtemp()) / "base")
        return (
            jj.JointNet.from_unet(jj.load_unet(base / "unet", dtype=dtype)),
            TEXT_DIM,
            load_schedule(base / "scheduler"),
        )
    config = jj.UNetConfig.from_dict({**SD21, "sample_size": 64})
    model = jj.JointNet(config, rngs=nnx.Rngs(0), dtype=dtype)
    from tests.tiny_sd import SCHEDULER  # the SD2.1-base scheduler config

    folder = Path(tempfile.mkdtemp()) / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return model, 1024, load_schedule(folder)


def tile_by_tile(graphdef, grid: TileGrid, sampler, text, cfg):
    """The official structure: per step and view, one jitted model call and a DDIM step on the crop.
    Returns ``run(state, x, key)``; the view function is jitted once."""
    t = grid.tiling

    @jax.jit
    def view(state, x, i):
        eps = loop.guided_eps(nnx.merge(graphdef, state), x, sampler.timestep_at(i), text, None, None, cfg, 0.0, True)
        return sampler.step((), i, eps, x)[0]

    weight = grid.weight()
    last = grid.full_view_last_step(sampler.num_steps)

    def run(state, x, key):
        x = np.asarray(x)
        for i in range(sampler.num_steps):
            offset = grid.offsets(jax.random.fold_in(jax.random.fold_in(key, i), 1))
            value, count = np.zeros_like(x), np.zeros(x.shape[1:3], np.float32)
            for r, c, on in zip(*(np.asarray(a).reshape(-1) for a in grid.tiles(offset)), strict=True):
                if on:
                    cols = (c + np.arange(t.tile)) % grid.width
                    value[:, r : r + t.tile, cols] += weight[..., None] * np.asarray(
                        view(state, x[:, r : r + t.tile, cols], i)
                    )
                    count[r : r + t.tile, cols] += weight
            if last is not None and i <= last:
                shift = int(offset[1]) if t.wrap else 0
                value += t.full_view_weight * np.roll(np.asarray(view(state, np.roll(x, -shift, 2), i)), shift, 2)
                count += t.full_view_weight
            x = value / count[None, :, :, None]
        return x

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args(argv)
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    model, text_dim, schedule = build(args.model, dtype)
    tile = model.unet.config.sample_size
    grid = TileGrid(Tiling.preset("ours", tile, wrap=True), tile, 4 * tile)
    sampler = make_sampler("ddim", schedule, args.steps)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, grid.height, grid.width, 8))
    text = jax.random.normal(jax.random.key(1), (2, 77, text_dim))
    inputs = loop.LoopInputs(x=x, noise=x, known=None, generate=None, cond_rgb=None, cond_dense=None, text=text)

    def compiled():
        return np.asarray(loop.denoise(graphdef, state, sampler, inputs, 7.5, 0.0, key, guided=True, tiling=grid))

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return out, first, min(times)

    ours, ours_first, ours_s = timed(compiled)
    record = {
        "model": args.model,
        "dtype": args.dtype,
        "canvas_latent": [grid.height, grid.width],
        "tiles": grid.num_tiles,
        "model_calls_per_step": grid.num_batches,
        "steps": args.steps,
        "compiled_s": round(ours_s, 3),
        "compiled_first_call_s": round(ours_first, 1),
    }
    if not args.skip_baseline:
        baseline = tile_by_tile(graphdef, grid, sampler, text, 7.5)
        ref, ref_first, ref_s = timed(lambda: baseline(state, x, key))
        record |= {
            "tile_by_tile_s": round(ref_s, 3),
            "tile_by_tile_first_call_s": round(ref_first, 1),
            "speedup": round(ref_s / ours_s, 2),
            "max_abs_diff": float(np.abs(ours - ref).max()),
        }
    record |= {"device": str(jax.devices()[0]), "host": platform.node(), "load": round(os.getloadavg()[0], 2)}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
