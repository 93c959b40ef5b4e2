"""Which parameters train in each stage (paper §3.4).

Stage 1: the RGB branch's base parameters are frozen; the dense branch and the exchange layers of BOTH
branches train (the masked-latent conv too, when present; the official ``freeze_main_unet`` would freeze a
conv added after construction, see docs/official-differences.md). Stages 2 and 3 train everything, and so does
stage 0 (the base UNet) and the Direct Extend baseline (one shared UNet: there is nothing to freeze). The
split is done with ``nnx.split``, so frozen parameters are not differentiated and get no optimizer state.
"""

from __future__ import annotations

from flax import nnx

from jointnet_jax.models.jointnet import EXCHANGE_PREFIX, JointNet
from jointnet_jax.training.stages import get_stage


def is_trainable(stage: int):
    """An NNX filter ``(path, value) -> bool`` selecting the trainable parameters of ``stage``."""
    if not get_stage(stage).frozen_rgb:
        return nnx.Param

    def frozen_rgb(path, value):
        if not isinstance(value, nnx.Param):
            return False
        branch, name = str(path[0]), str(path[1]) if len(path) > 1 else ""
        return branch == "jointnet" or name.startswith(EXCHANGE_PREFIX)

    return frozen_rgb


def split_trainable(model: nnx.Module, stage: int):
    """(graphdef, trainable state, frozen state) for ``stage``; only a JointNet has frozen parameters."""
    trainable = is_trainable(stage)
    return nnx.split(model, trainable if isinstance(model, JointNet) else nnx.Param, ...)
