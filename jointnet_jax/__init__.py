"""JointNet (ICLR 2024) in JAX/Flax NNX."""

from jointnet_jax.models.jointnet import JointNet, JointNetBranch
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.pretrained import load_jointnet, load_unet
from jointnet_jax.weights import WeightsError

__all__ = [
    "JointNet",
    "JointNetBranch",
    "UNet2DConditionModel",
    "UNetConfig",
    "WeightsError",
    "load_jointnet",
    "load_unet",
]
