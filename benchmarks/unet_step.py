"""A plain single-UNet training step on the CPU, JAX vs PyTorch: the SD2.1 block layout at a chosen width,
every parameter trained by AdamW (no frozen branch, no VAE, no text encoder; random latents and text).

    python benchmarks/unet_step.py --widths 320 64 --latent 32 --batch 2     # SD2.1 width, and 64/128/256/256

Width ``w`` means block channels ``[w, 2w, 4w, 4w]`` (SD2.1: 320), with 64-wide attention heads. JAX: the
project's ``UNet2DConditionModel`` in one jitted, donated step (eps-MSE, ``optax.adamw``). Torch: diffusers'
``UNet2DConditionModel`` with the same config, ``torch.optim.AdamW`` (``foreach``), 2 threads. Each
measurement runs in its own subprocess (peak RSS = its VmHWM); one warm-up step, then the median of
``--steps``. A 1024² fp32 matmul is timed in the JAX child as the machine's reference figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photos import matmul_reference  # noqa: E402
from sample import machine, run_child  # noqa: E402
from twin_forward import (  # noqa: E402
    SD21_UNET_CONFIG,
    add_cpu_options_arg,
    apply_cpu_options,
    emit,
    peak_rss_bytes,
    report,
)


def unet_config(width: int) -> dict:
    channels = [width, 2 * width, 4 * width, 4 * width]
    heads = [c // 64 for c in channels] if width != 320 else SD21_UNET_CONFIG["attention_head_dim"]
    return {**SD21_UNET_CONFIG, "block_out_channels": channels, "attention_head_dim": heads}


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def part_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jointnet_jax.models import functional
    from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig

    jax.config.update("jax_platforms", "cpu")
    model = UNet2DConditionModel(UNetConfig.from_dict(unet_config(args.width)), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-5)
    opt_state = tx.init(params)
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, args.latent, args.latent, 4))
    text = jax.random.normal(key, (args.batch, 77, 1024))
    t = jnp.full((args.batch,), 500)

    def step(params, opt_state):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, t, text) - x) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    t0 = time.perf_counter()
    compiled = functional.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        params, opt_state, value = compiled(params, opt_state)
        jax.block_until_ready(value)
        if i:
            times.append(time.perf_counter() - t0)
    count = sum(p.size for p in jax.tree.leaves(params))
    return dict(
        compile_s=round(compile_s, 1),
        step_s=round(median(times), 3),
        params=int(count),
        matmul_ms=round(matmul_reference() * 1e3, 2),
    )


def part_torch(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {k: v for k, v in unet_config(args.width).items() if not k.startswith("_")}
    model = UNet2DConditionModel(**cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    text = torch.randn(args.batch, 77, 1024)
    t = torch.full((args.batch,), 500)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = torch.mean((model(x, t, text).sample - x) ** 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return dict(step_s=round(median(times), 3), params=sum(p.numel() for p in model.parameters()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[320, 64])
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=["jax", "torch"], help=argparse.SUPPRESS)
    add_cpu_options_arg(p)
    args = p.parse_args(argv)
    apply_cpu_options(args)
    if args.part:
        rec = {"jax": part_jax, "torch": part_torch}[args.part](args)
        report(
            dict(
                part="unet_step",
                impl=args.part,
                width=args.width,
                latent=args.latent,
                batch=args.batch,
                peak_rss_gb=round(peak_rss_bytes() / 1e9, 2),
                **rec,
            )
        )
        return
    emit(dict(part="start", script="unet_step.py", argv=sys.argv[1:], **machine()))
    rows = []
    for width in args.widths:
        child = ["--width", str(width), "--latent", str(args.latent), "--batch", str(args.batch)]
        child += ["--steps", str(args.steps), "--threads", str(args.threads)]
        for impl in ("jax", "torch"):
            rows += run_child(__file__, child + ["--part", impl])
    print("\n| width | impl | params | step (s) | peak RSS (GB) | compile (s) | matmul (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if "step_s" in r):
        print(
            f"| {r['width']} | {r['impl']} | {r['params']:,} | {r['step_s']} | {r['peak_rss_gb']} "
            f"| {r.get('compile_s', '-')} | {r.get('matmul_ms', '-')} |"
        )


if __name__ == "__main__":
    main()
