"""Panorama coherence (paper §5.3, Table 2): intra-LPIPS and wall time per panorama for non-tiled
generation, MultiDiffusion and our tiling (with the official full-canvas full view and with the paper's
resized one), over a prompt list.

Intra-LPIPS (SyncDiffusion's protocol, Lee et al. 2023): the panorama is cut into non-overlapping square
crops as high as the image (4 for 2048x512), LPIPS is computed for every pair (6) and averaged; lower means
more coherent. The distance is injectable; ``lpips_distance`` wraps the ``lpips`` package (which needs
torchvision) and loads its whole state dict (backbone + linear heads) from a local file, because nothing
may be downloaded at run time: write it once with ``torch.save(lpips.LPIPS(net='alex').state_dict(), path)``.

    jointnet-evaluate panorama --base SD21 --model JOINTNET --prompts-file prompts.txt \\
        --samples 20 --lpips-weights alex_full.pth --out table2.json
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

# Table 2 row -> (tiling preset, overrides). "ours (resized full view)" is the paper's wording of the full
# view (the canvas resized to one tile); "ours" follows the official code (the full canvas).
METHODS = {
    "non-tiled": ("none", {}),
    "multidiffusion": ("multidiffusion", {}),
    "ours": ("ours", {}),
    "ours (resized full view)": ("ours", {"full_view_resize": True}),
}
# Smallest crop side each ``lpips`` backbone accepts (measured; smaller crops pool to nothing).
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}


def crops(image) -> list[np.ndarray]:
    """Non-overlapping square crops (side = image height) from the left edge of an (H, W, 3) panorama."""
    side = image.shape[0]
    return [image[:, k * side : (k + 1) * side] for k in range(image.shape[1] // side)]


def intra_lpips(image, distance) -> float:
    """Mean ``distance(a, b)`` over all pairs of crops (a distance takes two (S, S, 3) images in [0, 1])."""
    pairs = list(itertools.combinations(crops(image), 2))
    if not pairs:
        raise ValueError(f"intra-LPIPS needs an image at least twice as wide as high; got {image.shape[:2]}")
    return float(np.mean([distance(a, b) for a, b in pairs]))


def write_random_lpips_weights(path, net: str = "alex", seed: int = 0) -> Path:
    """A seeded random LPIPS state dict for plumbing runs (tests, tiny benchmarks); the linear heads are made
    non-negative, as trained LPIPS keeps them, so distances stay >= 0. Meaningless as a perceptual metric."""
    import lpips
    import torch

    torch.manual_seed(seed)
    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lin"):
                p.abs_()
    torch.save(model.state_dict(), path)
    return Path(path)


def lpips_distance(weights, net: str = "alex"):
    """LPIPS from the ``lpips`` package with every weight read from ``weights`` (a full state dict)."""
    try:
        import lpips
        import torch
    except ImportError as e:
        raise ImportError("intra-LPIPS needs the lpips package (and torchvision); pip install lpips") from e
    if not Path(weights).is_file():
        raise FileNotFoundError(f"LPIPS weights {weights} do not exist")
    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval()
    model.load_state_dict(torch.load(weights, map_location="cpu"))

    def distance(a, b):
        if min(a.shape[:2]) < LPIPS_MIN_SIDE.get(net, 0):
            raise ValueError(
                f"LPIPS ({net}) needs crops of at least {LPIPS_MIN_SIDE[net]} px; these are {a.shape[0]}x{a.shape[1]} "
                "(the panorama's height): generate a larger panorama"
            )
        a, b = (torch.from_numpy(np.array(x, np.float32)).permute(2, 0, 1)[None] * 2 - 1 for x in (a, b))
        with torch.no_grad():
            return float(model(a, b))

    return distance


def markdown_table(results: dict) -> str:
    """Table 2's rows: time per panorama and intra-LPIPS per method."""
    rows = [
        f"| {m} | {r['time_s']:.2f} | {r['intra_lpips'] if r['intra_lpips'] is not None else '-'} |"
        for m, r in results.items()
    ]
    return "\n".join(["| setting | time per panorama (s) | intra-LPIPS |", "|---|---|---|", *rows])


def evaluate(pipe, prompts, samples: int, distance=None, **settings) -> dict:
    """Per method: wall time per panorama (after a compile run) and intra-LPIPS (when ``distance`` is
    given), averaged over ``samples`` seeds per prompt."""
    results = {}
    for method, (mode, overrides) in METHODS.items():
        tiling = pipe.native_tiling(mode, **overrides)
        pipe.panorama(prompts[0], tiling=tiling, progress=False, **settings)  # compile
        times, scores = [], []
        for prompt, seed in itertools.product(prompts, range(samples)):
            start = time.perf_counter()
            out = pipe.panorama(prompt, tiling=tiling, seed=seed, progress=False, **settings)
            times.append(time.perf_counter() - start)
            if distance is not None:
                scores.append(intra_lpips(out["rgb"][0], distance))
        results[method] = {
            "time_s": float(np.mean(times)),
            "intra_lpips": float(np.mean(scores)) if scores else None,
            "panoramas": len(times),
        }
    return results
