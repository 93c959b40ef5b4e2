"""Direct Extend, the paper's baseline (Fig. 2a, App. A.1): ONE UNet whose conv_in and conv_out are widened
from RGB to RGB + dense channels, then fine-tuned as a whole on the joint data.

The new input weights (and the new output rows) start at zero, so at step 0 the RGB output is exactly the
base model's; but every other weight is shared by both modalities, so training for the dense channels
moves the RGB prediction away from the base (the paper: image quality drops early in training), which is
what JointNet's frozen twin avoids. Same call signature as ``JointNet`` so one objective and one sampling
loop serve both.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jointnet_jax.models import weights
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig


class DirectExtend(nnx.Module):
    def __init__(self, config: UNetConfig, rgb_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not 0 < rgb_channels < config.in_channels or config.in_channels != config.out_channels:
            raise ValueError(
                f"a Direct Extend UNet needs in == out channels > rgb_channels ({config.in_channels}/"
                f"{config.out_channels} vs {rgb_channels})"
            )
        self.unet = UNet2DConditionModel(config, dtype=dtype, rngs=rngs)
        self.rgb_channels = rgb_channels

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, dense_channels: int) -> DirectExtend:
        base = unet.config
        if base.in_channels != base.out_channels:
            raise ValueError("Direct Extend widens a UNet whose in and out channels match (no learned variance)")
        cfg = base.replace(
            in_channels=base.in_channels + dense_channels, out_channels=base.out_channels + dense_channels
        )

        def widen(key, value):
            if key == "conv_in.weight":  # (O, I, kh, kw): zero columns for the dense input
                return np.concatenate(
                    [value, np.zeros((value.shape[0], dense_channels, *value.shape[2:]), value.dtype)], 1
                )
            if key in ("conv_out.weight", "conv_out.bias"):  # zero rows for the dense output
                return np.concatenate([value, np.zeros((dense_channels, *value.shape[1:]), value.dtype)])
            return value

        model = weights.abstract(lambda: cls(cfg, base.in_channels, dtype=unet.dtype, rngs=nnx.Rngs(0)))
        tensors = {f"unet.{k}": widen(k, v) for k, v in weights.state_tensors(unet)}
        return weights.fill(model, tensors, source="base UNet")

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def channels(self) -> tuple[int, int]:
        return self.rgb_channels, self.unet.config.in_channels - self.rgb_channels

    masked_input = False

    def __call__(self, x_rgb, x_dense, t, text, cond_rgb=None, cond_dense=None):
        if cond_rgb is not None or cond_dense is not None:
            raise ValueError("Direct Extend has no masked-latent input; cond_rgb/cond_dense must be None")
        out = self.unet(jnp.concatenate([x_rgb, x_dense.astype(x_rgb.dtype)], axis=-1), t, text)
        return out[..., : self.rgb_channels], out[..., self.rgb_channels :]

    def set_remat(self, enabled: bool = True):
        self.unet.set_remat(enabled)

    def save(self, path) -> None:
        """A diffusers UNet folder with the widened channels (``rgb_channels`` recorded in config.json)."""
        weights.save_folder(
            self.unet, Path(path) / "unet", {**self.unet.config.to_dict(), "rgb_channels": self.rgb_channels}
        )
