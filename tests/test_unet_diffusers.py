"""The UNet port against diffusers 0.42 (torch) with random weights saved by diffusers itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import jointnet_jax as jj
from jointnet_jax.models.functional import compiled
from tests.conftest import nhwc

SD2_STYLE = dict(  # linear projections, per-level head counts (diffusers' attention_head_dim quirk)
    block_out_channels=(8, 16, 16, 16),
    attention_head_dim=(2, 4, 4, 4),
    use_linear_projection=True,
    norm_num_groups=4,
    cross_attention_dim=32,
)
SD1_STYLE = dict(  # conv projections, 8 heads everywhere, upcast attention
    block_out_channels=(16, 32, 32, 32),
    attention_head_dim=8,
    use_linear_projection=False,
    norm_num_groups=8,
    cross_attention_dim=24,
    upcast_attention=True,
)


def _torch_unet(tmp_path, seed, **kw):
    torch.manual_seed(seed)
    model = TorchUNet(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        **kw,
    ).eval()
    with torch.no_grad():  # random norm affine parameters, so that they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize(
    "style,size",
    [(SD2_STYLE, (16, 16)), (SD2_STYLE, (13, 11)), (SD1_STYLE, (16, 16)), (SD1_STYLE, (10, 15))],
    ids=["sd2", "sd2-odd", "sd1", "sd1-odd"],
)
def test_unet_matches_diffusers(tmp_path, style, size):
    torch_model = _torch_unet(tmp_path, 0, **style)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, *size), dtype=np.float32)
    t = np.array([3, 870])
    text = rng.standard_normal((2, 7, style["cross_attention_dim"]), dtype=np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
    ours = compiled(jj.load_unet(tmp_path))(nhwc(x), t, text)
    assert ours.shape == nhwc(ref).shape
    np.testing.assert_allclose(np.asarray(ours), nhwc(ref), atol=1e-4, rtol=0)
