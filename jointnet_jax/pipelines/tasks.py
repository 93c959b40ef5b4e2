"""Channel-wise tasks as data: which inputs a task needs, which parts of the joint latent it generates, and
whether it starts from noise or from its inputs (SDEdit).

Every task is a pair of pixel masks (1 = generate, 0 = keep), one per modality, as the official inpainting
pipeline defines them. Image->depth and depth->image are its ``rgb2j``/``j2rgb`` presets: the known side
comes from the input, the generated side starts from a black image (zeros -> -1), exactly as the official
CLI builds it. ``refine`` regenerates both sides from both inputs (SDEdit with strength < 1, official
``jointnet_upsample_pipeline`` preset ``both``); its image-only and depth-only presets are the ``image`` and
``depth`` tasks run from an input on both sides. The official preset names are accepted as aliases.

Nothing downstream branches on a task's name: ``Pipeline.run`` reads a ``Task``'s fields, and the one
compiled loop sees only masks and initial latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUTS = ("image", "depth", "mask", "depth_mask")  # what a task may take, besides prompts
_NAMES = {"mask": "RGB mask", "depth_mask": "depth mask"}


@dataclass(frozen=True)
class Task:
    """``needs``: the inputs that must be given. ``rgb`` / ``dense``: each modality's mask, 1.0 (generate),
    0.0 (keep) or the name of the input holding a pixel mask. ``strength``: "noise" (starts from noise:
    strength must be 1), "sdedit" (starts from the inputs: strength must be below 1) or "any"."""

    name: str
    needs: tuple[str, ...]
    rgb: float | str
    dense: float | str
    strength: str = "any"
    help: str = ""

    def check(self, given: dict, strength: float, modality: str = "depth") -> None:
        """One clear error for a missing input or a strength the task cannot use."""
        missing = [n for n in self.needs if given.get(n) is None]
        if missing:
            names = [modality if n == "depth" else _NAMES.get(n, n) for n in missing]
            raise ValueError(f"task {self.name!r} needs an input {' and '.join(names)}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if strength == 0.0 and not self.has_known:
            raise ValueError(f"strength 0 keeps the inputs as they are, and {self.name} has none")
        if self.strength == "noise" and strength != 1.0:
            raise ValueError(f"strength < 1 needs an input image or depth (SDEdit); {self.name} starts from noise")
        if self.strength == "sdedit" and strength == 1.0:
            raise ValueError(f"{self.name} is SDEdit: give a strength below 1 (official 0.4)")

    @property
    def has_known(self) -> bool:
        """Whether anything is known (encoded from inputs and kept or used as the SDEdit start)."""
        return bool(self.needs)

    def masks(self, batch: int, height: int, width: int, given: dict):
        """(mask_rgb, mask_dense), each (B, H, W) float32 in {0, 1}; 1 = generate."""
        return tuple(self._mask(spec, batch, height, width, given) for spec in (self.rgb, self.dense))

    @staticmethod
    def _mask(spec, batch, height, width, given):
        if isinstance(spec, str):
            return _fit_mask(given[spec], batch, height, width, _NAMES[spec])
        return np.full((batch, height, width), spec, np.float32)


TASKS = {
    t.name: t
    for t in (
        Task("generate", (), 1.0, 1.0, "noise", "text -> RGB + depth"),
        Task("depth", ("image",), 0.0, 1.0, help="image -> depth"),
        Task("image", ("depth",), 1.0, 0.0, help="depth -> image"),
        Task("inpaint", INPUTS, "mask", "depth_mask", help="RGBD editing with separate RGB and depth masks"),
        Task("refine", ("image", "depth"), 1.0, 1.0, "sdedit", help="regenerate both sides from both (SDEdit)"),
    )
}
# The official CLIs' preset names for the same tasks (inpaint and pano-inpaint presets, upsample preset).
ALIASES = {"rgb2j": "depth", "j2rgb": "image", "custom": "inpaint", "both": "refine"}


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    task = TASKS.get(ALIASES.get(name, name))
    if task is None:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join([*TASKS, *ALIASES])}")
    return task


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
