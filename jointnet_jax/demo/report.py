"""The demo's report: ``metrics.json`` and the human summary ``report.md`` next to the grids."""

from __future__ import annotations

import json
from pathlib import Path

from jointnet_jax.io_utils import atomic_write


def write_report(metrics: dict, report: Path) -> None:
    """``metrics.json`` and ``report.md`` next to the grids (each written atomically)."""
    for name, text in (("metrics.json", json.dumps(metrics, indent=2, default=str)), ("report.md", markdown(metrics))):
        atomic_write(report / name, lambda tmp, text=text: tmp.write_text(text))


def _targets_table(m: dict) -> str:
    rows = [
        f"| {c['what']} | {c['value']:.4g} | {c['rule']} {c['threshold']:g} | {'met' if c['met'] else '**missed**'} |"
        for c in m["checks"].values()
    ]
    return "| target | measured | threshold | |\n|---|---:|---:|---|\n" + "\n".join(rows)


def _eval_rows(m: dict) -> str:
    jn, de = m["jointnet_eval_history"], m["direct_extend_eval_history"]
    rows = []
    for i in range(max(len(jn), len(de))):
        cells = []
        for history, rel, marginal in (
            (jn, m["jointnet_rgb_rel_change"], m["jointnet_rgb_marginal_rel_change"]),
            (de, m["direct_extend_rgb_rel_change"], m["direct_extend_rgb_marginal_rel_change"]),
        ):
            cells += (
                [f"{history[i]['step']}", f"{rel[i]:+.2%}", f"{marginal[i]:+.2%}"] if i < len(history) else [""] * 3
            )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _probe_rows(m: dict) -> str:
    jn = {p["step"]: p["distance"] for p in m["jointnet_same_seed"]}
    de = {p["step"]: p["distance"] for p in m["direct_extend_same_seed"]}
    cell = lambda d, s: f"{d[s]:.4f}" if s in d else ""  # noqa: E731
    return "\n".join(f"| {s} | {cell(jn, s)} | {cell(de, s)} |" for s in sorted(set(jn) | set(de)))


def markdown(m: dict) -> str:
    """The human summary of ``metrics.json``."""
    dep, d = m["image_to_depth"], m["config"]["demo"]
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["timings_s"].items())
    rates = ", ".join(f"{k} {v:.2f}" for k, v in m.get("steps_per_s", {}).items())
    reference = m.get("matmul_1024_fp32_ms")
    return f"""# JointNet CPU demo report

{_targets_table(m)}

## Image -> depth

On {d["num_scenes"]} held-out scenes ({d["sample_steps"]} DDIM steps, an ensemble of {d.get("ensemble", 1)} \
samples per scene): AbsRel {dep["absrel"]:.3f}, RMSE (disparity) {dep["rmse_disp"]:.3f}, \
delta1 {dep["delta1"]:.3f}; a constant-depth predictor: AbsRel {dep["constant_absrel"]:.3f}, \
delta1 {dep["constant_delta1"]:.3f}.

![image to depth](image_to_depth.png)

`image_to_depth.png`: input | predicted depth | ground truth (near = bright), one held-out scene per row.

## Output preservation

RGB eval loss on held-out scenes (fixed noise and timesteps) relative to the base model's \
({m["base_eval_loss_rgb"]:.4f}), in joint denoising and with a dense input of pure noise (the RGB marginal):

| JointNet step | joint | marginal | Direct Extend step | joint | marginal |
|---:|---:|---:|---:|---:|---:|
{_eval_rows(m)}

Same-seed RGB distance to the base model's samples (mean absolute per-pixel difference in [0, 1], \
{d["probe_scenes"]} held-out captions); the base's own seed-to-seed distance is {m["base_seed_to_seed_distance"]:.4f}:

| step | JointNet | Direct Extend |
|---:|---:|---:|
{_probe_rows(m)}

`rgb_base_jointnet_direct_extend.png`: the same captions and seeds through the base model | JointNet | Direct Extend.
`joint_generation.png`: RGB | depth generated jointly from the held-out captions.

![base, JointNet, Direct Extend](rgb_base_jointnet_direct_extend.png) ![joint generation](joint_generation.png)

## Time

Wall time: {times}. Training steps/s: {rates}. Reference 1024² fp32 matmul: \
{f"{reference:.2f} ms" if reference else "not measured"}.
"""
