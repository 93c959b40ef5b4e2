"""A tiny SD-2.1-base-shaped model folder (vae/ text_encoder/ tokenizer/ scheduler/ unet/), written by
diffusers and transformers themselves, so that loaders and pipelines are tested against real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32  # = the official fixture's cross_attention_dim, so the fixture JointNet runs on this base

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    attention_head_dim=(2, 4, 4, 4),
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=4,
    use_linear_projection=True,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)
SCHEDULER = dict(  # stabilityai/stable-diffusion-2-1-base scheduler_config.json
    _class_name="DDIMScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)


def write_tokenizer(folder: Path):
    """A tiny CLIP BPE vocabulary: letters, end-of-word letters, a few merges, and the special tokens."""
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
    vae = AutoencoderKL(**VAE).eval()
    _randomise_norms(vae, gen)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    unet = UNet2DConditionModel(**UNET).eval()
    _randomise_norms(unet, gen)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return folder
