"""Test-time ensembling (``Pipeline.depth(..., ensemble=K)``): AbsRel and delta1 against K on held-out
synthetic scenes, with the JointNet the CPU demo trained.

    python -m jointnet_jax.demo --out runs/demo            # once: the trained demo model (~16 min)
    python benchmarks/ensemble.py --demo runs/demo --scenes 32 --k 1 2 4 8

The scenes are the first ``--scenes`` after the demo's own held-out set (``demo.held_out_scenes`` skips the
training and eval scenes; these skip the demo's report scenes too), rendered at the demo's resolution, each
predicted with its caption at the demo's sampling settings (25 steps, cfg 1) and scored with the paper's
affine-invariant protocol (``evaluation.depth.depth_metrics``: disparity alignment, per image, then averaged).
Every K draws its K noises from the same seed (they are not the first K of a larger run's). A 1024x1024
float32 matmul is timed in the same run as the machine's reference figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.photos import matmul_reference  # noqa: E402


def scenes(config, first: int, n: int):
    from jointnet_jax.data import synthetic

    out = []
    for i in range(first, first + n):
        scene, buffers = synthetic.scene_buffers(i, config.data.resolution, seed=config.data.seed)
        out.append((synthetic.caption(scene), buffers.rgb.astype(np.float32) / 255.0, buffers.depth))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="a finished `jointnet-demo --out` folder")
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import jointnet_jax as jj
    from jointnet_jax.demo.config import default_config
    from jointnet_jax.evaluation.depth import depth_metrics

    config = default_config()
    pipe = jj.Pipeline.from_pretrained(args.demo / "base" / "export", str(args.demo / "jointnet" / "export"))
    first = config.data.synthetic_num + config.data.synthetic_eval_num + config.demo.num_scenes
    held_out = scenes(config, first, args.scenes)
    print(f"host: this container, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"reference: 1024^2 fp32 matmul {matmul_reference() * 1e3:.2f} ms", flush=True)
    print("| K | AbsRel | delta1 | mean uncertainty | s per scene |\n|---|---|---|---|---|")
    for k in args.k:
        rows, spread, start = [], [], time.perf_counter()
        for caption, image, gt in held_out:
            r = pipe.depth(image, prompt=caption, ensemble=k, steps=config.demo.sample_steps, seed=args.seed)
            rows.append(depth_metrics(r["depth"], gt))
            spread.append(float(r["uncertainty"].mean()))
        dt = (time.perf_counter() - start) / len(held_out)
        absrel, delta1 = (float(np.mean([m[key] for m in rows])) for key in ("absrel", "delta1"))
        print(f"| {k} | {absrel:.4f} | {delta1:.4f} | {np.mean(spread):.4f} | {dt:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
