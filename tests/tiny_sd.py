"""A tiny SD-2.1-base-shaped model folder (vae/ text_encoder/ tokenizer/ scheduler/ unet/), written by
diffusers and transformers themselves, so that loaders and pipelines are tested against real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jointnet_jax.models.tiny import SCHEDULER, TEXT_DIM, UNET, VAE, write_tokenizer


def _randomise_norms(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))


def make_tiny_base(folder: Path, seed: int = 0) -> Path:
    """Write the folder and return it. Deterministic for a seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = write_tokenizer(folder / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    vae = AutoencoderKL(**{k: v for k, v in VAE.items() if not k.startswith("_")}).eval()
    _randomise_norms(vae, gen)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    unet = UNet2DConditionModel(**{k: v for k, v in UNET.items() if not k.startswith("_")}).eval()
    _randomise_norms(unet, gen)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return folder
