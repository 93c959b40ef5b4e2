"""Flax NNX port of diffusers' ``UNet2DConditionModel`` for the Stable Diffusion 1.x / 2.x family.

Configured from the checkpoint's own ``config.json``. The forward pass is split in two halves,
``forward_down`` (time embedding, conv_in, down blocks, mid block) and ``forward_up`` (up blocks and output
head), because JointNet exchanges features between two UNets exactly at that seam (skips and mid output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.config_check import check_fields, check_raw_lists
from jointnet_jax.models.embeddings import TimestepEmbedding, timestep_features
from jointnet_jax.models.layers import conv, group_norm
from jointnet_jax.models.unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock

# Config keys whose non-default values select architectures this port does not implement.
_UNSUPPORTED_UNLESS = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "time_embedding_act_fn": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "encoder_hid_dim_type": None,
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_POSITIVE = (
    *("in_channels", "out_channels", "block_out_channels", "layers_per_block", "heads", "transformer_layers"),
    *("cross_attention_dim", "norm_num_groups", "conv_in_kernel", "conv_out_kernel", "sample_size"),
)
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_level(value, n, name):
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise ValueError(f"UNet config {name!r} has {len(values)} entries for {n} blocks")
    return values


@dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers UNet config, with diffusers' defaults.

    ``raw`` keeps the whole original dict so that an export writes back every field it was given.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    heads: tuple = (8, 8, 8, 8)
    transformer_layers: tuple = (1, 1, 1, 1)
    cross_attention_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    center_input_sample: bool = False
    downsample_padding: int = 1
    sample_size: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        for key, default in _UNSUPPORTED_UNLESS.items():
            if key in d and d[key] != default:
                raise ValueError(f"UNet config sets {key}={d[key]!r}; only {default!r} is supported by this port")
        check_raw_lists("UNet", d, ("down_block_types", "up_block_types", "block_out_channels"))
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _DOWN:
                raise ValueError(f"unsupported down block type {t!r} in UNet config (supported: {sorted(_DOWN)})")
        for t in up:
            if t not in _UP:
                raise ValueError(f"unsupported up block type {t!r} in UNet config (supported: {sorted(_UP)})")
        n = len(down)
        if len(up) != n:
            raise ValueError(f"UNet config has {n} down blocks but {len(up)} up blocks")
        # diffusers: without num_attention_heads, attention_head_dim is (mis)used as the number of heads.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if isinstance(d.get("cross_attention_dim"), list | tuple):
            raise ValueError("per-block cross_attention_dim lists are not supported by this port")
        config = cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=tuple(_per_level(d.get("layers_per_block", 2), n, "layers_per_block")),
            heads=tuple(_per_level(heads, n, "attention_head_dim")),
            transformer_layers=tuple(
                _per_level(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
            ),
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=d.get("upcast_attention", False),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            conv_in_kernel=d.get("conv_in_kernel", 3),
            conv_out_kernel=d.get("conv_out_kernel", 3),
            center_input_sample=d.get("center_input_sample", False),
            downsample_padding=d.get("downsample_padding", 1),
            sample_size=d.get("sample_size"),
            raw=dict(d),
        )
        config.check()
        return config

    def check(self) -> None:
        """Types, positive sizes, one channel count per block, channels divisible by the norm groups."""
        check_fields("UNet", self, positive=_POSITIVE)
        if len(self.block_out_channels) != len(self.down_block_types):
            raise ValueError(
                f"UNet config has {len(self.block_out_channels)} block_out_channels for "
                f"{len(self.down_block_types)} down blocks"
            )
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"UNet config block_out_channels {odd} are not divisible by norm_num_groups")

    def to_dict(self) -> dict:
        """The config as a diffusers config.json dict (the original keys, updated channel counts)."""
        d = dict(self.raw)
        d.update(in_channels=self.in_channels, out_channels=self.out_channels)
        return d

    def replace(self, **kw) -> UNetConfig:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update(kw)
        return UNetConfig(**fields)


class UNet2DConditionModel(nnx.Module):
    """``eps = unet(x, t, text)`` with x (B, h, w, C) NHWC, t (B,) or scalar, text (B, L, D)."""

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        self.remat = False
        ch = c.block_out_channels
        temb = ch[0] * 4
        o = BlockOptions(
            temb_channels=temb,
            groups=c.norm_num_groups,
            eps=c.norm_eps,
            context_dim=c.cross_attention_dim,
            linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
            dtype=dtype,
        )
        if c.downsample_padding != 1:
            raise ValueError("only downsample_padding=1 is supported for UNets")
        self.conv_in = conv(c.in_channels, ch[0], c.conv_in_kernel, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], temb, dtype=dtype, rngs=rngs)
        n = len(ch)
        down = []
        for i, kind in enumerate(c.down_block_types):
            down.append(
                DownBlock(
                    ch[i - 1] if i else ch[0],
                    ch[i],
                    num_layers=c.layers_per_block[i],
                    heads=c.heads[i] if _DOWN[kind] else None,
                    transformer_layers=c.transformer_layers[i],
                    add_downsample=i < n - 1,
                    o=o,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(
            ch[-1], heads=c.heads[-1], transformer_layers=c.transformer_layers[-1], o=o, rngs=rngs
        )
        rch, rheads = ch[::-1], c.heads[::-1]
        rlayers, rtl = c.layers_per_block[::-1], c.transformer_layers[::-1]
        up = []
        for i, kind in enumerate(c.up_block_types):
            up.append(
                UpBlock(
                    rch[min(i + 1, n - 1)],
                    rch[i - 1] if i else rch[0],
                    rch[i],
                    num_layers=rlayers[i] + 1,
                    heads=rheads[i] if _UP[kind] else None,
                    transformer_layers=rtl[i],
                    add_upsample=i < n - 1,
                    o=o,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(ch[0], c.norm_num_groups, c.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[0], c.out_channels, c.conv_out_kernel, dtype=dtype, rngs=rngs)

    def set_remat(self, enabled: bool = True):
        """Rematerialise each down/mid/up block in the backward pass (less memory, ~1/3 more compute)."""
        self.remat = enabled

    def _block(self, block, *args, **static):
        """Call a block, rematerialised when enabled (``static`` keyword args are not traced).

        Remat goes through ``jax.checkpoint`` of a pure function of the block's state: ``nnx.remat`` refuses
        modules whose parameters come from different traces, as when frozen and trainable partitions are
        merged inside ``jax.grad``.
        """
        if not self.remat:
            return block(*args, **static)
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a, **static))(state, *args)

    def time_embed(self, t, batch):
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        c = self.config
        feats = timestep_features(
            t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        return self.time_embedding(feats.astype(self.dtype))

    def prepare_input(self, x):
        """The model's input transform (``center_input_sample``) and compute-dtype cast."""
        x = x.astype(self.dtype)
        return 2 * x - 1 if self.config.center_input_sample else x

    def forward_down(self, x, t, context, h0_extra=None):
        """conv_in (+ ``h0_extra``), down blocks and mid block.

        Returns (skips, mid output, time embedding). ``skips[0]`` is conv_in's output after the addition.
        """
        context = context.astype(self.dtype)
        temb = self.time_embed(t, x.shape[0])
        h = self.conv_in(self.prepare_input(x))
        if h0_extra is not None:
            h = h + h0_extra
        skips = [h]
        for block in self.down_blocks:
            h, s = self._block(block, h, temb, context)
            skips += s
        return skips, self._block(self.mid_block, h, temb, context), temb

    def forward_up(self, skips, mid, temb, context, down_residuals=None, mid_residual=None):
        """Up blocks and the output head; optional ControlNet-style residuals added to skips and mid."""
        context = context.astype(self.dtype)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        h = mid if mid_residual is None else mid + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if skips else None
            h = self._block(block, h, block_skips, temb, context, upsample_size=size)
        h = jax.nn.silu(self.conv_norm_out(h))
        return self.conv_out(h)

    masked_input = False  # a plain UNet has no masked-latent input

    @property
    def channels(self) -> tuple[int]:
        """Its one branch's latent channels (a twin's ``channels`` is (RGB, dense))."""
        return (self.config.in_channels,)

    def __call__(self, x, t, context):
        skips, mid, temb = self.forward_down(x, t, context)
        return self.forward_up(skips, mid, temb, context)
