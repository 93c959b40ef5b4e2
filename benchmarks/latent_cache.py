"""Training steps/s with in-step encoding vs from the latent cache (``data.latents``), same records, same run.

    python benchmarks/latent_cache.py --config tiny                       # CPU, tiny config (2-core container: ~3 min)
    python benchmarks/latent_cache.py --config sd21 --resolution 64 --batch 1 --steps 2 --rounds 1 \
        --work-dir W --modes in_step        # SD2.1-shaped random base: then the same with --modes cached

Both measurements use the real ``Trainer`` (stage 1) on the same synthetic labelled records: ``in_step`` reads
them through the pixel loader (VAE encode + text encoder inside the compiled step), ``cached`` reads the latent
cache that ``jointnet-cache-latents`` wrote from them (``--cache-dtype``, with ``--flip``) in this run (the
job's time is reported too). Each mode: compile (timed on its own) and one warm-up step; then ``--rounds``
rounds alternate the modes, each timing ``--steps`` steps on one batch of the trainer's own loader (data
loading is excluded), and the median round is reported. The base is the tiny random
base or the SD2.1-shaped random one of ``benchmarks/train.py`` (imported from it: ``base_folder``,
``train_config``). A fixed reference, the time of one 1024x1024 fp32 matmul (``photos.matmul_reference``), is
measured in the same run so that figures from loaded machines can be compared. One JSON line per measurement,
then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photos import matmul_reference  # noqa: E402
from sample import machine  # noqa: E402
from train import base_folder, train_config  # noqa: E402
from twin_forward import emit  # noqa: E402


def write_records(folder: Path, num: int, size: int) -> Path:
    from jointnet_jax.data import records, synthetic

    if not folder.is_dir():
        records.write_shards((synthetic.make_example(i, size) for i in range(num)), folder, "labelled", num_shards=2)
    return folder


def cache_records(args, records_dir: Path, base: Path, out: Path) -> float:
    """Run the latent-cache job (DirectRunner); returns its wall time in seconds."""
    from jointnet_jax.data import latents

    start = time.perf_counter()
    argv = ["--input", str(records_dir), "--out", str(out), "--model", str(base), "--flip"]
    argv += ["--resolution", str(args.resolution), "--dtype", args.cache_dtype, "--batch-size", str(args.batch)]
    latents.main([*argv, "--runner", "DirectRunner"])
    return time.perf_counter() - start


def prepare(args, mode: str, paths: Path, workdir: Path):
    """A stage-1 trainer encoding in the step or reading the cache, its compiled step (compile timed), one
    batch of its own loader and the state after a warm-up step."""
    import jax

    from jointnet_jax.training.trainer import Trainer

    config = train_config(args)
    config.data.paths, config.data.latents = str(paths), mode == "cached"
    trainer = Trainer(config, workdir)
    batch = trainer._global_batch(next(trainer.data))
    start = time.perf_counter()
    step = trainer.compiled_step(batch)
    compile_s = time.perf_counter() - start
    state, metrics = step(*trainer._args(trainer.state, batch))
    jax.block_until_ready(metrics)
    return {"trainer": trainer, "step": step, "batch": batch, "state": state, "compile_s": round(compile_s, 2)}


def time_steps(run: dict, steps: int) -> float:
    """Seconds per step over ``steps`` steps (the state is carried on, as in training)."""
    import jax

    trainer, step, batch = run["trainer"], run["step"], run["batch"]
    start = time.perf_counter()
    for _ in range(steps):
        run["state"], metrics = step(*trainer._args(run["state"], batch))
    jax.block_until_ready((run["state"], metrics))
    return (time.perf_counter() - start) / steps


def measure(args, paths: dict[str, Path], work: Path) -> dict[str, dict]:
    """Both modes, timed in alternation over ``--rounds`` rounds (a loaded machine slows both alike); the
    median step time per mode."""
    runs = {mode: prepare(args, mode, path, work / f"workdir_{mode}") for mode, path in paths.items()}
    times = {mode: [] for mode in runs}
    try:
        for _ in range(args.rounds):
            for mode, run in runs.items():
                times[mode].append(time_steps(run, args.steps))
    finally:
        for run in runs.values():
            run["trainer"].close()
            run["trainer"].data.close()
    results = {}
    for mode, values in times.items():
        median = sorted(values)[len(values) // 2]
        results[mode] = {"mode": mode, "compile_s": runs[mode]["compile_s"], "step_s": round(median, 4)}
        results[mode] |= {"steps_per_s": 1 / median, "rounds": args.rounds, "steps": args.steps}
    return results


def table(rows: list[dict]) -> str:
    lines = ["| mode | compile s | step s | steps/s | steps/s x matmul ms |", "|---|---|---|---|---|"]
    for r in rows:
        norm = r["steps_per_s"] * r["matmul_ms"]
        lines.append(f"| {r['mode']} | {r['compile_s']} | {r['step_s']} | {r['steps_per_s']:.3f} | {norm:.3f} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("tiny", "sd21"), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the two modes")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    parser.add_argument("--remat", choices=("on", "off"), default="off")
    parser.add_argument("--cache-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("in_step", "cached"),
        default=["in_step", "cached"],
        help="run one mode per process at the SD2.1 shape (two such trainers do not fit in 23 GB)",
    )
    parser.add_argument("--work-dir", type=Path, help="records, cache, base and workdirs (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="latent_cache_bench_"))
    args.base_dir = work / f"base_{args.config}"
    base = base_folder(args)
    records_dir = write_records(work / "records", max(8, 2 * args.batch), max(48, args.resolution))
    cache_s = cache_records(args, records_dir, base, work / f"cache_{args.cache_dtype}")
    fields = dict(machine(), config=args.config, resolution=args.resolution, batch=args.batch, dtype=args.dtype)
    fields |= dict(
        cache_dtype=args.cache_dtype, cache_job_s=round(cache_s, 1), matmul_ms=round(matmul_reference() * 1e3, 2)
    )
    paths = {"in_step": records_dir, "cached": work / f"cache_{args.cache_dtype}"}
    results = measure(args, {mode: paths[mode] for mode in args.modes}, work)
    rows = [fields | result for result in results.values()]
    for row in rows:
        emit(row)
    print(table(rows))
    if len(rows) == 2:
        print(json.dumps({"speedup": rows[1]["steps_per_s"] / rows[0]["steps_per_s"]}))
    return rows


if __name__ == "__main__":
    main()
