"""Model configs are checked on load: a wrong type, a length that does not agree or a size that is not
positive is one sentence naming the key (and the file), never a TypeError from inside the first forward."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import jointnet_jax as jj
from jointnet_jax.models.clip_text import CLIPTextConfig
from jointnet_jax.models.tiny import TEXT_DIM, UNET, VAE
from jointnet_jax.models.unet import UNetConfig
from jointnet_jax.models.vae import VAEConfig


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_out_channels": "8,8,8,16"}, "UNet config key 'block_out_channels' must be a list, got '8,8,8,16'"),
        (
            {"block_out_channels": [8, 8, 8.5, 16]},
            "'block_out_channels': each entry of the value must be an integer, got 8.5 in [8, 8, 8.5, 16]",
        ),
        ({"block_out_channels": [8, 16]}, "UNet config has 2 block_out_channels for 4 down blocks"),
        ({"norm_num_groups": 0}, "'norm_num_groups': the value must be a positive integer, got 0"),
        (
            {"layers_per_block": "2"},
            "'layers_per_block': each entry of the value must be an integer, got '2' in ['2', '2', '2', '2']",
        ),
        ({"cross_attention_dim": True}, "'cross_attention_dim': the value must be an integer, got True"),
        ({"norm_eps": "1e-5"}, "'norm_eps': the value must be a finite number, got '1e-5'"),
        ({"use_linear_projection": 1}, "'use_linear_projection': the value must be true or false, got 1"),
        ({"norm_num_groups": 3}, "block_out_channels [8, 16, 16, 16] are not divisible by norm_num_groups"),
    ],
)
def test_unet_config_values_are_checked(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        UNetConfig.from_dict({**UNET, **change})


def test_vae_and_text_configs_are_checked():
    with pytest.raises(ValueError, match="VAE config key 'latent_channels': the value must be a positive integer"):
        VAEConfig.from_dict({**VAE, "latent_channels": -4})
    with pytest.raises(ValueError, match="VAE config key 'block_out_channels' must be a list"):
        VAEConfig.from_dict({**VAE, "block_out_channels": "8,16"})
    text = {"hidden_size": TEXT_DIM, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 1000}
    assert CLIPTextConfig.from_dict(text).hidden_size == TEXT_DIM
    with pytest.raises(ValueError, match="text encoder config key 'hidden_size': the value must be an integer"):
        CLIPTextConfig.from_dict({**text, "hidden_size": "32"})
    with pytest.raises(ValueError, match="text encoder config key 'layer_norm_eps': .* finite number, got nan"):
        CLIPTextConfig.from_dict({**text, "layer_norm_eps": float("nan")})


def test_a_bad_config_file_is_named(official, tmp_path):
    """Through a loader: the sentence names the config.json it came from."""
    model = tmp_path / "model"
    shutil.copytree(official / "rgbd_finetune", model)
    config_path = model / "jointnet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = ",".join(map(str, config["block_out_channels"]))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{config_path}: UNet config key 'block_out_channels' must be a list"):
        jj.load_jointnet(model)
    config_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"^{config_path} must hold a JSON object, not list$"):
        jj.load_jointnet(model)


def test_a_base_that_does_not_fit_the_model_is_named_at_load(official, tmp_path):
    """Text width 48 against a model expecting 32, and a VAE of 8 latent channels against a 4-channel model:
    one sentence naming both folders, before any forward pass."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig as TorchCLIPTextConfig
    from transformers import CLIPTextModel

    from tests.tiny_sd import make_tiny_base

    base = make_tiny_base(tmp_path / "base")
    model = official / "rgbd_finetune"
    jj.Pipeline.from_pretrained(base, model)  # the matching pair loads
    torch.manual_seed(0)
    wide = tmp_path / "wide"
    shutil.copytree(base, wide)
    shutil.rmtree(wide / "text_encoder")
    text = TorchCLIPTextConfig(
        vocab_size=1000,
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        hidden_act="gelu",
    )
    CLIPTextModel(text).save_pretrained(wide / "text_encoder")
    with pytest.raises(
        ValueError,
        match=rf"^model {model} expects text embeddings of width 32, but the text encoder "
        rf"of base {wide} gives 48",
    ):
        jj.Pipeline.from_pretrained(wide, model)
    deep = tmp_path / "deep"
    shutil.copytree(base, deep)
    shutil.rmtree(deep / "vae")
    AutoencoderKL(**{k: v for k, v in {**VAE, "latent_channels": 8}.items() if not k.startswith("_")}).save_pretrained(
        deep / "vae"
    )
    with pytest.raises(ValueError, match=rf"^model {model} takes 4 RGB channels, but the VAE of base {deep} gives 8"):
        jj.Pipeline.from_pretrained(deep, model)
