"""Where a training step's time goes on the CPU: the data loader, the compiled step, and inside the step the
XLA thunks by kind (convolutions, dots, fusions, copies, ...), from a ``jax.profiler`` trace.

    python benchmarks/profile_step.py --config demo              # the demo's stage 0 (pixel UNet, 32², batch 16)
    python benchmarks/profile_step.py --config demo --phase jointnet
    python benchmarks/profile_step.py --config sd21 --resolution 64 --batch 1   # benchmarks/train.py's base

It builds the real ``Trainer``, compiles and warms the step, then times ``--steps`` steps split into
``next(loader)`` + batch placement (host) and the step itself (blocked on its result), and traces one more
step. The trace's events of the XLA CPU runtime are summed by the kind of their HLO instruction (the event
name up to its first ``.``, e.g. ``convolution``, ``fusion``, ``dot``); a ``wrapped_``/``copy_`` prefix
is kept as its own kind, because on the CPU those are the kernel copies of the backward. One JSON line per
measurement, with a 1024² fp32 matmul as the machine's reference figure.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photos import matmul_reference  # noqa: E402
from sample import machine  # noqa: E402
from twin_forward import add_cpu_options_arg, apply_cpu_options, emit  # noqa: E402


def config_for(args):
    if args.config == "demo":
        from jointnet_jax.demo.config import default_config
        from jointnet_jax.demo.run import phase_config

        c = phase_config(default_config(), args.phase, base=str(args.base_dir) if args.base_dir else None)
        c.eval_every, c.export = 0, False
        return c
    from train import base_folder, train_config

    args.base_dir = args.base_dir or Path(tempfile.gettempdir()) / f"jointnet_bench_base_{args.config}"
    base_folder(args)
    args.remat, args.dtype = "off", "fp32"
    return train_config(args)


def kind(name: str) -> str:
    head = name.split(".")[0]
    return head if head else name


def thunk_times(trace_dir: Path) -> dict[str, float]:
    """Seconds per HLO kind over the XLA events of the newest perfetto trace under ``trace_dir``."""
    trace = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and _is_hlo(e.get("name", "")):
            totals[kind(e["name"])] += e["dur"] / 1e6
    return dict(totals.most_common())


def top_ops(trace_dir: Path, n: int = 15) -> list[tuple[str, float]]:
    """The ``n`` op names with the most seconds in the newest perfetto trace under ``trace_dir``: on a GPU or
    TPU the events of its device processes (kernels and XLA ops by name, per stream), on the CPU the XLA
    runtime's HLO events."""
    trace = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {
        e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    devices = {pid for pid, name in names.items() if "GPU" in name or "TPU" in name}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if (e.get("pid") in devices) if devices else _is_hlo(e.get("name", "")):
            totals[e.get("name", "")] += e["dur"] / 1e6
    return [(name, round(seconds, 5)) for name, seconds in totals.most_common(n)]


def _is_hlo(name: str) -> bool:
    """HLO instruction events are named ``<op>.<number>`` (``fusion.12``, ``convolution.3``)."""
    parts = name.rsplit(".", 1)
    return len(parts) == 2 and parts[1].isdigit() and " " not in name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["demo", "tiny", "sd21"], default="demo")
    p.add_argument("--phase", choices=["base", "jointnet", "direct_extend"], default="base", help="demo phase")
    p.add_argument("--base-dir", type=Path, default=None, help="demo stage 1: a trained base folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    add_cpu_options_arg(p)
    args = p.parse_args(argv)
    apply_cpu_options(args)
    import jax

    from jointnet_jax.training.trainer import Trainer

    emit(dict(part="start", script="profile_step.py", argv=sys.argv[1:], **machine()))
    trainer = Trainer(config_for(args), tempfile.mkdtemp(prefix="bench_profile_"))
    batch = trainer._global_batch(next(trainer.data))
    t0 = time.perf_counter()
    step = trainer.compiled_step(batch)
    compile_s = time.perf_counter() - t0
    state = trainer.state
    state, metrics = step(*trainer._args(state, batch))
    jax.block_until_ready(metrics)
    host, device = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = trainer._global_batch(next(trainer.data))
        t1 = time.perf_counter()
        state, metrics = step(*trainer._args(state, batch))
        jax.block_until_ready(metrics)
        host.append(t1 - t0)
        device.append(time.perf_counter() - t1)
    trace_dir = Path(tempfile.mkdtemp(prefix="bench_trace_"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        state, metrics = step(*trainer._args(state, batch))
        jax.block_until_ready(metrics)
    kinds = thunk_times(trace_dir)
    med = sorted(device)[len(device) // 2]
    emit(
        dict(
            part="step",
            config=args.config,
            phase=args.phase if args.config == "demo" else None,
            cpu_options=args.cpu_options,
            compile_s=round(compile_s, 1),
            loader_s=round(sorted(host)[len(host) // 2], 4),
            step_s=round(med, 4),
            steps_per_s=round(1 / (med + sorted(host)[len(host) // 2]), 3),
            gflop_per_step=trainer.flops and round(trainer.flops / 1e9, 2),
            thunk_total_s=round(sum(kinds.values()), 3),
            thunks_s={k: round(v, 4) for k, v in list(kinds.items())[:12]},
            matmul_ms=round(matmul_reference() * 1e3, 2),
        )
    )
    trainer.close()


if __name__ == "__main__":
    main()
