"""The training stages as data (paper §3.4, plus stage 0 for the CPU demo's own base model).

Everything that differs between stages is a field here, so the trainer, the objective and the partition
read a ``Stage`` instead of testing its number:

* ``base``: train the base text-to-image UNet alone, one RGB branch (stage 0: the CPU demo's stand-in for
  SD2.1); otherwise a two-branch model (JointNet, or the Direct Extend baseline);
* ``frozen_rgb``: the RGB branch's base parameters are frozen (stage 1; its exchange layers still train);
* ``masks``: per-example inpainting masks and the masked-latent conv (stage 3).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    number: int
    description: str
    base: bool = False
    frozen_rgb: bool = False
    masks: bool = False


STAGES = {
    s.number: s
    for s in (
        Stage(0, "the base text-to-image UNet alone", base=True),
        Stage(1, "dense branch and exchange layers, RGB branch frozen", frozen_rgb=True),
        Stage(2, "everything"),
        Stage(3, "everything, with inpainting masks and the masked-latent input", masks=True),
    )
}


def get_stage(number: int) -> Stage:
    if number not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(map(str, STAGES))} (0: base model); got {number}")
    return STAGES[number]
