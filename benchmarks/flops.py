"""Analytic FLOPs of the SD2.1-base-shaped models (``training/flops.py``), for MFU on accelerators (issue 19).

    python benchmarks/flops.py [--resolution 512] [--batch 4]

Everything is traced on abstract shapes (``weights.abstract``: no parameter memory, nothing compiled or run),
so it takes a minute on a CPU and gives the figures a GPU run divides by its step time:

- one UNet forward (the SD2.1-base UNet, latent ``resolution / 8``), the twin forward (two UNets and the
  exchange layers), and the VAE encoder and decoder and the OpenCLIP-H text encoder at the same size;
- the stage-1 train step per ``--batch`` from a latent cache (``objective.cached_loss``: RGB branch frozen, its
  kernel gradients dead code, so not counted), and with the encoders in the step added (the VAE encodes the
  RGB image and the depth map, the text encoder one caption per example);
- ``generate`` at 50 DDIM steps with CFG (the twin at batch 2 per step) plus one text encoding of the prompt
  and the empty prompt and the VAE decode of both branches.

The rows are printed as JSON lines and as a markdown table, with the time one step would take at 100% of an
H100's dense bf16 peak (989 TFLOP/s). Only dots and convolutions are counted (``training/flops.py``); on
these models XLA's CPU count, which includes elementwise work, is 1-5% higher (``tests/test_flops.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_PEAK = 989e12
TEXT_LEN = 77


def _abstract_models():
    from flax import nnx
    from train import OPENCLIP_H_TEXT, SD_VAE
    from twin_forward import SD21_UNET_CONFIG

    from jointnet_jax.models import weights
    from jointnet_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from jointnet_jax.models.jointnet import JointNet
    from jointnet_jax.models.tiny import text_config
    from jointnet_jax.models.unet import UNetConfig
    from jointnet_jax.models.vae import AutoencoderKL, VAEConfig

    text = text_config(49408) | OPENCLIP_H_TEXT  # the real vocabulary size: the embedding lookup has no FLOPs
    twin = weights.abstract(lambda: JointNet(UNetConfig.from_dict(SD21_UNET_CONFIG), rngs=nnx.Rngs(0)))
    vae = weights.abstract(lambda: AutoencoderKL(VAEConfig.from_dict(SD_VAE), rngs=nnx.Rngs(0)))
    text_model = weights.abstract(lambda: CLIPTextModel(CLIPTextConfig.from_dict(text), rngs=nnx.Rngs(0)))
    return twin, vae, text_model


def _call(module, method=None):
    """``(fn, state)``: a pure function of the module's state calling ``module`` (or its ``method``)."""
    from flax import nnx

    graphdef, state = nnx.split(module)

    def fn(s, *args):
        m = nnx.merge(graphdef, s)
        return (getattr(m, method) if method else m)(*args)

    return fn, state


def _stage1_step_flops(twin, batch: int, latent: int) -> float:
    """The stage-1 loss and its gradient w.r.t. the trainable partition, from cached moments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jointnet_jax.diffusion.schedule import NoiseSchedule
    from jointnet_jax.models.tiny import SCHEDULER
    from jointnet_jax.training.flops import count_flops
    from jointnet_jax.training.objective import LossSettings, cached_loss
    from jointnet_jax.training.partition import split_trainable

    graphdef, params, frozen = split_trainable(twin, stage=1)
    shape = (batch, latent, latent, 4)
    spec = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    data = {"index": spec(batch, dtype=jnp.int32), "text": spec(batch, TEXT_LEN, 1024)}
    for name in ("image", "depth"):
        data[f"{name}_mean"], data[f"{name}_logvar"] = spec(*shape), spec(*shape)
    schedule = NoiseSchedule.from_config(SCHEDULER)

    def step(p, frozen, data, uncond):
        def loss(p):
            model = nnx.merge(graphdef, p, frozen)
            return cached_loss(model, 0.18215, 2, schedule, uncond, data, jax.random.key(0), LossSettings())

        return jax.value_and_grad(loss, has_aux=True)(p)

    return count_flops(step, params, frozen, data, spec(1, TEXT_LEN, 1024))


def measure(resolution: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jointnet_jax.training.flops import count_flops

    twin, vae, text_model = _abstract_models()
    latent = resolution // 8
    spec = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    x, t, ctx = spec(1, latent, latent, 4), spec(1, dtype=jnp.int32), spec(1, TEXT_LEN, 1024)
    unet, unet_state = _call(twin.unet)
    twin_fn, twin_state = _call(twin)
    enc, vae_state = _call(vae, "encode")
    dec, _ = _call(vae, "decode")
    text, text_state = _call(text_model)
    f = {
        "unet_forward": count_flops(unet, unet_state, x, t, ctx),
        "twin_forward": count_flops(twin_fn, twin_state, x, x, t, ctx),
        "vae_encode": count_flops(lambda s, im: enc(s, im).mean, vae_state, spec(1, resolution, resolution, 3)),
        "vae_decode": count_flops(dec, vae_state, x),
        "text_encode": count_flops(text, text_state, spec(1, TEXT_LEN, dtype=jnp.int32)),
    }
    f["stage1_step_cached"] = _stage1_step_flops(twin, batch, latent)
    f["stage1_step_in_step_encoding"] = f["stage1_step_cached"] + batch * (2 * f["vae_encode"] + f["text_encode"])
    f["generate_50_ddim_cfg"] = 50 * 2 * f["twin_forward"] + 2 * f["text_encode"] + 2 * f["vae_decode"]
    return f


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="examples per train step")
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    flops = measure(args.resolution, args.batch)
    per = dict.fromkeys(("stage1_step_cached", "stage1_step_in_step_encoding"), f"per step of {args.batch}")
    rows = [f"| what (SD2.1-base shape, {args.resolution}²) | TFLOP | ms at an H100's bf16 peak |"]
    rows.append("|---|---|---|")
    for name, value in flops.items():
        print(json.dumps({"name": name, "resolution": args.resolution, "batch": args.batch, "tflop": value / 1e12}))
        label = f"{name} ({per.get(name, 'batch 1')})"
        rows.append(f"| {label} | {value / 1e12:.3f} | {value / H100_PEAK * 1e3:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
