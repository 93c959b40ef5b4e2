"""Flax NNX port of diffusers' ``AutoencoderKL`` as used by Stable Diffusion (NHWC).

Encoder: conv_in, ``DownEncoderBlock2D`` levels (resnets + an asymmetrically padded stride-2 conv), a
mid block (resnet, single-head self-attention, resnet), GroupNorm-SiLU-conv_out to mean and log-variance.
The decoder mirrors it with ``UpDecoderBlock2D`` levels. All norms use eps 1e-6, as diffusers hard-codes
for the VAE regardless of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.attention import Attention
from jointnet_jax.models.config_check import check_fields, check_raw_lists
from jointnet_jax.models.layers import conv, group_norm
from jointnet_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

_EPS = 1e-6
# Config keys whose non-default values select architectures or latent transforms this port does not apply.
_UNSUPPORTED_UNLESS = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers ``AutoencoderKL`` config, with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        for key, default in _UNSUPPORTED_UNLESS.items():
            if d.get(key, default) != default:
                raise ValueError(f"VAE config sets {key}={d[key]!r}; only {default!r} is supported by this port")
        check_raw_lists("VAE", d, ("down_block_types", "up_block_types", "block_out_channels"))
        channels = tuple(d.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(d.get(key, (kind,) * len(channels)))
            if any(t != kind for t in types):
                raise ValueError(f"VAE config {key}={list(types)!r}: only {kind!r} blocks are supported")
            if len(types) != len(channels):
                raise ValueError(f"VAE config {key} has {len(types)} entries for {len(channels)} block_out_channels")
        if not isinstance(d.get("layers_per_block", 1), int):
            raise ValueError("VAE config layers_per_block must be a single integer")
        config = cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            block_out_channels=channels,
            layers_per_block=d.get("layers_per_block", 1),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
            use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True),
            mid_block_add_attention=d.get("mid_block_add_attention", True),
            force_upcast=d.get("force_upcast", True),
        )
        sizes = ("in_channels", "out_channels", "block_out_channels", "latent_channels", "norm_num_groups")
        check_fields("VAE", config, positive=(*sizes, "layers_per_block"))
        odd = [c for c in config.block_out_channels if c % config.norm_num_groups]
        if odd:
            raise ValueError(f"VAE config block_out_channels {odd} are not divisible by norm_num_groups")
        return config


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); a pytree so that it can leave a jitted function."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean


class VAEAttention(Attention):
    """diffusers' (formerly ``AttentionBlock``) VAE attention: GroupNorm, one head over all spatial
    positions, residual. Subclassing keeps ``group_norm``/``to_q``/.. at the checkpoint's paths."""

    def __init__(self, channels, *, groups, dtype=jnp.float32, rngs):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = group_norm(channels, groups, _EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        out = super().__call__(self.group_norm(x).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """``UNetMidBlock2D`` without timestep: resnet, (attention), resnet."""

    def __init__(self, channels, *, groups, add_attention, dtype, rngs):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
                for _ in range(2)
            ]
        )
        if add_attention:
            self.attentions = nnx.List([VAEAttention(channels, groups=groups, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        x = self.resnets[0](x)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Level(nnx.Module):
    """``DownEncoderBlock2D`` (``down=True``) or ``UpDecoderBlock2D``: resnets, then an optional resample."""

    def __init__(self, cin, cout, *, num_layers, resample, down, groups, dtype, rngs):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    cin if i == 0 else cout,
                    cout,
                    temb_channels=None,
                    groups=groups,
                    eps=_EPS,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        if resample and down:
            self.downsamplers = nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)])
        elif resample:
            self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs):
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = conv(c.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                _Level(
                    ch[i - 1] if i else ch[0],
                    ch[i],
                    num_layers=c.layers_per_block,
                    resample=i < len(ch) - 1,
                    down=True,
                    groups=g,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], groups=g, add_attention=c.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], g, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * c.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs):
        rch, g = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = conv(c.latent_channels, rch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(rch[0], groups=g, add_attention=c.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                _Level(
                    rch[i - 1] if i else rch[0],
                    rch[i],
                    num_layers=c.layers_per_block + 1,
                    resample=i < len(rch) - 1,
                    down=False,
                    groups=g,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(rch))
            ]
        )
        self.conv_norm_out = group_norm(rch[-1], g, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(rch[-1], c.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """``encode(x)`` for images (B, H, W, C) in [-1, 1] gives the latent posterior; ``decode(z)`` inverts.

    Latents here are unscaled: diffusion works on ``z * scaling_factor``, as in the diffusers pipelines.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        self.scaling_factor = c.scaling_factor
        self.encoder = Encoder(c, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(c, dtype=dtype, rngs=rngs)
        z2 = 2 * c.latent_channels
        if c.use_quant_conv:
            self.quant_conv = conv(z2, z2, 1, dtype=dtype, rngs=rngs)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, c.latent_channels, 1, dtype=dtype, rngs=rngs)

    @property
    def scale_factor(self) -> int:
        """Spatial downsampling from image to latent: one factor 2 per level but the last."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        h = self.encoder(x.astype(self.dtype))
        if hasattr(self, "quant_conv"):
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z):
        z = z.astype(self.dtype)
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key=None):
        """Reconstruction through the posterior mode, or a posterior sample when ``key`` is given."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))
