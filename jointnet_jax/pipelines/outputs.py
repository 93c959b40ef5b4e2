"""The sample file layout written by the sampling CLI and the notebooks, one set of files per sample ``i``:

* ``{i:04d}_rgb.png``: 8-bit RGB;
* ``{i:04d}_depth.png``: 16-bit normalised inverse depth (near = bright) and ``{i:04d}_depth_color.png``, a
  Turbo preview; or ``{i:04d}_normal.png`` (8-bit) for normals;
* ``{i:04d}.npz``: float32 ``rgb`` and ``depth`` / ``normal`` in [0, 1];
* ``{i:04d}.json``: the run's record (task, settings, model paths, inputs) plus this sample's prompt.

Every file is written atomically (a temporary name, then renamed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jointnet_jax import io_utils


def write_outputs(out_dir, result: dict, prompts: list[str], record: dict, modality: str) -> list[Path]:
    """Write every sample of ``result`` (a ``Pipeline`` output); returns the per-sample path stems."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        stem = out_dir / f"{i:04d}"
        io_utils.write_png_rgb(f"{stem}_rgb.png", result["rgb"][i])
        arrays = {"rgb": result["rgb"][i], modality: result[modality][i]}
        if modality == "depth":
            io_utils.write_png_depth16(f"{stem}_depth.png", result["depth"][i])
            io_utils.write_depth_color(f"{stem}_depth_color.png", result["depth"][i])
        else:
            io_utils.write_png_rgb(f"{stem}_normal.png", result["normal"][i])
        io_utils.write_npz(f"{stem}.npz", {k: np.asarray(v, np.float32) for k, v in arrays.items()})
        io_utils.write_json(f"{stem}.json", {**record, "prompt": prompt, "index": i})
        written.append(stem)
    return written
