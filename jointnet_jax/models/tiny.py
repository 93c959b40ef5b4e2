"""Tiny random-weight Stable-Diffusion-shaped base folders, written in the standard diffusers layout.

It stands in for ``stabilityai/stable-diffusion-2-1-base`` where downloading it is impossible or pointless
(CPU configs, tests, notebooks at tiny size): the same ``vae/ text_encoder/ tokenizer/ scheduler/ unet/``
folders, read by the same loaders. ``python -m jointnet_jax.models.tiny --out DIR`` writes one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from flax import nnx

from jointnet_jax.models import weights
from jointnet_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
from jointnet_jax.models.vae import AutoencoderKL, VAEConfig

TEXT_DIM = 32
UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 2,
    "attention_head_dim": [2, 4, 4, 4],
    "cross_attention_dim": TEXT_DIM,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.18215,
}
# A two-level UNet of the same family: much faster to compile, for CPU training runs and tests.
UNET_2LEVEL = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
}
# A small pixel-space text-to-image UNet (32x32 RGB, DeepFloyd-IF-like): the base model of the CPU demo.
UNET_PIXEL = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [4, 4],
    "norm_num_groups": 8,
}
# ``config.tiny_unet`` of the CPU training configs: overrides of ``UNET`` by name.
UNETS = {"4level": {}, "2level": UNET_2LEVEL, "pixel": UNET_PIXEL}
SCHEDULER = {  # stabilityai/stable-diffusion-2-1-base scheduler_config.json
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def write_tokenizer(folder: Path):
    """A tiny CLIP BPE vocabulary (letters, end-of-word letters, a few merges, the special tokens), saved
    by transformers' ``CLIPTokenizer`` itself so the folder is a real tokenizer folder."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters]
    tokens += [m.replace(" ", "") for m in merges]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    tok.save_pretrained(folder)
    return tok


def text_config(vocab_size: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "projection_dim": TEXT_DIM,
    }


def write_tiny_base(out, *, seed: int = 0, unet: dict | None = None, vae: bool = True) -> Path:
    """Write the folder atomically (built in a temporary sibling, then renamed) and return its path.
    ``unet`` overrides UNet config keys; ``vae=False`` writes a pixel-space base (no vae/; give ``unet``
    3 input and output channels)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rngs = nnx.Rngs(seed)
        tok = write_tokenizer(tmp / "tokenizer")
        text = text_config(len(tok))
        weights.save_folder(
            CLIPTextModel(CLIPTextConfig.from_dict(text), rngs=rngs), tmp / "text_encoder", text, stem="model"
        )
        if vae:
            weights.save_folder(AutoencoderKL(VAEConfig.from_dict(VAE), rngs=rngs), tmp / "vae", VAE)
        unet_cfg = {**UNET, **(unet or {})}
        weights.save_folder(UNet2DConditionModel(UNetConfig.from_dict(unet_cfg), rngs=rngs), tmp / "unet", unet_cfg)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_tiny_base(out, *, seed: int = 0, unet: dict | None = None, vae: bool = True) -> Path:
    """The tiny base at ``out``, written first if it does not exist yet."""
    out = Path(out)
    if (out / "unet" / "config.json").is_file():
        return out
    return write_tiny_base(out, seed=seed, unet=unet, vae=vae)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jointnet_jax.models.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_base(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
