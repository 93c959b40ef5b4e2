"""SD2.1-base-shaped JointNet twin: parameter count, peak host memory while loading, and forward time.

Compares the jitted JAX twin (``compiled(jn)``) against diffusers' PyTorch ``UNet2DConditionModel`` called
twice (the torch twin baseline), interleaved in the same process, with and without the XLA CPU flag
``--xla_cpu_experimental_ynn_fusion_type=individual_dot``. Every part runs in its own subprocess (clean
XLA flags, clean memory high-water mark). Prints one JSON line per measurement and a markdown table.

    python benchmarks/twin_forward.py                      # everything, CPU fp32, latents 32 and 64
    python benchmarks/twin_forward.py --sizes 32 --skip-memory --skip-torch
    python benchmarks/twin_forward.py --device gpu --dtype bf16 --skip-memory --xla-flags default

Random weights throughout (timings do not depend on the values). The memory part writes a random SD2.1-size
twin checkpoint in the official layout (``unet/`` + ``jointnet/``, ~6.9 GB fp32) once into ``--ckpt-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
FLAG_SETS = {"default": "", "individual_dot": YNN_FLAG}

SD21_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

RESULT = "@@"  # prefix of the JSON lines a child reports to the parent


def emit(record: dict) -> None:
    record.setdefault("load", round(os.getloadavg()[0], 2))
    print(json.dumps(record), flush=True)


def report(record: dict) -> None:
    """A child's measurement: printed for the log, forwarded to the parent."""
    print(RESULT + json.dumps(record), flush=True)


CPU_OPTIONS_ENV = "JOINTNET_BENCH_CPU_OPTIONS"


def add_cpu_options_arg(p: argparse.ArgumentParser) -> None:
    """``--cpu-options none``, a benchmark-only switch: compile without ``models/functional.py``'s per-program
    CPU options (YNNPACK keeps the convolutions: the code path before 2026-12-03's evening). Children inherit
    it through the environment."""
    p.add_argument(
        "--cpu-options",
        choices=["project", "none"],
        default=os.environ.get(CPU_OPTIONS_ENV, "project"),
        help="benchmark-only: 'none' = XLA's CPU defaults for every program (the earlier code path)",
    )


def apply_cpu_options(args) -> None:
    os.environ[CPU_OPTIONS_ENV] = args.cpu_options
    if args.cpu_options == "none":
        from jointnet_jax.models import functional

        functional.CPU_COMPILER_OPTIONS.clear()


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------------------
# Model construction (random weights, built abstractly and filled tensor by tensor)


def jax_dtype(name):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


def abstract_twin(dtype="fp32"):
    from flax import nnx

    from jointnet_jax.models import weights
    from jointnet_jax.models.jointnet import JointNet
    from jointnet_jax.models.unet import UNetConfig

    config = UNetConfig.from_dict(SD21_UNET_CONFIG)
    return weights.abstract(lambda: JointNet(config, dtype=jax_dtype(dtype), rngs=nnx.Rngs(0)))


class RandomTensors:
    """A ``weights.fill`` source: PyTorch-layout random float32 tensors for every parameter of ``model``.

    Values are windows of one pre-drawn normal pool (fast: 1.75e9 parameters), scaled by 1/sqrt(fan_in).
    """

    def __init__(self, model, seed=0):
        import numpy as np
        from flax import nnx

        from jointnet_jax.models import weights

        self.shapes = {}
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            leaf = str(path[-1])
            shape = tuple(var.get_value().shape)
            self.shapes[weights.torch_key(path)] = weights.to_torch_layout(leaf, np.empty(shape, np.int8)).shape
        rng = np.random.default_rng(seed)
        self.pool = rng.standard_normal(1 << 24, dtype=np.float32)
        self.rng = rng

    def keys(self):
        return set(self.shapes)

    def get(self, key):
        import numpy as np

        shape = self.shapes[key]
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = 0.02 if len(shape) == 1 else fan_in**-0.5
        size = int(np.prod(shape))
        reps = -(-size // (self.pool.size - 1024))
        start = int(self.rng.integers(0, 1024))
        flat = self.pool[start : start + size] if reps == 1 else np.tile(self.pool, reps)[start : start + size]
        return (flat * np.float32(std)).reshape(shape)


def random_twin(dtype="fp32"):
    from jointnet_jax.models import weights

    model = abstract_twin(dtype)
    return weights.fill(model, RandomTensors(model), source="random")


# ---------------------------------------------------------------------------------------------------------
# Parts (each runs in its own subprocess)


def part_params(args) -> None:
    import numpy as np
    from flax import nnx

    model = abstract_twin()
    per_branch = {}
    for name in ("unet", "jointnet"):
        flat = nnx.to_flat_state(nnx.state(getattr(model, name), nnx.Param))
        total = sum(int(np.prod(v.get_value().shape)) for _, v in flat)
        extra = sum(int(np.prod(v.get_value().shape)) for p, v in flat if str(p[0]).startswith("jointnet_"))
        per_branch[name] = (total, extra)
        report(dict(part="params", branch=name, params=total, unet_params=total - extra, exchange_params=extra))
    total = sum(t for t, _ in per_branch.values())
    extra = sum(e for _, e in per_branch.values())
    report(dict(part="params", branch="twin", params=total, unet_params=total - extra, exchange_params=extra))


def write_random_checkpoint(folder: Path, storage: str) -> None:
    """The official layout (``unet/``, ``jointnet/``), random tensors, written one branch at a time."""
    import numpy as np
    from safetensors.numpy import save_file

    model = abstract_twin()
    source = RandomTensors(model, seed=1)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("unet", "jointnet"):
        prefix = name + "."
        dt = np.float16 if storage == "fp16" else np.float32
        tensors = {k[len(prefix) :]: source.get(k).astype(dt) for k in sorted(source.keys()) if k.startswith(prefix)}
        (tmp / name).mkdir(parents=True)
        save_file(tensors, str(tmp / name / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        config = getattr(model, name).branch_config()
        (tmp / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        del tensors
    tmp.rename(folder)


def part_memory(args) -> None:
    """Peak RSS of ``jj.load_jointnet`` on a saved SD2.1-size twin (this process does nothing else)."""
    import jax
    import numpy as np
    from flax import nnx

    import jointnet_jax as jj

    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline reading
    before = rss_bytes()
    t0 = time.perf_counter()
    jn = jj.load_jointnet(args.ckpt_dir)
    jax.block_until_ready(nnx.state(jn))
    seconds = time.perf_counter() - t0
    n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(jn, nnx.Param)))
    ckpt = sum(f.stat().st_size for f in Path(args.ckpt_dir).rglob("*.safetensors"))
    report(
        dict(
            part="memory",
            params=n,
            model_fp32_gb=round(4 * n / 1e9, 3),
            checkpoint_gb=round(ckpt / 1e9, 3),
            rss_before_gb=round(before / 1e9, 3),
            rss_after_gb=round(rss_bytes() / 1e9, 3),
            peak_rss_gb=round(peak_rss_bytes() / 1e9, 3),
            peak_over_model=round((peak_rss_bytes() - before) / (4 * n), 3),
            load_s=round(seconds, 1),
        )
    )


def part_forward(args) -> None:
    """Interleaved JAX twin vs torch twin forward timings, in one process (the flags come from XLA_FLAGS)."""
    import jax
    import numpy as np

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    from jointnet_jax.models import attention
    from jointnet_jax.models.functional import compiled

    if args.attention != "auto":  # benchmark-only override of the attention kernel the model uses
        original = attention.dot_product_attention
        attention.dot_product_attention = lambda q, k, v, *, upcast=False, impl="auto": original(
            q, k, v, upcast=upcast, impl=args.attention
        )

    t0 = time.perf_counter()
    jn = random_twin(args.dtype)
    build_s = time.perf_counter() - t0
    fwd = compiled(jn)

    torch_unet = None
    if not args.skip_torch:
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_num_threads(args.threads)
        tdev = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
        tdtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        config = {k: v for k, v in SD21_UNET_CONFIG.items() if not k.startswith("_")}
        torch_unet = UNet2DConditionModel(**config).to(tdev, tdtype).eval()

    common = dict(part="forward", device=args.device, dtype=args.dtype, xla_flags=flags, attention=args.attention)
    report(dict(common, event="built", jax_build_s=round(build_s, 1), backend=jax.default_backend()))
    for size in args.sizes:
        rng = np.random.default_rng(size)
        b = args.batch
        x_rgb = jax.numpy.asarray(rng.standard_normal((b, size, size, 4), np.float32))
        x_dense = jax.numpy.asarray(rng.standard_normal((b, size, size, 4), np.float32))
        text = jax.numpy.asarray(rng.standard_normal((b, 77, 1024), np.float32))
        t = jax.numpy.asarray(np.array([500] * b, np.int32))

        def run_jax(x_rgb=x_rgb, x_dense=x_dense, t=t, text=text):
            return jax.block_until_ready(fwd(x_rgb, x_dense, t, text))

        t0 = time.perf_counter()
        out = run_jax()
        first_s = time.perf_counter() - t0
        finite = bool(all(np.isfinite(np.asarray(o, np.float32)).all() for o in out))

        run_torch = None
        if torch_unet is not None:
            import torch

            tx = [torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).to(tdev, tdtype) for a in (x_rgb, x_dense)]
            ttext = torch.from_numpy(np.asarray(text)).to(tdev, tdtype)
            tt = torch.tensor([500] * b, device=tdev)

            def run_torch(tx=tx, ttext=ttext, tt=tt):
                with torch.inference_mode():
                    outs = [torch_unet(x, tt, encoder_hidden_states=ttext).sample for x in tx]
                if tdev == "cuda":
                    torch.cuda.synchronize()
                return outs

            run_torch()  # warm-up

        jax_times, torch_times = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            run_jax()
            jax_times.append(time.perf_counter() - t0)
            if run_torch is not None:
                t0 = time.perf_counter()
                run_torch()
                torch_times.append(time.perf_counter() - t0)
        rec = dict(
            common,
            latent=size,
            batch=b,
            jax_first_call_s=round(first_s, 1),
            jax_s=round(float(np.median(jax_times)), 3),
            jax_all_s=[round(x, 3) for x in jax_times],
            finite=finite,
        )
        if torch_times:
            rec.update(
                torch_s=round(float(np.median(torch_times)), 3),
                torch_all_s=[round(x, 3) for x in torch_times],
                ratio_jax_over_torch=round(float(np.median(jax_times) / np.median(torch_times)), 3),
            )
        report(rec)


# ---------------------------------------------------------------------------------------------------------
# Parent: runs the parts in subprocesses, collects their records, prints the table


def run_child(args, part: str, xla_flags: str | None = None, extra: list[str] | None = None) -> list[dict]:
    env = dict(os.environ)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, __file__, "--part", part, *child_args(args), *(extra or [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    records = []
    for line in proc.stdout:
        if line.startswith(RESULT):
            rec = json.loads(line[len(RESULT) :])
            emit(rec)
            records.append(rec)
    if proc.wait() != 0:
        emit(dict(part=part, error=f"child exited with {proc.returncode}", xla_flags=xla_flags))
    return records


def child_args(args) -> list[str]:
    out = ["--sizes", *map(str, args.sizes), "--dtype", args.dtype, "--device", args.device]
    out += ["--ckpt-dir", str(args.ckpt_dir), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out += ["--batch", str(args.batch), "--attention", args.attention]
    return out + (["--skip-torch"] if args.skip_torch else [])


def table(records: list[dict]) -> str:
    lines = []
    params = [r for r in records if r.get("part") == "params"]
    if params:
        lines += ["| parameters | total | UNet | exchange layers |", "|---|---|---|---|"]
        for r in params:
            unet, extra = (f"{r[k]:,}" if k in r else "-" for k in ("unet_params", "exchange_params"))
            lines.append(f"| {r['branch']} | {r['params']:,} | {unet} | {extra} |")
        lines.append("")
    for r in (r for r in records if r.get("part") == "memory" and "peak_rss_gb" in r):
        lines += [
            "| load_jointnet | model fp32 | checkpoint on disk | RSS before | peak RSS | (peak - before) / model |",
            "|---|---|---|---|---|---|",
            f"| SD2.1 twin | {r['model_fp32_gb']} GB | {r['checkpoint_gb']} GB | {r['rss_before_gb']} GB "
            f"| {r['peak_rss_gb']} GB | {r['peak_over_model']} |",
            "",
        ]
    fwd = [r for r in records if r.get("part") == "forward" and "latent" in r]
    if fwd:
        lines += ["| twin forward | XLA flags | attention | JAX (s) | torch ×2 (s) | JAX / torch | load |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in fwd:
            flag = {v: k for k, v in FLAG_SETS.items()}.get(r["xla_flags"], r["xla_flags"])
            lines.append(
                f"| {r['latent']}×{r['latent']}, batch {r['batch']}, {r['dtype']}, {r['device']} | {flag} "
                f"| {r['attention']} | {r['jax_s']} | {r.get('torch_s', '-')} | {r.get('ratio_jax_over_torch', '-')} "
                f"| {r['load']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (pixels / 8)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="warm calls per measurement (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-params", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument(
        "--xla-flags",
        nargs="+",
        choices=sorted(FLAG_SETS),
        default=None,
        help="XLA flag sets to time (default: both on CPU, 'default' on GPU)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "blockwise", "reference", "xla"],
        help="force an attention kernel (benchmark-only override)",
    )
    p.add_argument("--ckpt-dir", type=Path, default=Path("runs/jointnet_twin_sd21_random"))
    p.add_argument("--ckpt-storage", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--keep-ckpt", action="store_true", help="keep the random checkpoint for later runs")
    p.add_argument("--part", choices=["params", "memory", "forward"], help=argparse.SUPPRESS)
    add_cpu_options_arg(p)
    args = p.parse_args(argv)
    apply_cpu_options(args)

    if args.part:
        {"params": part_params, "memory": part_memory, "forward": part_forward}[args.part](args)
        return

    emit(dict(part="start", argv=sys.argv[1:], cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M:%S")))
    t_start = time.perf_counter()
    records = []
    if not args.skip_params:
        records += run_child(args, "params")
    if not args.skip_memory:
        created = False
        if not args.ckpt_dir.exists():
            free = shutil.disk_usage(args.ckpt_dir.parent).free
            if args.ckpt_storage == "fp32" and free < 10e9:
                args.ckpt_storage = "fp16"
                emit(dict(part="memory", note=f"only {free / 1e9:.1f} GB free: writing the checkpoint in fp16"))
            t0 = time.perf_counter()
            # Written in a subprocess so that the writer's memory never mixes with the measurement.
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import twin_forward as tf; "
                f"from pathlib import Path; tf.write_random_checkpoint(Path({str(args.ckpt_dir)!r}), "
                f"{args.ckpt_storage!r})"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
            emit(dict(part="memory", event="checkpoint written", seconds=round(time.perf_counter() - t0, 1)))
            created = True
        records += run_child(args, "memory")
        if created and not args.keep_ckpt:
            shutil.rmtree(args.ckpt_dir, ignore_errors=True)
    if not args.skip_forward:
        flag_sets = args.xla_flags or (["default", "individual_dot"] if args.device == "cpu" else ["default"])
        for name in flag_sets:
            records += run_child(args, "forward", FLAG_SETS[name])
    emit(dict(part="done", seconds=round(time.perf_counter() - t_start, 1)))
    print()
    print(table(records))


if __name__ == "__main__":
    main()
