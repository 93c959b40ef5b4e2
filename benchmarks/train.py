"""Training speed and memory: stage-1 train step of the real ``Trainer`` (tiny config, or an SD2.1-base-shaped
base with random weights) against a PyTorch proxy at the same shapes, in the same session.

    python benchmarks/train.py --config tiny                                # CPU, tiny config, remat off and on
    python benchmarks/train.py --config sd21 --resolution 64 --batch 1 --steps 2 --xla-flags default memory_scheduler
    python benchmarks/train.py --config sd21 --device gpu --resolution 512 --batch 4 --steps 5 --remat on

JAX: ``Trainer(config, workdir)`` (stage 1: RGB branch frozen; dense branch + all exchange layers trained,
AdamW, grad clip 1.0, VAE encode + text encoder inside the step), then ``trainer.compiled_step(batch)``
(its compile time is reported separately, and its XLA cost analysis gives ``trainer.flops``), one warm-up
step, then ``--steps`` timed steps on one batch from the trainer's own input pipeline (data loading is
excluded). A machine without grain, array_record or tfds gets them from a wheelhouse
(``benchmarks/gpu_wheelhouse.sh``): there is no other path.

PyTorch proxy (``torch_twin_step``): two diffusers ``UNet2DConditionModel``s loaded from the same base
folder, wired exactly like JointNet (each down path gets the other branch's noisy latent through a zero 3x3
conv added to its conv_in output; each up path gets the other branch's skips and mid output through zero 1x1
convs, 12 + 1 per branch for SD2.1), RGB UNet ``requires_grad_(False)``, dense UNet + all 2 x 14 exchange
convs trained by ``torch.optim.AdamW`` (lr 1e-4, wd 1e-2) after ``clip_grad_norm_(1.0)``, eps-MSE on both
branches at one shared timestep; the diffusers VAE encode (posterior sample) and the transformers CLIP text
encoder run under ``no_grad`` inside the step. It omits the text drop, noise offset and per-example RNG
plumbing (negligible cost). ``--remat on`` maps to diffusers' ``enable_gradient_checkpointing()``.

The SD2.1-shaped base (``--config sd21``, written once into ``--base-dir``): the SD2.1-base UNet config
(``twin_forward.SD21_UNET_CONFIG``), the SD VAE config (128/256/512/512 channels, factor 8) and the
OpenCLIP-H text-encoder config (1024 wide, 23 layers, 16 heads), all with random weights; only the
tokenizer is the tiny test BPE vocabulary (so the text embedding table is 58 x 1024 instead of 49408 x 1024).

Peak memory: RSS high-water (VmHWM) of each measurement's own subprocess; on GPU also JAX's
``peak_bytes_in_use`` / ``torch.cuda.max_memory_allocated``. The JAX record also has XLA's buffer analysis of
the compiled step (``temp_gb``: temporaries on top of the resident state); when those exceed the host's
MemAvailable the step is not run (the record says so) instead of being killed by the OOM killer.

``--xla-flags`` runs the JAX child once per named flag set (``FLAG_SETS``): ``memory_scheduler`` is XLA CPU's
memory-optimised instruction scheduler. The default (concurrency-optimised) one hoists every kernel-only
computation, e.g. the reversed and transposed conv kernels of the backward pass, to the start of the step, so
they are all alive at once (8.3 GB of temporaries for the SD2.1 stage-1 step at 64², 3.3 GB with the flag).

MFU, two ways, against the device's dense bf16 peak (``metrics.device_peak_flops``; none on CPU): ``mfu``
from XLA's cost analysis (``trainer.flops``), which on a GPU leaves out the convolutions handed to cuDNN, and
``mfu_analytic`` from ``trainer.model_flops`` (``training/flops.py``: the step's dots and convolutions counted
from its jaxpr, without remat's recompute), the figure to compare with published MFUs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photos import matmul_reference  # noqa: E402
from sample import machine, run_child  # noqa: E402
from twin_forward import (  # noqa: E402
    SD21_UNET_CONFIG,
    RandomTensors,
    add_cpu_options_arg,
    apply_cpu_options,
    emit,
    peak_rss_bytes,
    report,
    rss_bytes,
)

SD_VAE = {  # stabilityai/stable-diffusion-2-1-base vae/config.json
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
OPENCLIP_H_TEXT |= dict(projection_dim=1024, hidden_act="gelu")
FLAG_SETS = {"default": "", "memory_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


# ---------------------------------------------------------------------------------------------------------
# Base folders


def write_random(model, folder: Path, config: dict, stem="diffusion_pytorch_model") -> None:
    from jointnet_jax.models import weights

    model = weights.fill(model, RandomTensors(model), source="random")
    weights.save_folder(model, folder, config, stem=stem)


def write_sd21_base(out: Path) -> Path:
    """An SD2.1-base-shaped diffusers folder with random weights (see the module docstring)."""
    import json
    import shutil

    from flax import nnx

    from jointnet_jax.models import weights
    from jointnet_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from jointnet_jax.models.tiny import SCHEDULER, text_config, write_tokenizer
    from jointnet_jax.models.unet import UNet2DConditionModel, UNetConfig
    from jointnet_jax.models.vae import AutoencoderKL, VAEConfig

    if (out / "unet" / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = write_tokenizer(tmp / "tokenizer")
    text = text_config(len(tok)) | OPENCLIP_H_TEXT
    text_model = weights.abstract(lambda: CLIPTextModel(CLIPTextConfig.from_dict(text), rngs=nnx.Rngs(0)))
    write_random(text_model, tmp / "text_encoder", text, stem="model")
    write_random(
        weights.abstract(lambda: AutoencoderKL(VAEConfig.from_dict(SD_VAE), rngs=nnx.Rngs(0))), tmp / "vae", SD_VAE
    )
    unet = weights.abstract(lambda: UNet2DConditionModel(UNetConfig.from_dict(SD21_UNET_CONFIG), rngs=nnx.Rngs(0)))
    write_random(unet, tmp / "unet", SD21_UNET_CONFIG)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    tmp.rename(out)
    return out


def base_folder(args) -> Path:
    if args.config == "tiny":
        from jointnet_jax.models.tiny import ensure_tiny_base

        return ensure_tiny_base(args.base_dir)
    return write_sd21_base(args.base_dir)


def train_config(args):
    from configs.sd21_depth import get_config

    c = get_config("tiny")  # CPU-friendly data/checkpoint settings; the base decides the model size
    c.base = str(args.base_dir)
    c.batch_size = args.batch
    c.remat = args.remat == "on"
    c.compute_dtype = args.dtype
    c.total_steps = 1_000_000
    c.checkpoint_every = 1_000_000
    c.export = False
    c.data.resolution = args.resolution
    c.data.synthetic_size = max(c.data.synthetic_size, args.resolution)
    c.data.synthetic_num = max(4, args.batch)
    return c


def write_latent_cache(args, work: Path) -> Path:
    """Synthetic labelled records at ``--resolution`` encoded by the base's VAE and text encoder into a latent
    cache (``data.latents``: the shards the ``jointnet-cache-latents`` job writes, encoded in this process, so
    no Beam is needed)."""
    from jointnet_jax.data import latent_records, latents, records, synthetic

    size, num, out = args.resolution, max(4, args.batch), work / "cache"
    records.write_shards((synthetic.make_example(i, size) for i in range(num)), work / "records", "bench", num_shards=1)
    config = latents.CacheConfig(str(args.base_dir), size, min(8, num), "bf16", flip=True)
    encoder = latents.LatentEncoder(config)
    out.mkdir(parents=True, exist_ok=True)
    latent_records.write_cache_files(str(out), encoder.info(), encoder.uncond())
    latents.write_in_process(latents.plan_work_items([str(work / "records")], str(out), config.prefix), encoder, config)
    return out


# ---------------------------------------------------------------------------------------------------------
# JAX child


def part_jax(args) -> None:
    import jax
    import numpy as np

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    from jointnet_jax.training.metrics import device_peak_flops

    if args.attention != "auto":  # benchmark-only override of the attention kernel (as in twin_forward.py)
        from jointnet_jax.models import attention

        original = attention.dot_product_attention
        attention.dot_product_attention = lambda q, k, v, *, upcast=False, impl="auto": original(
            q, k, v, upcast=upcast, impl=args.attention
        )
    if args.conv_backward == "xla":  # benchmark-only: the code path before models/conv.py's dot backward
        from jointnet_jax.models import conv

        conv.DOT_BACKWARD_MIN_CHANNELS = 1 << 30
    config, work = train_config(args), Path(tempfile.mkdtemp(prefix="bench_train_"))
    from jointnet_jax.training.trainer import Trainer

    cache_s = None
    if args.latents == "on":
        t0 = time.perf_counter()
        config.data.paths, config.data.latents = str(write_latent_cache(args, work)), True
        cache_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    trainer = Trainer(config, work / "workdir")
    batch = trainer._global_batch(next(trainer.data))
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_fn = trainer.compiled_step(batch)
    compile_s, flops, memory = time.perf_counter() - t0, trainer.flops, trainer.step_memory
    state, *rest = trainer._args(trainer.state, batch)  # no encoder states when it reads a latent cache
    rss_init = rss_bytes()
    rec = dict(part="train", impl="jax", **common_fields(args), latents=args.latents, init_s=round(init_s, 1))
    if cache_s is not None:
        rec["cache_s"] = cache_s
    rec.update(compile_s=round(compile_s, 1), rss_after_compile_gb=round(rss_init / 1e9, 2))
    if memory:
        rec.update(argument_gb=round(memory["argument_bytes"] / 1e9, 3), temp_gb=round(memory["temp_bytes"] / 1e9, 3))
    free_gb = mem_available_gb()
    if args.device == "cpu" and memory and memory["temp_bytes"] > free_gb * 1e9:
        report(dict(rec, skipped=f"the step needs {rec['temp_gb']} GB of temporaries, {free_gb:.1f} GB free"))
        return
    state, times, losses = timed_steps(step_fn, state, rest, args.steps)
    step_s = float(np.median(times))
    if args.profile:
        rec.update(profiled_step(step_fn, state, rest, work / "trace"))
    peak, model_flops = device_peak_flops(), trainer.model_flops(batch)
    rec.update(
        step_s=round(step_s, 3),
        all_s=[round(x, 3) for x in times],
        examples_per_s=round(args.batch / step_s, 3),
        tflops_per_step=flops and round(flops / 1e12, 3),
        achieved_tflops=flops and round(flops / step_s / 1e12, 2),
        mfu=(flops and peak) and round(flops / step_s / peak, 4),
        analytic_tflops_per_step=round(model_flops / 1e12, 3),
        mfu_analytic=peak and round(model_flops / step_s / peak, 4),
        finite=bool(np.isfinite(losses).all()),
        peak_rss_gb=round(peak_rss_bytes() / 1e9, 2),
        backend=jax.default_backend(),
        matmul_ms=round(matmul_reference() * 1e3, 2),
    )
    if args.device == "gpu":
        stats = jax.local_devices()[0].memory_stats() or {}
        rec.update(peak_device_gb=round(stats.get("peak_bytes_in_use", 0) / 1e9, 2), gpu=jax.devices()[0].device_kind)
    report(rec)


def timed_steps(step_fn, state, rest, steps: int):
    """(the last state, the seconds of each of ``steps`` steps after one warm-up, every loss). The state
    argument is donated: use the returned one."""
    times, losses = [], []
    for i in range(steps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        state, metrics = step_fn(state, *rest)
        losses.append(float(metrics["loss"]))
        if i:
            times.append(time.perf_counter() - t0)
    return state, times, losses


def profiled_step(step_fn, state, rest, trace_dir: Path) -> dict:
    """One more step under ``jax.profiler``: the top ops by time and the time per HLO kind."""
    import jax
    from profile_step import thunk_times, top_ops

    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        state, metrics = step_fn(state, *rest)
        jax.block_until_ready(metrics)
    return {"top_ops": top_ops(trace_dir), "hlo_kinds_s": {k: round(v, 4) for k, v in thunk_times(trace_dir).items()}}


def common_fields(args) -> dict:
    return dict(
        config=args.config,
        resolution=args.resolution,
        batch=args.batch,
        remat=args.remat,
        dtype=args.dtype,
        device=args.device,
        attention=getattr(args, "attention", "auto"),
        xla_flags=getattr(args, "xla_flags", "default"),
        conv_backward=getattr(args, "conv_backward", "project"),
        cpu_options=getattr(args, "cpu_options", "project"),
    )


# ---------------------------------------------------------------------------------------------------------
# Torch child


def torch_twin_step(base: Path, args):
    """Returns ``step()`` (one proxy train step, synchronised) and the trainable parameter count."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    dev = "cuda" if args.device == "gpu" else "cpu"
    dt = torch.float32 if args.dtype == "fp32" else torch.bfloat16  # weights stay fp32; autocast computes in dt
    vae = AutoencoderKL.from_pretrained(base / "vae").to(dev).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").to(dev).requires_grad_(False)
    rgb, dense = (UNet2DConditionModel.from_pretrained(base / "unet").to(dev) for _ in range(2))
    rgb.requires_grad_(False)
    if args.remat == "on":
        rgb.enable_gradient_checkpointing()
        dense.enable_gradient_checkpointing()
    noise_schedule = DDPMScheduler.from_pretrained(base / "scheduler")

    def zero(cin, cout, k):
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        return conv.to(dev)

    def exchange(u):  # [3x3 from the other branch's latent, one 1x1 per skip, one 1x1 for the mid output]
        ch = [u.config.block_out_channels[0]]
        for blk in u.down_blocks:
            ch += [r.out_channels for r in blk.resnets] + [d.out_channels for d in blk.downsamplers or []]
        convs = [zero(u.config.in_channels, ch[0], 3), *(zero(c, c, 1) for c in ch), zero(ch[-1], ch[-1], 1)]
        return torch.nn.ModuleList(convs)

    ex_rgb, ex_dense = exchange(rgb), exchange(dense)

    def down(u, ex, x, other, t, text):
        temb = u.time_embedding(u.time_proj(t).to(x.dtype))
        h = u.conv_in(x) + ex[0](other)
        skips = [h]
        for blk in u.down_blocks:
            cross = getattr(blk, "has_cross_attention", False)
            h, res = blk(h, temb, encoder_hidden_states=text) if cross else blk(h, temb)
            skips += list(res)
        h = u.mid_block(h, temb, encoder_hidden_states=text)
        return h, skips, temb, [e(s) for e, s in zip(ex[1:-1], skips, strict=True)], ex[-1](h)

    def up(u, h, skips, temb, text, res, mid):
        h, skips = h + mid, [s + r for s, r in zip(skips, res, strict=True)]
        for blk in u.up_blocks:
            n = len(blk.resnets)
            s, skips = tuple(skips[-n:]), skips[:-n]
            cross = getattr(blk, "has_cross_attention", False)
            h = blk(h, s, temb, encoder_hidden_states=text) if cross else blk(h, s, temb)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))

    trainable = [p for m in (dense, ex_rgb, ex_dense) for p in m.parameters()]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    b, r = args.batch, args.resolution
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(2 * b, 3, r, r, generator=gen) * 2 - 1).to(dev)  # [image; depth replicated to 3]
    ids = torch.randint(0, text_encoder.config.vocab_size, (b, 77), generator=gen).to(dev)

    def step():
        with torch.autocast(dev, dt, enabled=dt != torch.float32):
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
                text = text_encoder(ids)[0]
            x0, y0 = latents.float().chunk(2)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (b,), device=dev)
            ex, ey = torch.randn_like(x0), torch.randn_like(y0)
            xt, yt = noise_schedule.add_noise(x0, ex, t), noise_schedule.add_noise(y0, ey, t)
            hr, sr, tr, sent_r, mid_r = down(rgb, ex_rgb, xt, yt, t, text)
            hd, sd, td, sent_d, mid_d = down(dense, ex_dense, yt, xt, t, text)
            eps_r = up(rgb, hr, sr, tr, text, sent_d, mid_d)
            eps_d = up(dense, hd, sd, td, text, sent_r, mid_r)
            loss = F.mse_loss(eps_r.float(), ex) + F.mse_loss(eps_d.float(), ey)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step, sum(p.numel() for p in trainable)


def part_torch(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    step, n_trainable = torch_twin_step(base_folder(args), args)
    init_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.steps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        losses.append(step())
        if i:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    rec = dict(
        part="train",
        impl="torch",
        **common_fields(args),
        init_s=round(init_s, 1),
        step_s=round(step_s, 3),
        all_s=[round(x, 3) for x in times],
        examples_per_s=round(args.batch / step_s, 3),
        trainable_params=n_trainable,
        finite=bool(np.isfinite(losses).all()),
        peak_rss_gb=round(peak_rss_bytes() / 1e9, 2),
        threads=args.threads,
    )
    if args.device == "gpu":
        rec["peak_device_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report(rec)


# ---------------------------------------------------------------------------------------------------------
# Parent


def memory_needed_gb(config: str) -> float:
    """The resident fp32 stage-1 state of the SD2.1-shaped run: 1.755e9 twin parameters + 0.889e9 trainable x
    2 Adam moments + VAE/text (0.42e9) + the gradients (0.889e9). Parameters are float32 in every dtype. The
    step's other temporaries are checked by the JAX child after compiling (XLA's buffer analysis)."""
    return 0.0 if config == "tiny" else 4 * (1.755e9 + 3 * 0.889e9 + 0.42e9) / 1e9


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def table(records: list[dict]) -> str:
    lines = [
        "| config, resolution, batch, remat, latent cache, dtype, device | impl | XLA flags, conv backward "
        "| step (s) | examples/s "
        "| compile (s) | TFLOP/step: XLA, analytic | MFU: XLA, analytic | XLA temp (GB) | peak RSS (GB) "
        "| peak device (GB) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r.get("part") == "train" and ("step_s" in r or "temp_gb" in r)):
        impl = r["impl"]
        flags = f"{r['xla_flags']}, {r.get('conv_backward', 'xla')}" if r["impl"] == "jax" else "-"
        step = r.get("step_s", "not run: " + r.get("skipped", ""))
        lines.append(
            f"| {r['config']}, {r['resolution']}², {r['batch']}, {r['remat']}, {r.get('latents', 'off')}, "
            f"{r['dtype']}, {r['device']} | {impl} "
            f"| {flags} | {step} | {r.get('examples_per_s', '-')} | {r.get('compile_s', '-')} "
            f"| {r.get('tflops_per_step') or '-'}, {r.get('analytic_tflops_per_step') or '-'} "
            f"| {r.get('mfu') or '-'}, {r.get('mfu_analytic') or '-'} | {r.get('temp_gb', '-')} "
            f"| {r.get('peak_rss_gb', '-')} | {r.get('peak_device_gb', '-')} | {r['load']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "sd21"], nargs="+", default=["tiny"])
    p.add_argument("--resolution", type=int, default=None, help="image side (default: tiny 32, sd21 128)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="global batches (default: tiny 8, sd21 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--remat", choices=["off", "on"], nargs="+", default=["off", "on"])
    p.add_argument(
        "--latents",
        choices=["off", "on"],
        nargs="+",
        default=["off"],
        help="JAX: encode in the step (off) or train from a latent cache written first (on), one run each",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (weights stay fp32)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--base-dir", type=Path, default=None, help="where the random base is written (kept)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "cudnn", "blockwise", "reference"],
        help="force the JAX attention kernel (auto picks cuDNN for bf16 on GPU)",
    )
    p.add_argument(
        "--xla-flags",
        choices=list(FLAG_SETS),
        nargs="+",
        default=["default"],
        help="XLA_FLAGS sets for the JAX child, one run each",
    )
    p.add_argument(
        "--conv-backward",
        choices=["project", "xla"],
        nargs="+",
        default=["project"],
        help="JAX conv backward: the project's (models/conv.py) or XLA's own for every conv, one run each",
    )
    p.add_argument("--force", action="store_true", help="run even if MemAvailable looks too small")
    p.add_argument("--profile", action="store_true", help="JAX: trace one more step and report the top ops")
    p.add_argument("--part", choices=["jax", "torch"], help=argparse.SUPPRESS)
    add_cpu_options_arg(p)
    args = p.parse_args(argv)
    apply_cpu_options(args)
    if args.part:
        args.config, args.remat, args.xla_flags = args.config[0], args.remat[0], args.xla_flags[0]
        args.latents, args.batch = args.latents[0], args.batch[0]
        args.conv_backward = args.conv_backward[0]
        {"jax": part_jax, "torch": part_torch}[args.part](args)
        return

    emit(dict(part="start", script="train.py", argv=sys.argv[1:], **machine()))
    t_start, records = time.perf_counter(), []
    for config in args.config:
        res = args.resolution or {"tiny": 32, "sd21": 128}[config]
        batches = args.batch or [{"tiny": 8, "sd21": 1}[config]]
        base = args.base_dir or Path(tempfile.gettempdir()) / f"jointnet_bench_base_{config}"
        need, have = memory_needed_gb(config), mem_available_gb()
        if need > have and not args.force:
            rec = dict(
                part="train", config=config, skipped=f"needs ~{need:.0f} GB host memory, {have:.1f} GB available"
            )
            emit(rec)
            records.append(rec)
            continue
        t0 = time.perf_counter()
        code = "import sys, train; from pathlib import Path; "
        code += f"train.base_folder(train.argparse.Namespace(config={config!r}, base_dir=Path({str(base)!r})))"
        import subprocess

        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)  # writer's memory stays out
        emit(dict(part="base", config=config, path=str(base), seconds=round(time.perf_counter() - t0, 1)))
        for batch, remat in itertools.product(batches, args.remat):  # JAX and torch alternate, a subprocess each
            child = ["--config", config, "--resolution", str(res), "--batch", str(batch), "--steps", str(args.steps)]
            child += ["--remat", remat, "--dtype", args.dtype, "--device", args.device, "--base-dir", str(base)]
            child += ["--threads", str(args.threads), "--attention", args.attention] + ["--profile"] * args.profile
            for name, conv, cached in itertools.product(args.xla_flags, args.conv_backward, args.latents):
                env = {"XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), FLAG_SETS[name]]).strip()}
                jax_child = child + ["--xla-flags", name, "--conv-backward", conv, "--latents", cached, "--part", "jax"]
                records += run_child(__file__, jax_child, env=env)
            if not args.skip_torch:
                records += run_child(__file__, child + ["--part", "torch"])
    emit(dict(part="done", seconds=round(time.perf_counter() - t_start, 1)))
    print()
    print(table(records))


if __name__ == "__main__":
    main()
