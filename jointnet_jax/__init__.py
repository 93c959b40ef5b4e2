"""JointNet (ICLR 2024) in JAX/Flax NNX."""

from jointnet_jax.models.clip_text import encode_prompts
from jointnet_jax.models.jointnet import JointNet, JointNetBranch
from jointnet_jax.models.loading import load_jointnet, load_text_encoder, load_tokenizer, load_unet, load_vae
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.models.vae import AutoencoderKL
from jointnet_jax.models.weights import WeightsError
from jointnet_jax.pipelines import Pipeline, SampleSettings

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
