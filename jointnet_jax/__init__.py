"""JointNet (ICLR 2024) in JAX/Flax NNX."""

from jointnet_jax.models.clip_text import encode_prompts, load_text_encoder, load_tokenizer
from jointnet_jax.models.jointnet import JointNet, JointNetBranch
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.models.vae import AutoencoderKL, load_vae
from jointnet_jax.pipelines import Pipeline, SampleSettings
from jointnet_jax.pretrained import load_jointnet, load_unet
from jointnet_jax.weights import WeightsError

__all__ = [
    "AutoencoderKL",
    "JointNet",
    "JointNetBranch",
    "Pipeline",
    "SampleSettings",
    "UNet2DConditionModel",
    "UNetConfig",
    "WeightsError",
    "encode_prompts",
    "load_jointnet",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
]
