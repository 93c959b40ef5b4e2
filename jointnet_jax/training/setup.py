"""What a run trains, and the frozen parts it trains with: the base folder, the stage's model, its trainable /
frozen split, the codecs and the text encoder, each as an NNX (graphdef, state) pair ready for ``jax.jit``.

The model of a stage (``stages.py``): stage 0 the base UNet alone; otherwise a ``JointNet`` from
``init_from`` (an official-layout JointNet) or with both branches copied from the base UNet, or with
``model="direct_extend"`` the paper's Direct Extend baseline (one widened UNet). ``vae="none"`` trains in
pixel space (no VAE; depth 1 channel, normals 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax import sharding as sh
from jointnet_jax.diffusion.schedule import NoiseSchedule, load_schedule
from jointnet_jax.models import hub
from jointnet_jax.models.clip_text import tokenize
from jointnet_jax.models.direct_extend import DirectExtend
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.loading import (
    check_compatible,
    load_jointnet,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
)
from jointnet_jax.models.tiny import UNETS, ensure_tiny_base
from jointnet_jax.training.partition import split_trainable
from jointnet_jax.training.stages import get_stage

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
MODELS = ("jointnet", "direct_extend")
BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def pixel_space(config) -> bool:
    if config.vae not in ("", "none"):
        raise ValueError(f"config.vae must be '' (the base's vae/) or 'none' (pixel space), not {config.vae!r}")
    return config.vae == "none"


def dense_channels(config) -> int | None:
    """The dense branch's channels: the base's latent channels (None) with a VAE; 1 for depth and 3 for
    normals in pixel space."""
    if not pixel_space(config):
        return None
    return 1 if config.modality == "depth" else 3


def tiny_unet_config(config) -> dict:
    """``config.tiny_unet``: a name of ``models.tiny.UNETS`` or a dict of UNet config overrides; a
    pixel-space tiny base denoises RGB images (3 channels)."""
    value = config.tiny_unet
    if isinstance(value, str):
        if value not in UNETS:
            raise ValueError(f"unknown tiny_unet {value!r}; expected one of {', '.join(UNETS)} or a dict")
        value = UNETS[value]
    unet = dict(value.to_dict() if hasattr(value, "to_dict") else value)
    return {**unet, "in_channels": 3, "out_channels": 3} if pixel_space(config) else unet


def resolve_base(config, workdir: Path) -> Path:
    """``config.base``: a local folder or a Hub id (``models.hub``); ``"tiny"`` means a tiny random SD-shaped
    base written once into the workdir by process 0 (CPU configs)."""
    if config.base == "tiny":
        path = workdir / "tiny_base"
        if jax.process_index() == 0:
            ensure_tiny_base(path, unet=tiny_unet_config(config), vae=not pixel_space(config))
        sh.sync_processes("tiny_base")
        return path
    path = hub.resolve(config.base, what="base model folder (config.base)", subfolders=BASE_SUBFOLDERS)
    if not path.is_dir():
        raise FileNotFoundError(f"base model folder {path} does not exist (config.base)")
    return path


def build_model(config, base: Path, dtype):
    """The stage's model (see the module docstring); stage 3 adds the zero-initialised masked-latent conv if
    the starting model lacks it."""
    stage = get_stage(config.stage)
    if config.model not in MODELS:
        raise ValueError(f"config.model must be one of {', '.join(MODELS)}, not {config.model!r}")
    if stage.base:
        model = load_unet(base / "unet", dtype=dtype)
    elif config.model == "direct_extend":
        if stage.masks:
            raise ValueError("Direct Extend has no masked-latent input; train it with stage 1 or 2")
        unet = load_unet(base / "unet", dtype=dtype)
        model = DirectExtend.from_unet(unet, dense_channels(config) or unet.config.in_channels)
    elif config.init_from:
        model = load_jointnet(config.init_from, dtype=dtype)
    else:
        model = JointNet.from_unet(load_unet(base / "unet", dtype=dtype), dense_channels=dense_channels(config))
    if stage.masks and not model.masked_input:
        model.add_masked_latent_conv()
    if config.remat:
        model.set_remat(True)
    return model


@dataclass
class Models:
    """The model split for a jitted step (``graphdef`` + trainable + frozen parameters), and the frozen
    codec (None: pixel space) and text encoder as (graphdef, state) pairs."""

    base: Path
    schedule: NoiseSchedule
    channels: tuple[int, ...]  # one entry per branch: (RGB,) for the base UNet, (RGB, dense) for a twin
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    vae_def: nnx.GraphDef | None
    vae_state: nnx.State
    text_def: nnx.GraphDef
    text_state: nnx.State
    tokenizer: object

    def scaling_factor(self) -> float:
        """The VAE's latent scaling factor (the cached loss scales posterior samples by it)."""
        if self.vae_def is None:
            raise ValueError("data.latents needs a VAE: pixel-space training (vae: none) has nothing to cache")
        return float(nnx.merge(self.vae_def, self.vae_state).scaling_factor)

    def uncond_embedding(self):
        """The empty prompt's text embedding (1, L, D), the target of text drop."""
        text_encoder = nnx.merge(self.text_def, self.text_state)
        return text_encoder(jnp.asarray(tokenize(self.tokenizer, [""]), jnp.int32))


def build_models(config, workdir: Path) -> Models:
    """Everything a run's model side needs, on the host (the trainer places it on the mesh)."""
    dtype = DTYPES[config.compute_dtype]
    base = resolve_base(config, workdir)
    model = build_model(config, base, dtype)
    graphdef, trainable, frozen = split_trainable(model, config.stage)
    vae = None if pixel_space(config) else load_vae(base / "vae", dtype=dtype)
    text_encoder = load_text_encoder(base / "text_encoder", dtype=dtype)
    check_compatible(model, vae, text_encoder, model_name=config.init_from or base / "unet", base=base)
    vae_def, vae_state = (None, nnx.State({})) if vae is None else nnx.split(vae)
    text_def, text_state = nnx.split(text_encoder)
    return Models(
        base,
        load_schedule(base / "scheduler"),
        model.channels,
        graphdef,
        trainable,
        frozen,
        vae_def,
        vae_state,
        text_def,
        text_state,
        load_tokenizer(base / "tokenizer"),
    )
