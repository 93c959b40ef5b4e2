"""Table 2 (paper §5.3) plumbing run: non-tiled vs MultiDiffusion vs our tiling on a tiny random model,
through ``jointnet-evaluate panorama``.

    python benchmarks/table2.py --work runs/table2 --steps 20 --samples 2 --prompt "a beach" --prompt "a room"

Builds in ``--work`` (reused when present, so delete it to change ``--tile``): a tiny base with the 2-level
UNet whose native tile is ``--tile`` latent pixels (the panorama is then 1 x 4 tiles, like 2048x512 for
SD2.1-base), its JointNet twin, and random LPIPS (alex) weights with the linear heads made non-negative as in
trained LPIPS (``clamp_weights``), so distances are >= 0. Every weight is random: the intra-LPIPS numbers say
nothing about coherence; the wall times per panorama and their ratios do measure the methods' cost. AlexNet
needs crops of at least 31 px, hence the default tile of 32 latent (64 px high panoramas with the tiny VAE's
factor 2).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("a beach with palm trees", "a living room", "a city street at night")


def build(work: Path, tile: int) -> tuple[Path, Path, Path]:
    """(base, twin, LPIPS weights) in ``work``, written on first use."""
    import jointnet_jax as jj
    from jointnet_jax.models.tiny import UNET_2LEVEL, ensure_tiny_base

    base = ensure_tiny_base(work / "base", unet={**UNET_2LEVEL, "sample_size": tile})
    twin = work / "twin"
    if not (twin / "jointnet" / "config.json").is_file():
        jj.JointNet.from_unet(jj.load_unet(base / "unet")).save(twin)
    weights = work / "lpips_alex_random.pth"
    if not weights.is_file():
        from jointnet_jax.evaluation.panorama import write_random_lpips_weights

        write_random_lpips_weights(weights)
    return base, twin, weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--tile", type=int, default=32, help="native tile of the tiny UNet, latent pixels")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=3, help="seeds per prompt")
    p.add_argument("--prompt", action="append", help=f"default: {', '.join(PROMPTS)}")
    args = p.parse_args(argv)
    from jointnet_jax import evaluate

    base, twin, weights = build(args.work, args.tile)
    height = 2 * args.tile  # the tiny VAE's factor
    print(f"host {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the start", flush=True)
    prompts = [x for prompt in args.prompt or PROMPTS for x in ("--prompt", prompt)]
    rc = evaluate.main(
        ["panorama", "--base", str(base), "--model", str(twin), *prompts, "--samples", str(args.samples)]
        + ["--steps", str(args.steps), "--height", str(height), "--width", str(4 * height)]
        + ["--lpips-weights", str(weights), "--out", str(args.work / "table2.json")]
    )
    print(f"load {os.getloadavg()[0]:.2f} at the end")
    return rc


if __name__ == "__main__":
    sys.exit(main())
