"""JointNet: two UNets (RGB branch ``unet``, dense branch ``jointnet``) wired by zero-initialised convs.

Each branch is a ``JointNetBranch``: a diffusers UNet plus the official exchange layers, with the official
parameter names so the released checkpoints load by layout rule:

* ``jointnet_rgb_in_trans`` (3x3): maps the OTHER branch's noisy latent into this branch's conv_in output
  (on the RGB branch it reads the depth latent, despite its name). The receiver owns it.
* ``jointnet_down_blocks.{k}`` (1x1, one per skip) and ``jointnet_mid_block`` (1x1): transform this
  branch's OWN skips and mid output before they are added to the other branch's decoder. The sender owns them.
* ``jointnet_masked_latent_conv`` (3x3, inpainting models only): reads
  [own mask | own masked latent | other mask | other masked latent] (1+4+1+4 channels).

All exchange layers start at zero, so ``JointNet.from_unet(base)`` reproduces the base UNet on each branch
exactly (the paper's output-preserving principle).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jointnet_jax.models import weights
from jointnet_jax.models.layers import conv
from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig

BRANCHES = ("unet", "jointnet")  # official sub-folder names: RGB branch, dense branch
EXCHANGE_PREFIX = "jointnet_"


def num_skips(config: UNetConfig) -> int:
    """conv_in output + every resnet output + every downsampler output (1:1 with the skip list)."""
    n = len(config.block_out_channels)
    return 1 + sum(config.layers_per_block) + (n - 1)


def skip_channels(config: UNetConfig) -> list[int]:
    ch = config.block_out_channels
    out = [ch[0]]
    for i, c in enumerate(ch):
        out += [c] * config.layers_per_block[i]
        if i < len(ch) - 1:
            out.append(c)
    return out


class JointNetBranch(UNet2DConditionModel):
    """One branch of the twin: a UNet plus its zero-initialised exchange layers."""

    def __init__(self, config: UNetConfig, *, joint_in_channels=None, masked_input=False, dtype=jnp.float32, rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.joint_in_channels = joint_in_channels or config.in_channels
        c0 = config.block_out_channels[0]
        zconv = dict(dtype=dtype, rngs=rngs, zero_init=True)
        self.jointnet_rgb_in_trans = conv(self.joint_in_channels, c0, config.conv_in_kernel, **zconv)
        self.jointnet_down_blocks = nnx.List([conv(c, c, 1, **zconv) for c in skip_channels(config)])
        self.jointnet_mid_block = conv(config.block_out_channels[-1], config.block_out_channels[-1], 1, **zconv)
        if masked_input:
            self.add_masked_latent_conv(rngs=rngs)

    @property
    def masked_input(self) -> bool:
        return hasattr(self, "jointnet_masked_latent_conv")

    def add_masked_latent_conv(self, *, rngs=None):
        """Add the zero-initialised masked-latent conv (stage 3: inpainting fine-tune)."""
        if self.masked_input:
            raise ValueError("this JointNet branch already has jointnet_masked_latent_conv")
        cin = 1 + self.config.in_channels + 1 + self.joint_in_channels
        c0 = self.config.block_out_channels[0]
        self.jointnet_masked_latent_conv = conv(
            cin, c0, self.config.conv_in_kernel, dtype=self.dtype, rngs=rngs or nnx.Rngs(0), zero_init=True
        )

    def encode(self, x, other_x, t, context, own_cond=None, other_cond=None):
        """Down path with the input-level exchange. Returns (sent residuals, sent mid residual, decoder context)."""
        extra = self.jointnet_rgb_in_trans(self.prepare_input(other_x))
        if self.masked_input:
            if own_cond is None or other_cond is None:
                raise ValueError("this JointNet has a masked-latent input: pass cond_rgb and cond_dense")
            cond = jnp.concatenate([own_cond, other_cond], axis=-1).astype(self.dtype)
            extra = extra + self.jointnet_masked_latent_conv(cond)
        elif own_cond is not None or other_cond is not None:
            raise ValueError("cond_rgb/cond_dense were given but this JointNet has no masked-latent input layer")
        skips, mid, temb = self.forward_down(x, t, context, h0_extra=extra)
        sent = [layer(s) for layer, s in zip(self.jointnet_down_blocks, skips, strict=True)]
        return sent, self.jointnet_mid_block(mid), (skips, mid, temb)

    def branch_config(self) -> dict:
        """config.json for this branch in the official ``JointNetModel`` format."""
        d = self.config.to_dict()
        d["_class_name"] = "JointNetModel"
        d.setdefault("joint_in_channels", None)
        if d["joint_in_channels"] is not None or self.joint_in_channels != self.config.in_channels:
            d["joint_in_channels"] = self.joint_in_channels
        # The official class never persisted a flag changed after construction; we always write the truth
        # (docs/official-differences.md, "Exports write the true flag").
        d["has_masked_latent_input"] = self.masked_input
        return d


class JointNet(nnx.Module):
    """``eps_rgb, eps_dense = jn(x_rgb, x_dense, t, text, cond_rgb=None, cond_dense=None)`` (NHWC)."""

    def __init__(
        self,
        rgb_config: UNetConfig,
        dense_config: UNetConfig | None = None,
        *,
        rgb_joint_in=None,
        dense_joint_in=None,
        masked_input=False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        dense_config = dense_config or rgb_config
        self.unet = JointNetBranch(
            rgb_config,
            joint_in_channels=rgb_joint_in or dense_config.in_channels,
            masked_input=masked_input,
            dtype=dtype,
            rngs=rngs,
        )
        self.jointnet = JointNetBranch(
            dense_config,
            joint_in_channels=dense_joint_in or rgb_config.in_channels,
            masked_input=masked_input,
            dtype=dtype,
            rngs=rngs,
        )

    @property
    def rgb(self) -> JointNetBranch:
        """The RGB branch (parameter path ``unet.``, the official sub-folder name)."""
        return self.unet

    @property
    def dense(self) -> JointNetBranch:
        """The dense (depth or normal) branch (parameter path ``jointnet.``, the official sub-folder name)."""
        return self.jointnet

    @property
    def masked_input(self) -> bool:
        return self.unet.masked_input and self.jointnet.masked_input

    @property
    def config(self) -> UNetConfig:
        """The RGB branch's UNet config (geometry: downsampling, native sample size)."""
        return self.unet.config

    @property
    def channels(self) -> tuple[int, int]:
        """(RGB, dense) channels of the joint latent: 4 + 4 for SD, 3 + 1 for pixel-space depth."""
        return self.unet.config.in_channels, self.jointnet.config.in_channels

    def forward_with_residuals(self, x_rgb, x_dense, t, text, cond_rgb=None, cond_dense=None):
        """The official ``denoiseV2``; also returns what each branch sends (for tests and analysis)."""
        r_sent, r_mid, r_ctx = self.unet.encode(x_rgb, x_dense, t, text, cond_rgb, cond_dense)
        d_sent, d_mid, d_ctx = self.jointnet.encode(x_dense, x_rgb, t, text, cond_dense, cond_rgb)
        eps_rgb = self.unet.forward_up(*r_ctx, text, down_residuals=d_sent, mid_residual=d_mid)
        eps_dense = self.jointnet.forward_up(*d_ctx, text, down_residuals=r_sent, mid_residual=r_mid)
        return eps_rgb, eps_dense, (r_sent, r_mid), (d_sent, d_mid)

    def __call__(self, x_rgb, x_dense, t, text, cond_rgb=None, cond_dense=None):
        eps_rgb, eps_dense, _, _ = self.forward_with_residuals(x_rgb, x_dense, t, text, cond_rgb, cond_dense)
        return eps_rgb, eps_dense

    def set_remat(self, enabled: bool = True):
        self.unet.set_remat(enabled)
        self.jointnet.set_remat(enabled)

    def add_masked_latent_conv(self):
        """Give both branches a zero-initialised masked-latent conv (for the stage-3 inpainting fine-tune)."""
        self.unet.add_masked_latent_conv()
        self.jointnet.add_masked_latent_conv()

    # ---------------------------------------------------------------------------------------------------
    # Construction from a base UNet, loading and saving in the official layout

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        masked_input=False,
        *,
        in_channels=None,
        joint_in_channels=None,
        out_channels=None,
        dense_channels=None,
    ) -> JointNet:
        """Both branches copied from ``unet``; exchange layers zero (official ``JointNetModel.from_unet``).

        A smaller ``in_channels``/``out_channels`` keeps the first input channels of conv_in and the first
        output rows of conv_out (first rows of each half for learned-variance UNets); larger raises.
        ``dense_channels`` shrinks only the dense branch that way (pixel-space depth: RGB 3, depth 1); each
        branch's ``joint_in_channels`` is then the other branch's channel count.
        """
        base = unet.config
        cin = in_channels or base.in_channels
        cout = out_channels or base.out_channels
        dense_in = dense_out = dense_channels
        if dense_channels is None:
            dense_in, dense_out = cin, cout
        if max(cin, dense_in) > base.in_channels or max(cout, dense_out) > base.out_channels:
            raise ValueError(
                f"from_unet can only keep or shrink channels (base in/out {base.in_channels}/{base.out_channels},"
                f" asked {cin}/{cout}, dense {dense_in}/{dense_out})"
            )
        base_tensors = dict(weights.state_tensors(unet))
        learned_var = base.out_channels == 2 * base.in_channels

        def take(key, cin, cout):
            value = base_tensors[key]
            if key == "conv_in.weight":
                value = value[:, :cin]
            elif key in ("conv_out.weight", "conv_out.bias") and cout != base.out_channels:
                if learned_var:
                    half = base.out_channels // 2
                    value = np.concatenate([value[: cout // 2], value[half : half + cout // 2]])
                else:
                    value = value[:cout]
            return value

        rgb_joint_in = dense_joint_in = joint_in_channels
        if dense_channels is not None:
            rgb_joint_in, dense_joint_in = dense_in, cin
        model = weights.abstract(
            lambda: cls(
                base.replace(in_channels=cin, out_channels=cout),
                base.replace(in_channels=dense_in, out_channels=dense_out),
                rgb_joint_in=rgb_joint_in,
                dense_joint_in=dense_joint_in,
                masked_input=masked_input,
                dtype=unet.dtype,
                rngs=nnx.Rngs(0),
            )
        )
        sizes = {"unet": (cin, cout), "jointnet": (dense_in, dense_out)}
        tensors = {f"{b}.{k}": take(k, *sizes[b]) for b in BRANCHES for k in base_tensors}
        return weights.fill(
            model,
            tensors,
            source="base UNet",
            allow_missing=lambda key: key.split(".", 1)[1].startswith(EXCHANGE_PREFIX),
        )

    def save(self, path) -> None:
        """Write the official layout: ``path/unet/`` (RGB) and ``path/jointnet/`` (dense), each a diffusers
        folder (config.json + diffusion_pytorch_model.safetensors) that the official PyTorch loader reads."""
        for name in BRANCHES:
            branch = getattr(self, name)
            weights.save_folder(branch, Path(path) / name, branch.branch_config())
