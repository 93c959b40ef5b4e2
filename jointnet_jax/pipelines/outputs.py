"""The sample file layout written by the sampling CLI and the notebooks, one set of files per sample ``i``:

* ``{i:04d}_rgb.png``: 8-bit RGB;
* ``{i:04d}_depth.png``: 16-bit normalised inverse depth (near = bright) and ``{i:04d}_depth_color.png``, a
  Turbo preview; or ``{i:04d}_normal.png`` (8-bit) for normals;
* ``{i:04d}.npz``: float32 ``rgb`` and ``depth`` / ``normal`` in [0, 1];
* ``{i:04d}.json``: the run's record (task, settings, model paths, inputs) plus this sample's prompt.

Predictions from photos (``sample depth``, ``pipelines/photos.py``) are named by the photo's stem instead,
at the photo's size: ``{stem}_depth.png`` (16-bit) and ``{stem}_depth_color.png``, or ``{stem}_normal.png``;
``{stem}.npy`` (float32, HW depth or HW3 normals in [0, 1]); ``{stem}_uncertainty.png`` (16-bit, the
ensemble's per-pixel deviation in the map's own [0, 1] units; only with ``--ensemble`` > 1) and
``{stem}.json`` (the run's record, this photo's input, sizes and seed).

Every file is written atomically (a temporary name, then renamed), and each sample's files are written
under an exclusive lock on the folder (``flock`` of the folder itself, so no lock file is left behind): two
runs writing the same folder at once leave every file complete and every sample's files from one run (the
one that wrote it last), never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np

from jointnet_jax import io_utils


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive ``flock`` on ``folder`` (waiting for any other holder, in this or another process)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_outputs(out_dir, result: dict, prompts: list[str], record: dict, modality: str) -> list[Path]:
    """Write every sample of ``result`` (a ``Pipeline`` output); returns the per-sample path stems."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        stem = out_dir / f"{i:04d}"
        with folder_lock(out_dir):
            io_utils.write_png_rgb(f"{stem}_rgb.png", result["rgb"][i])
            arrays = {"rgb": result["rgb"][i], modality: result[modality][i]}
            write_dense_previews(stem, result[modality][i], modality)
            io_utils.write_npz(f"{stem}.npz", {k: np.asarray(v, np.float32) for k, v in arrays.items()})
            io_utils.write_json(f"{stem}.json", {**record, "prompt": prompt, "index": i})
        written.append(stem)
    return written


def write_dense_previews(stem, dense, modality: str) -> None:
    """``{stem}_depth.png`` (16-bit) and ``{stem}_depth_color.png`` (Turbo), or ``{stem}_normal.png`` (8-bit)."""
    if modality == "depth":
        io_utils.write_png_depth16(f"{stem}_depth.png", dense)
        io_utils.write_depth_color(f"{stem}_depth_color.png", dense)
    else:
        io_utils.write_png_rgb(f"{stem}_normal.png", dense)


def write_prediction(out_dir, stem: str, result: dict, record: dict, modality: str) -> Path:
    """Write one photo's prediction (a ``photos.predict`` result) as ``{stem}_*``; returns the path stem."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stem
    with folder_lock(out_dir):
        write_dense_previews(path, result[modality], modality)
        io_utils.write_npy(f"{path}.npy", np.asarray(result[modality], np.float32))
        if record["ensemble"] > 1:
            io_utils.write_png_depth16(f"{path}_uncertainty.png", result["uncertainty"])
        io_utils.write_json(f"{path}.json", record)
    return path
