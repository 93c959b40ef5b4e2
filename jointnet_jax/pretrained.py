"""Loading models from diffusers folders and the official JointNet layout (the public ``jj.load_*``)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from flax import nnx

from jointnet_jax import weights
from jointnet_jax.models import hub
from jointnet_jax.models.jointnet import BRANCHES, EXCHANGE_PREFIX, JointNet
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig

MASKED_CONV = "jointnet_masked_latent_conv."


def load_unet(
    path, subfolder=None, *, dtype=jnp.float32, variant=None, param_dtype=None, sharding=None
) -> UNet2DConditionModel:
    """A diffusers ``UNet2DConditionModel`` folder (config.json + weights): a local folder or a Hub id such as
    ``stabilityai/stable-diffusion-2-1-base/unet`` (``models.hub``). ``variant="fp16"`` reads the
    half-precision files; parameters are float32 unless ``param_dtype`` says otherwise. Exchange layers of an
    official JointNet branch folder are not part of a plain UNet and are ignored."""
    path = hub.resolve(path, subfolder, what="UNet folder")
    config = UNetConfig.from_dict(weights.read_config(path))
    model = weights.abstract(lambda: UNet2DConditionModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return weights.load_folder(
        model,
        path,
        variant=variant,
        ignore_unexpected=lambda k: k.startswith(EXCHANGE_PREFIX),
        sharding=sharding,
        param_dtype=param_dtype,
    )


def load_jointnet(path, *, dtype=jnp.float32, variant=None, param_dtype=None, sharding=None) -> JointNet:
    """The official layout: ``path/unet/`` (RGB branch) and ``path/jointnet/`` (dense branch); a local folder
    or a Hub id (``models.hub``), with ``variant`` and ``param_dtype`` as for ``load_unet``.

    ``has_masked_latent_input`` in the configs decides whether the masked-latent conv exists (as in the
    official loader). Weights for it under a false flag are reported with a warning and not loaded.
    """
    path = hub.resolve(path, what="JointNet folder", subfolders=BRANCHES, variant=variant)
    if not path.is_dir():
        raise FileNotFoundError(f"JointNet folder {path} does not exist")
    configs, readers = {}, {}
    for name in BRANCHES:
        configs[name] = weights.read_config(path / name)
        readers[name] = weights.TensorReader(weights.checkpoint_files(path / name, variant=variant))
    flags = {n: bool(c.get("has_masked_latent_input", False)) for n, c in configs.items()}
    if flags["unet"] != flags["jointnet"]:
        raise ValueError(f"{path}: has_masked_latent_input differs between unet/ and jointnet/ ({flags})")
    masked = flags["unet"]
    dropped = sorted(f"{n}/{k}" for n, r in readers.items() for k in r.keys() if k.startswith(MASKED_CONV))
    if dropped and not masked:
        warnings.warn(
            f"{path}: config says has_masked_latent_input=false but the weights contain {', '.join(dropped)}; "
            "following the flag (as the official loader does), these weights are NOT loaded. Set the flag to "
            "true in both config.json files to use them.",
            stacklevel=2,
        )
    rgb, dense = (UNetConfig.from_dict(configs[n]) for n in BRANCHES)
    model = weights.abstract(
        lambda: JointNet(
            rgb,
            dense,
            rgb_joint_in=configs["unet"].get("joint_in_channels"),
            dense_joint_in=configs["jointnet"].get("joint_in_channels"),
            masked_input=masked,
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
    )
    return weights.fill(
        model,
        weights.PrefixedReader(readers),
        source=str(path),
        ignore_unexpected=(lambda k: k.split(".", 1)[1].startswith(MASKED_CONV)) if not masked else None,
        sharding=sharding,
        param_dtype=param_dtype,
    )
