"""Sampling speed of the SD2.1-base-shaped JointNet twin: time per step and per image of the compiled
denoising loop (``loop.denoise``: both branches, CFG 7.5, DDIM, one ``lax.fori_loop``) against a PyTorch
baseline that runs diffusers' ``UNet2DConditionModel`` twice per step (RGB and dense halves of the [uncond;
cond] batch) in a Python loop with diffusers' ``DDIMScheduler`` (how the official pipeline works).

    python benchmarks/sample.py                                  # CPU fp32, 256² (2 steps) and 512² (1 step)
    python benchmarks/sample.py --sizes 256 --steps 3 --skip-torch
    python benchmarks/sample.py --device gpu --dtype bf16 --steps 10

One subprocess per image size (clean memory and XLA state); inside it, the JAX loop and the torch loop are
built once and then timed alternately (``--repeats`` rounds, medians reported) so both see the same machine
load. Batch 1 prompt (model batch 2 with CFG), text (2, 77, 1024) random, random weights everywhere
(exchange layers random too, so nothing is skipped); the torch side holds ONE UNet and calls it twice per
step (same FLOPs as two UNets, half the memory). JAX compile time is measured with ``lower().compile()`` and
reported separately; the timed JAX calls reuse that executable. Per step = total / steps. Prints one JSON line
per measurement (prefixed records come from the children) and a markdown table.

On GPU, JAX uses bf16 weights/activations with cuDNN attention (``attention.dot_product_attention``'s
``auto`` choice for bf16 on GPU) and torch uses CUDA in the same dtype (SDPA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twin_forward import RESULT, SD21_UNET_CONFIG, emit, peak_rss_bytes, random_twin, report  # noqa: E402

GUIDANCE = 7.5


def machine() -> dict:
    import platform

    return dict(host=platform.node(), cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def run_child(script: str, argv: list[str], env: dict | None = None) -> list[dict]:
    """Run ``script argv`` in a fresh interpreter; forward and return its ``RESULT``-prefixed records."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.Popen([sys.executable, script, *argv], env=env, stdout=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        if line.startswith(RESULT):
            rec = json.loads(line[len(RESULT) :])
            emit(rec)
            records.append(rec)
    if proc.wait() != 0:
        rec = dict(error=f"child exited with {proc.returncode}", argv=argv)
        emit(rec)
        records.append(rec)
    return records


def scheduler_config() -> dict:
    from jointnet_jax.models.tiny import SCHEDULER  # stabilityai/stable-diffusion-2-1-base scheduler_config.json

    return SCHEDULER


# ---------------------------------------------------------------------------------------------------------
# Child: one image size


def jax_loop(args, size: int, steps: int):
    """Returns (run() -> final latents, compile seconds, build seconds). ``run`` uses the AOT executable."""
    import jax
    import numpy as np
    from flax import nnx

    from jointnet_jax.diffusion.samplers import make_sampler
    from jointnet_jax.diffusion.schedule import load_schedule
    from jointnet_jax.pipelines import loop

    t0 = time.perf_counter()
    jn = random_twin(args.dtype)
    build_s = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp())
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config()))
    sampler = make_sampler("ddim", load_schedule(folder), steps)
    graphdef, state = nnx.split(jn)
    rng = np.random.default_rng(size)
    latent = size // 8
    x = jax.numpy.asarray(rng.standard_normal((1, latent, latent, 8), np.float32) * sampler.init_noise_sigma)
    text = jax.numpy.asarray(rng.standard_normal((2, 77, 1024), np.float32))  # [uncond; cond]
    inputs = loop.LoopInputs(x=x, noise=x, known=None, generate=None, cond_rgb=None, cond_dense=None, text=text)
    key = jax.random.key(0)
    dyn = (state, inputs, GUIDANCE, 0.0, key)

    t0 = time.perf_counter()
    try:  # AOT: compile time on its own; calls then skip tracing and the jit cache lookup
        executable = loop.denoise.lower(graphdef, state, sampler, inputs, GUIDANCE, 0.0, key, guided=True).compile()
        compile_s = time.perf_counter() - t0

        def run():
            return jax.block_until_ready(executable(*dyn))

        run()
    except TypeError:  # a jax whose AOT call convention differs: first jitted call = compile + one run
        t0 = time.perf_counter()

        def run():
            return jax.block_until_ready(
                loop.denoise(graphdef, state, sampler, inputs, GUIDANCE, 0.0, key, guided=True)
            )

        run()
        compile_s = None
    first_s = time.perf_counter() - t0
    return run, compile_s, first_s, build_s


def torch_loop(args, size: int, steps: int):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "gpu" else "cpu"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in SD21_UNET_CONFIG.items() if not k.startswith("_")})
    unet = unet.to(dev, dtype).eval()
    scheduler = DDIMScheduler.from_config(scheduler_config())
    rng = np.random.default_rng(size)
    latent = size // 8
    x0 = torch.from_numpy(rng.standard_normal((1, 8, latent, latent), np.float32)).to(dev)
    text = torch.from_numpy(rng.standard_normal((2, 77, 1024), np.float32)).to(dev, dtype)

    def run():
        scheduler.set_timesteps(steps)
        x = x0 * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                xin = torch.cat([x, x]).to(dtype)  # [uncond; cond]
                eps = torch.cat(
                    [
                        unet(xin[:, :4], t, encoder_hidden_states=text).sample,
                        unet(xin[:, 4:], t, encoder_hidden_states=text).sample,
                    ],
                    1,
                ).float()
                uncond, cond = eps.chunk(2)
                x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
        if dev == "cuda":
            torch.cuda.synchronize()
        return x

    return run


def part_size(args) -> None:
    import jax
    import numpy as np

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    size, steps = args.sizes[0], args.steps[0]
    common = dict(part="sample", size=size, latent=size // 8, steps=steps, dtype=args.dtype, device=args.device)
    run_jax, compile_s, first_s, build_s = jax_loop(args, size, steps)
    out = np.asarray(run_jax())
    report(
        dict(
            common,
            event="compiled",
            jax_build_s=round(build_s, 1),
            jax_compile_s=compile_s and round(compile_s, 1),
            jax_first_call_s=round(first_s, 1),
            backend=jax.default_backend(),
            finite=bool(np.isfinite(out).all()),
        )
    )
    run_torch = None
    if not args.skip_torch:
        run_torch = torch_loop(args, size, steps)
        t0 = time.perf_counter()
        run_torch()  # warm-up (allocator, oneDNN / cuDNN kernel selection)
        report(dict(common, event="torch warm-up", torch_first_call_s=round(time.perf_counter() - t0, 1)))
    jax_times, torch_times = [], []
    for _ in range(args.repeats):  # alternated, so both see the same load
        t0 = time.perf_counter()
        run_jax()
        jax_times.append(time.perf_counter() - t0)
        if run_torch is not None:
            t0 = time.perf_counter()
            run_torch()
            torch_times.append(time.perf_counter() - t0)
    jax_s = float(np.median(jax_times))
    rec = dict(
        common,
        jax_image_s=round(jax_s, 3),
        jax_step_s=round(jax_s / steps, 3),
        jax_all_s=[round(x, 3) for x in jax_times],
        jax_compile_s=compile_s and round(compile_s, 1),
    )
    if torch_times:
        torch_s = float(np.median(torch_times))
        rec.update(
            torch_image_s=round(torch_s, 3),
            torch_step_s=round(torch_s / steps, 3),
            torch_all_s=[round(x, 3) for x in torch_times],
            ratio_jax_over_torch=round(jax_s / torch_s, 3),
        )
    rec["peak_rss_gb"] = round(peak_rss_bytes() / 1e9, 2)
    if args.device == "gpu":
        stats = jax.local_devices()[0].memory_stats() or {}
        rec["jax_peak_gpu_gb"] = round(stats.get("peak_bytes_in_use", 0) / 1e9, 2)
        rec["gpu"] = jax.devices()[0].device_kind
    report(rec)


# ---------------------------------------------------------------------------------------------------------
# Parent


def table(records: list[dict]) -> str:
    lines = [
        "| size (latent), steps | dtype, device | JAX compile (s) | JAX per step (s) | torch per step (s) "
        "| JAX / torch | JAX per image (s) | torch per image (s) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r.get("part") == "sample" and "jax_step_s" in r):
        lines.append(
            f"| {r['size']}² ({r['latent']}²), {r['steps']} | {r['dtype']}, {r['device']} | {r['jax_compile_s']} "
            f"| {r['jax_step_s']} | {r.get('torch_step_s', '-')} | {r.get('ratio_jax_over_torch', '-')} "
            f"| {r['jax_image_s']} | {r.get('torch_image_s', '-')} | {r['load']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (latent = side / 8)")
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="timed DDIM steps: one value, or one per size (default: 2 1 on CPU, 3 on GPU)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="alternated timed runs per size (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = [2, 1][: len(args.sizes)] if args.device == "cpu" and args.sizes == [256, 512] else [3]
    if len(args.steps) == 1:
        args.steps = args.steps * len(args.sizes)
    if len(args.steps) != len(args.sizes):
        p.error("--steps takes one value or one per size")
    if args.part:
        part_size(args)
        return

    emit(dict(part="start", script="sample.py", argv=sys.argv[1:], **machine()))
    t_start = time.perf_counter()
    records = []
    for size, steps in zip(args.sizes, args.steps, strict=True):
        child = ["--part", "--sizes", str(size), "--steps", str(steps), "--dtype", args.dtype]
        child += ["--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
        records += run_child(__file__, child + (["--skip-torch"] if args.skip_torch else []))
    emit(dict(part="done", seconds=round(time.perf_counter() - t_start, 1)))
    print()
    print(table(records))


if __name__ == "__main__":
    main()
