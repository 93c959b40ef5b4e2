"""Test-time settings of image -> depth (``Pipeline.depth(..., ensemble=K)``): AbsRel and delta1 against K,
the number of sampling steps and the sampler, on validation synthetic scenes, with the JointNet the CPU demo
trained.

    python -m jointnet_jax.demo --out runs/demo            # once: the trained demo model (~16 min)
    python benchmarks/ensemble.py --demo runs/demo --scenes 32 --k 1 2 4 8
    python benchmarks/ensemble.py --base B --model M --steps 10 25 50 100 --sampler ddim dpmpp_2m --k 1 4

``--base``/``--model`` name the exports directly (a check run's, ``benchmarks/demo_check_run.py``) instead of
a demo folder. The scenes are the first ``--scenes`` after the demo's own held-out set
(``demo.held_out_scenes`` skips the training and eval scenes; these skip the demo's report scenes too), so
settings chosen here are not chosen on the demo's held-out scenes. They are rendered at the demo's
resolution, each predicted with its caption (cfg 1) and scored with the paper's affine-invariant protocol
(``evaluation.depth.depth_metrics``: disparity alignment, per image, then averaged). Every K draws its K
noises from the same seed (they are not the first K of a larger run's). A 1024x1024 float32 matmul is timed
in the same run as the machine's reference figure.
"""

from __future__ import annotations

import argparse
import itertools
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
    p.add_argument("--demo", type=Path, help="a finished `jointnet-demo --out` folder")
    p.add_argument("--base", type=Path, help="with --model instead of --demo: the base export")
    p.add_argument("--model", type=Path, help="the JointNet export")
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampling steps (default: the demo's)")
    p.add_argument("--sampler", nargs="+", default=["ddim"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import jointnet_jax as jj
    from jointnet_jax.demo.config import default_config

    if args.demo is None and (args.base is None or args.model is None):
        p.error("give --demo, or --base and --model")
    config = default_config()
    base = args.base or args.demo / "base" / "export"
    pipe = jj.Pipeline.from_pretrained(base, str(args.model or args.demo / "jointnet" / "export"))
    first = config.data.synthetic_num + config.data.synthetic_eval_num + config.demo.num_scenes
    validation = scenes(config, first, args.scenes)
    print(f"host: this container, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"reference: 1024^2 fp32 matmul {matmul_reference() * 1e3:.2f} ms", flush=True)
    print("| sampler | steps | K | AbsRel | delta1 | mean uncertainty | s per scene |\n|---|---|---|---|---|---|---|")
    for sampler, steps, k in itertools.product(args.sampler, args.steps or [config.demo.sample_steps], args.k):
        row = _score(pipe, validation, dict(ensemble=k, steps=steps, sampler=sampler, seed=args.seed))
        print(f"| {sampler} | {steps} | {k} | " + " | ".join(f"{v:.4f}" for v in row[:3]) + f" | {row[3]:.2f} |")
    return 0


def _score(pipe, validation, settings) -> tuple[float, float, float, float]:
    """(AbsRel, delta1, mean uncertainty, seconds per scene) of ``settings`` on the scenes."""
    from jointnet_jax.evaluation.depth import depth_metrics

    rows, spread, start = [], [], time.perf_counter()
    for caption, image, gt in validation:
        r = pipe.depth(image, prompt=caption, **settings)
        rows.append(depth_metrics(r["depth"], gt))
        spread.append(float(r["uncertainty"].mean()))
    absrel, delta1 = (float(np.mean([m[key] for m in rows])) for key in ("absrel", "delta1"))
    return absrel, delta1, float(np.mean(spread)), (time.perf_counter() - start) / len(validation)


if __name__ == "__main__":
    sys.exit(main())
