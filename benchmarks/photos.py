"""``sample depth`` over a folder of 16 mixed-size photos, end to end (read, resize, sample, resize back,
write), on a tiny random model: the first call (compiles included) and a warm second call in the same
process, files per second and the number of loop compiles.

    python benchmarks/photos.py --work runs/bench_photos [--steps 10] [--batch-size 4]

The photos are random JPEG/PNGs at four aspect ratios (NYU 640x480, KITTI 1242x375, a portrait phone frame
480x640 and a square 512x512), four of each, so the folder runs at four processing sizes. The model is the
2-level UNet twin on the tiny SD base (``models/tiny.py``), native size 16 px; the figures measure the
plumbing and the batching, not SD2.1's compute. A 1024x1024 float32 matmul is timed in the same run as the
machine's reference figure. The warm call reuses the first call's loaded pipeline (its compiled VAE and text
encoder), as a notebook or a long-running process does; a new CLI process compiles again (or reads JAX's
persistent compilation cache when ``JAX_COMPILATION_CACHE_DIR`` is set).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(480, 640), (375, 1242), (640, 480), (512, 512)]


def build(work: Path) -> tuple[Path, Path, Path]:
    from PIL import Image

    import jointnet_jax as jj
    from jointnet_jax.models.tiny import UNET_2LEVEL, ensure_tiny_base

    base = ensure_tiny_base(work / "base", unet=UNET_2LEVEL)
    twin = work / "twin"
    if not (twin / "jointnet" / "config.json").is_file():
        jj.JointNet.from_unet(jj.load_unet(base / "unet")).save(twin)
    photos = work / "photos"
    if not photos.is_dir():
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(16):
            h, w = SHAPES[i % len(SHAPES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                photos / f"p{i:02d}.{'jpg' if i % 2 else 'png'}"
            )
    return base, twin, photos


def matmul_reference() -> float:
    """The machine's reference figure (``training.metrics.matmul_reference_s``): one 1024² fp32 matmul, in s."""
    from jointnet_jax.training.metrics import matmul_reference_s

    return matmul_reference_s()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    import jax

    from jointnet_jax import sample
    from jointnet_jax.models.jointnet import JointNet
    from jointnet_jax.pipelines import Pipeline

    base, twin, photos = build(args.work)
    traces, compiles = [], []
    original = JointNet.__call__
    JointNet.__call__ = lambda self, *a, **k: (traces.append(1), original(self, *a, **k))[1]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: (
            compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    # The second call reuses the loaded pipeline (as a long-running process or a notebook does): what is
    # left is the steady-state cost of reading, resizing, sampling and writing.
    loaded, from_pretrained = {}, Pipeline.from_pretrained
    Pipeline.from_pretrained = lambda *a, **k: loaded.setdefault("pipe", from_pretrained(*a, **k))
    print(f"host: this container, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"reference: 1024^2 fp32 matmul {matmul_reference() * 1e3:.2f} ms", flush=True)
    common = ["depth", "--base", str(base), "--model", str(twin), "--image", str(photos), "--steps", str(args.steps)]
    common += ["--batch-size", str(args.batch_size)]
    for name in ("first", "warm"):
        before, compiled, start = len(traces), len(compiles), time.perf_counter()
        assert sample.main([*common, "--out", str(args.work / f"out_{name}")]) == 0
        dt = time.perf_counter() - start
        print(
            f"{name}: 16 photos in {dt:.1f} s = {16 / dt:.2f} photos/s; {len(traces) - before} loop compiles, "
            f"{len(compiles) - compiled} XLA compiles in all ({sum(compiles[compiled:]):.1f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
