"""What a run leaves behind besides checkpoints: the exported model and the fixed-prompt sample grids.

Exports (process 0 writes; written aside, then renamed): a JointNet in the official layout; Direct Extend as
one widened ``unet/``; the base UNet of stage 0 as a complete base folder (the base's text_encoder/
tokenizer/ scheduler/ [vae/] with the trained unet/), which is the ``base`` of a later stage 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from jointnet_jax import sharding as sh
from jointnet_jax.io_utils import image_grid, write_png_rgb
from jointnet_jax.models import weights
from jointnet_jax.models.unet import UNet2DConditionModel


def export_model(model, path: Path, base: Path) -> Path:
    """Write ``model`` to ``path`` (see the module docstring); every process returns after the write."""
    path = Path(path)
    if jax.process_index() == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(model, UNet2DConditionModel):  # one branch: a whole base folder around it
            shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("unet"))
            weights.save_folder(model, tmp / "unet", model.config.to_dict())
        else:
            model.save(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    sh.sync_processes("export")
    return path


def sample_grid(pipe, config, branches: int) -> np.ndarray:
    """Fixed-prompt, fixed-seed samples as one grid: a row per prompt, RGB | dense (RGB only for one branch)."""
    out = pipe.generate(
        list(config.sample_prompts),
        steps=config.sample_steps,
        seed=0,
        progress=False,
        height=config.data.resolution,
        width=config.data.resolution,
    )
    dense = out["depth"][..., None].repeat(3, -1) if config.modality == "depth" else out["normal"]
    return image_grid([out["rgb"], dense][:branches])


def write_sample_grid(grid: np.ndarray, workdir: Path, step: int) -> Path:
    path = Path(workdir) / "samples" / f"{step:07d}.png"
    if jax.process_index() == 0:
        path.parent.mkdir(exist_ok=True)
        write_png_rgb(path, grid)
    return path
