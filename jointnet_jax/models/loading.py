"""Every ``load_*``: diffusers/transformers model folders and the official JointNet layout, from a local
folder or a Hub id (``models.hub``), through the strict, lazy weight reader of ``models.weights``.

Each loader builds the model on abstract shapes from the folder's own ``config.json`` and fills it tensor by
tensor. Key layouts that differ between checkpoint generations are mapped here: legacy VAE attention names,
transformers-4 vs -5 text-encoder prefixes, and the official JointNet's optional masked-latent conv.
"""

from __future__ import annotations

import re
import warnings

import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models import hub, weights
from jointnet_jax.models.clip_text import POSITION_IDS, PREFIX, CLIPTextConfig, CLIPTextModel
from jointnet_jax.models.jointnet import BRANCHES, EXCHANGE_PREFIX, JointNet
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.models.vae import AutoencoderKL, VAEConfig

MASKED_CONV = "jointnet_masked_latent_conv."
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _config(kind, folder, raw: dict | None = None):
    """``kind.from_dict`` of ``folder/config.json``, its errors naming the file."""
    raw = weights.read_config(folder) if raw is None else raw
    try:
        return kind.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None


def load_unet(
    path, subfolder=None, *, dtype=jnp.float32, variant=None, param_dtype=None, sharding=None
) -> UNet2DConditionModel:
    """A diffusers ``UNet2DConditionModel`` folder (config.json + weights): a local folder or a Hub id such as
    ``stabilityai/stable-diffusion-2-1-base/unet`` (``models.hub``). ``variant="fp16"`` reads the
    half-precision files; parameters are float32 unless ``param_dtype`` says otherwise. Exchange layers of an
    official JointNet branch folder are not part of a plain UNet and are ignored."""
    path = hub.resolve(path, subfolder, what="UNet folder")
    config = _config(UNetConfig, path)
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
    rgb, dense = (_config(UNetConfig, path / n, configs[n]) for n in BRANCHES)
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


def _rename_legacy_attention(key: str) -> str:
    """Pre-0.14 diffusers VAE checkpoints name the attention projections query/key/value/proj_attn."""
    m = _LEGACY_ATTENTION.search(key)
    if m is None:
        return key
    return f"{key[: m.start()]}{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}"


def load_vae(
    path, subfolder=None, *, dtype=jnp.float32, variant=None, param_dtype=None, sharding=None
) -> AutoencoderKL:
    """A diffusers ``vae/`` folder (config.json + weights; a local folder or a Hub id, see ``models.hub``),
    legacy attention names included."""
    path = hub.resolve(path, subfolder, what="VAE folder")
    if not path.is_dir():
        raise FileNotFoundError(f"VAE folder {path} does not exist")
    config = _config(VAEConfig, path)
    model = weights.abstract(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return weights.load_folder(
        model, path, variant=variant, rename=_rename_legacy_attention, sharding=sharding, param_dtype=param_dtype
    )


def load_text_encoder(
    path, subfolder=None, *, dtype=jnp.float32, variant=None, param_dtype=None, sharding=None
) -> CLIPTextModel:
    """A transformers ``text_encoder/`` folder (config.json + model.safetensors or pytorch_model.bin; a local
    folder or a Hub id, see ``models.hub``)."""
    path = hub.resolve(path, subfolder, what="text encoder folder")
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder {path} does not exist")
    config = _config(CLIPTextConfig, path)
    model = weights.abstract(lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return weights.load_folder(
        model,
        path,
        stem="model",
        variant=variant,
        param_dtype=param_dtype,
        rename=lambda k: k if k.startswith(PREFIX) else PREFIX + k,
        ignore_unexpected=lambda k: k == POSITION_IDS,
        sharding=sharding,
    )


def load_tokenizer(path, subfolder=None):
    """The ``tokenizer/`` folder of a Stable Diffusion checkpoint as a transformers ``CLIPTokenizer`` (a local
    folder or a Hub id)."""
    from transformers import CLIPTokenizer

    path = hub.resolve(path, subfolder, what="tokenizer folder")
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    return CLIPTokenizer.from_pretrained(str(path))


def check_compatible(model, vae, text_encoder, *, model_name, base) -> None:
    """A model and a base must agree on the text width (every branch's ``cross_attention_dim`` against the
    text encoder's ``hidden_size``) and on the RGB latent channels (the VAE's ``latent_channels``, or 3 for a
    pixel-space base without vae/). Checked at load time, so a mismatch is one sentence naming both folders
    rather than a shape error in the first forward pass."""
    width = text_encoder.config.hidden_size
    branches = [b for b in (getattr(model, "unet", model), getattr(model, "jointnet", None)) if b is not None]
    for branch in branches:
        if branch.config.cross_attention_dim != width:
            raise ValueError(
                f"model {model_name} expects text embeddings of width {branch.config.cross_attention_dim}, but "
                f"the text encoder of base {base} gives {width}; use the base the model was trained with"
            )
    latent = 3 if vae is None else vae.config.latent_channels
    source = f"the VAE of base {base}" if vae is not None else f"base {base} (pixel space: no vae/)"
    if model.channels[0] != latent:
        raise ValueError(
            f"model {model_name} takes {model.channels[0]} RGB channels, but {source} gives {latent}; use the "
            "base the model was trained with"
        )
