"""The demo's long check run (issue 18): the same recipe with ``--multiplier`` times the steps, to tell a bug
from a budget problem. If image -> depth still plateaus near the demo's AbsRel with 4x the steps, something
is wrong; if it keeps falling, the demo is budget-bound.

    python benchmarks/demo_check_run.py --out runs/demo_check [--multiplier 4] [--num-scenes 32]

What it trains, with the demo's config (``jointnet_jax/demo/config.py``) and data:

1. stage 0 to the demo's ``base_steps`` and an export there (the demo's base);
2. JointNet stage 1 from that base for the demo's ``joint_steps`` (the demo's own result, as the reference);
3. stage 0 continued to ``multiplier x base_steps`` (the learning rate is constant after warm-up, so
   continuing is the same run as training that long from the start);
4. JointNet stage 1 from the long base, scored every ``joint_steps`` up to ``multiplier x joint_steps``.

Each score is image -> depth on the same ``--num-scenes`` held-out scenes (the demo's protocol: affine-invariant
AbsRel and delta1, 25 DDIM steps, one sample) plus the held-out RGB and dense eval losses. Rows are printed
and appended to ``OUT/check_run.json``, with the 1024² matmul reference of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(trainer, config, label: str, base_steps: int, joint_steps: int, scenes) -> dict:
    """Image -> depth on the held-out scenes and the last held-out losses of ``trainer``."""
    from jointnet_jax.demo.run import depth_scores

    captions, images, gt_depth = scenes
    d = config.demo
    pred = trainer.pipeline().depth(
        captions,
        images,
        cfg=1.0,
        height=config.data.resolution,
        width=config.data.resolution,
        steps=d.sample_steps,
        seed=d.seed,
        progress=False,
    )["depth"]
    last = trainer.evaluate()
    row = {"run": label, "base_steps": base_steps, "joint_steps": joint_steps, **depth_scores(pred, gt_depth)}
    row.update({k: float(v) for k, v in last.items()})
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--multiplier", type=int, default=4)
    p.add_argument("--num-scenes", type=int, default=32)
    p.add_argument("--config-arg", default="", help="demo config argument: '' (the demo) or 'tiny' (a smoke run)")
    args = p.parse_args(argv)

    from benchmarks.photos import matmul_reference
    from jointnet_jax.demo.config import default_config
    from jointnet_jax.demo.run import held_out_scenes, phase_config
    from jointnet_jax.training.trainer import Trainer

    config, out, m = default_config(args.config_arg), args.out, args.multiplier
    d = config.demo
    long = default_config(args.config_arg)
    long.demo.update(base_steps=m * d.base_steps, joint_steps=m * d.joint_steps)
    scenes = held_out_scenes(config, args.num_scenes)
    rows, t0 = [], time.perf_counter()
    header = {"matmul_1024_ms": 1e3 * matmul_reference(), "multiplier": m, "num_scenes": args.num_scenes}
    print(json.dumps(header), flush=True)

    def save(row):
        rows.append({**row, "elapsed_min": (time.perf_counter() - t0) / 60})
        tmp = out / "check_run.json.tmp"
        tmp.write_text(json.dumps({**header, "rows": rows}, indent=1))
        tmp.replace(out / "check_run.json")

    base = Trainer(phase_config(long, "base"), out / "base")
    base.train(d.base_steps - int(base.state.step))
    short_base = out / "base_short_export"
    if not short_base.is_dir():
        base.export(short_base)
    data = {"paths": base.data_config.paths, "eval_paths": base.eval_data_config.paths}
    ref = Trainer(phase_config(config, "jointnet", str(short_base), data), out / "jointnet_short_base")
    ref.train()
    save(score(ref, config, "demo (short base)", d.base_steps, d.joint_steps, scenes))
    ref.close()

    base.train()  # to multiplier x base_steps; exports to out/base/export
    jn = Trainer(phase_config(long, "jointnet", str(out / "base" / "export"), data), out / "jointnet_long_base")
    while int(jn.state.step) < long.demo.joint_steps:
        jn.train(d.joint_steps)
        save(score(jn, config, "long base", long.demo.base_steps, int(jn.state.step), scenes))
    save({"run": "base eval history", "base_eval_history": base.eval_history})
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
