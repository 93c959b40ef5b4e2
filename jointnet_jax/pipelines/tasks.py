"""Channel-wise tasks as data: which parts of the joint latent are generated and which are known.

Every task is a pair of pixel masks (1 = generate, 0 = keep), one per modality, as the official
inpainting pipeline defines them. Image->depth and depth->image are its ``rgb2j``/``j2rgb`` presets: the
known side comes from the input, the generated side starts from a black image (zeros -> -1), exactly as
the official CLI builds it. ``refine`` regenerates both sides from both inputs (SDEdit with strength < 1,
official ``jointnet_upsample_pipeline`` preset ``both``); its image-only and depth-only presets are the
``image`` and ``depth`` tasks run from an input on both sides.
"""

from __future__ import annotations

import numpy as np

TASKS = ("generate", "depth", "image", "inpaint", "refine")


def task_masks(task: str, batch: int, height: int, width: int, mask=None, depth_mask=None):
    """(mask_rgb, mask_dense), each (B, H, W) float32 in {0, 1}; 1 = generate."""
    ones = np.ones((batch, height, width), np.float32)
    if task in ("generate", "refine"):
        return ones, ones
    if task == "depth":
        return 0 * ones, ones
    if task == "image":
        return ones, 0 * ones
    if task == "inpaint":
        if mask is None or depth_mask is None:
            raise ValueError(
                "inpaint needs both --mask (RGB) and --depth-mask (dense); use all-zero masks to keep a side"
            )
        return (
            _fit_mask(mask, batch, height, width, "RGB mask"),
            _fit_mask(depth_mask, batch, height, width, "depth mask"),
        )
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _fit_mask(mask, batch, height, width, name):
    """Binarise at 0.5 (official) and broadcast one mask to the batch; the size must match exactly."""
    m = np.asarray(mask, np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.shape[1:] != (height, width) or m.shape[0] not in (1, batch):
        raise ValueError(f"{name} has shape {m.shape[1:]} but the output is {(height, width)} (H, W)")
    return np.broadcast_to((m > 0.5).astype(np.float32), (batch, height, width)).copy()


def latent_mask(mask, factor: int):
    """Pixel mask (B, H, W) -> latent mask (B, H/f, W/f): the nearest sample at pixel (f*i, f*j), as
    ``F.interpolate(mode='nearest')`` in the official pipeline (not a pooled or centred sample)."""
    return mask[:, ::factor, ::factor]
