"""The demo's report: ``metrics.json`` and the human summary ``report.md`` next to the grids."""

from __future__ import annotations

import json
from pathlib import Path

from jointnet_jax.io_utils import atomic_write


def write_report(metrics: dict, report: Path) -> None:
    """``metrics.json`` and ``report.md`` next to the grids (each written atomically)."""
    for name, text in (("metrics.json", json.dumps(metrics, indent=2, default=str)), ("report.md", markdown(metrics))):
        atomic_write(report / name, lambda tmp, text=text: tmp.write_text(text))


def markdown(m: dict) -> str:
    """The human summary of ``metrics.json``."""
    ok = lambda key: "met" if m["met"][key] else "**missed**"  # noqa: E731
    c, t, dep = m["checks"], m["targets"], m["image_to_depth"]
    rows = "\n".join(
        f"| {j['step']} | {j['eval_loss_rgb']:.4f} ({rj:+.2%}) | {e['eval_loss_rgb']:.4f} ({re:+.2%}) |"
        for j, rj, e, re in zip(
            m["jointnet_eval_history"],
            m["jointnet_rgb_rel_change"],
            m["direct_extend_eval_history"],
            m["direct_extend_rgb_rel_change"],
            strict=True,
        )
    )
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["timings_s"].items())
    return f"""# JointNet CPU demo report

Base model (stage 0) RGB eval loss on held-out scenes: **{m["base_eval_loss_rgb"]:.4f}**.

## Output preservation: RGB eval loss during training (fixed noise and timesteps)

| step | JointNet stage 1 | Direct Extend |
|---:|---:|---:|
{rows}

| claim | measured | target | |
|---|---:|---:|---|
| JointNet RGB eval loss within 2% of the base throughout | max change {c["jointnet_rgb_max_rel_change"]:.2%} \
(max rise {max(m["jointnet_rgb_rel_change"]):+.2%}) | \
<= {t["jointnet_rgb_max_rel_change"]:.0%} | {ok("jointnet_rgb_max_rel_change")} |
| Direct Extend RGB eval loss rises by more than 20% | max rise {c["direct_extend_rgb_max_rel_rise"]:+.2%} | \
> {t["direct_extend_rgb_max_rel_rise"]:.0%} | {ok("direct_extend_rgb_max_rel_rise")} |
| JointNet image -> depth AbsRel | {dep["absrel"]:.3f} (constant depth: {dep["constant_absrel"]:.3f}) | \
<= {t["image_to_depth_absrel"]:.2f} | {ok("image_to_depth_absrel")} |

Image -> depth on {m["config"]["demo"]["num_scenes"]} held-out scenes: AbsRel {dep["absrel"]:.3f}, RMSE (disparity) \
{dep["rmse_disp"]:.3f}, delta1 {dep["delta1"]:.3f}; a constant-depth predictor: AbsRel {dep["constant_absrel"]:.3f}, \
delta1 {dep["constant_delta1"]:.3f}.

![image to depth](image_to_depth.png)

`image_to_depth.png`: input | predicted depth | ground truth (near = bright), one held-out scene per row.
`joint_generation.png`: RGB | depth generated jointly from the held-out captions.
`rgb_base_jointnet_direct_extend.png`: the same captions and seeds through the base model | JointNet | Direct Extend.

![joint generation](joint_generation.png) ![base, JointNet, Direct Extend](rgb_base_jointnet_direct_extend.png)

Wall time: {times}.
"""
