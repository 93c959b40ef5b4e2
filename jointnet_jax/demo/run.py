"""The embedded demo: the paper's main claims reproduced at CPU scale, end to end, in one command.

    make demo                                   # = python -m jointnet_jax.demo --out runs/demo
    python -m jointnet_jax.demo --config configs/demo.py:tiny --out runs/demo_tiny   # smoke-sized

Nobody can download SD2.1 or COYO here, so the demo brings its own pre-trained model: stage 0 trains a
small pixel-space text-to-image UNet on the synthetic world (``data/synthetic.py``; captions encoded by a
tiny CLIP text encoder that stays frozen at its random initialisation, a fixed text feature map the UNet
learns to read). Then, with the same budget each:

* **JointNet stage 1** (RGB branch frozen, dense branch + exchange layers trained);
* **Direct Extend** (paper Fig. 2a: one UNet widened to RGB + depth, everything trained).

The RGB eval loss of both, on held-out scenes with fixed noise and timesteps, is compared with the base
model's throughout training (the output-preserving claim, paper Fig. 9 and App. A.1); JointNet then
predicts depth from held-out images (image -> depth by channel-wise inpainting, paper §4) scored with the paper's
affine-invariant AbsRel (§5.2) against the exact synthetic depth, next to a constant-depth predictor; and
jointly generates RGB + depth for held-out captions. The report folder holds the grids, ``metrics.json``
and ``report.md``; the targets are checked and reported as met or missed, never tuned.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from jointnet_jax.demo import probes
from jointnet_jax.demo.report import write_report
from jointnet_jax.demo.targets import TARGETS, check
from jointnet_jax.io_utils import image_grid, write_png_rgb


def phase_config(config, phase: str, base: str | None = None, data: dict | None = None):
    """The Trainer config of one phase: ``base`` (stage 0), ``jointnet`` (stage 1), ``direct_extend``."""
    c = copy.deepcopy(config)
    d = c.demo
    c.warmup_steps = d.warmup_steps
    if phase == "base":
        c.stage, c.model, c.total_steps, c.lr = 0, "jointnet", d.base_steps, d.base_lr
    else:
        c.stage, c.model, c.total_steps, c.lr = 1, phase, d.joint_steps, d.joint_lr
        c.base = base
    if data:
        c.data.paths, c.data.eval_paths = data["paths"], data["eval_paths"]
    return c


TITLES = {
    "base": "stage 0: base model",
    "jointnet": "stage 1: JointNet (RGB frozen)",
    "direct_extend": "baseline: Direct Extend",
}


def train_phase(config, phase: str, out, base=None):
    """Train one phase into ``out/phase`` and return its ``Trainer`` (its ``eval_history`` holds the held-out
    losses). Phases after ``base`` take the base trainer and reuse its data and eval set, and are trained in
    chunks of ``demo.probe_every`` steps with the same-seed probe (``probes.py``) before each chunk and at the
    end. The trainer returned carries ``probe_curve`` (the probe's points; none for the base) and
    ``step_times`` (seconds of each step this call trained)."""
    from jointnet_jax.training.trainer import Trainer

    data = None
    if base is not None:
        data = {"paths": base.data_config.paths, "eval_paths": base.eval_data_config.paths}
    c = phase_config(config, phase, base and str(base.workdir / "export"), data)
    print(f"\n== {TITLES[phase]}: {c.total_steps} steps, batch {c.batch_size}, lr {c.lr} ==", flush=True)
    trainer = Trainer(c, Path(out) / phase)
    history, trainer.probe_curve = [], []
    if base is None:
        history = trainer.train()
    else:
        captions = held_out_scenes(config, config.demo.probe_scenes)[0]
        reference = probes.reference(config, base, captions)
        curve, called = probes.load_curve(trainer.workdir), False
        while True:
            curve = probes.measure(trainer, config, captions, reference, curve)
            step = int(trainer.state.step)
            if step >= c.total_steps and called:  # train() was called at the end: the phase is exported
                break
            history += trainer.train(config.demo.probe_every - step % config.demo.probe_every)
            called = True
        trainer.probe_curve = curve
    trainer.step_times = [h["step_time"] for h in history]
    return trainer


def _relative(evals: list[dict], reference: float, key: str = "eval_loss_rgb") -> list[float]:
    return [e[key] / reference - 1.0 for e in evals]


def held_out_scenes(config, n: int):
    """Held-out scenes rendered at the training resolution: captions, images [0, 1], metric depth. Scene
    indices follow the training and eval sets', so none was seen in training."""
    from jointnet_jax.data import synthetic

    first = config.data.synthetic_num + config.data.synthetic_eval_num
    captions, images, depths = [], [], []
    for i in range(first, first + n):
        scene, buffers = synthetic.scene_buffers(i, config.data.resolution, seed=config.data.seed)
        captions.append(synthetic.caption(scene))
        images.append(buffers.rgb.astype(np.float32) / 255.0)
        depths.append(buffers.depth)
    return captions, np.stack(images).astype(np.float32), np.stack(depths)


def depth_scores(pred_disparity, gt_depth) -> dict:
    """Per-scene affine-invariant metrics (paper §5.2) averaged, and the constant-depth baseline."""
    from jointnet_jax.evaluation.depth import constant_depth_metrics, depth_metrics

    ours = [depth_metrics(p, g) for p, g in zip(pred_disparity, gt_depth, strict=True)]
    const = [constant_depth_metrics(g) for g in gt_depth]
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {
        "absrel": mean(ours, "absrel"),
        "rmse_disp": mean(ours, "rmse_disp"),
        "delta1": mean(ours, "delta1"),
        "constant_absrel": mean(const, "absrel"),
        "constant_delta1": mean(const, "delta1"),
    }


def gray(depth: np.ndarray) -> np.ndarray:
    """(B, H, W) disparity-like map -> (B, H, W, 3) for grids, normalised per image."""
    lo = depth.min(axis=(1, 2), keepdims=True)
    hi = depth.max(axis=(1, 2), keepdims=True)
    return np.repeat(((depth - lo) / np.maximum(hi - lo, 1e-8))[..., None], 3, -1)


def run(config, out) -> dict:
    """The whole demo; returns the metrics written to ``out/report/metrics.json``."""
    from jointnet_jax.training.metrics import matmul_reference_s

    t_start, timings, trainers = time.perf_counter(), {}, {}
    reference_ms = 1e3 * matmul_reference_s()  # the machine's speed today, to compare runs of other days
    for phase in ("base", "jointnet", "direct_extend"):
        t0 = time.perf_counter()
        trainers[phase] = train_phase(config, phase, out, trainers.get("base"))
        timings[phase] = time.perf_counter() - t0
    metrics = evaluate(config, out, trainers["base"], trainers["jointnet"], trainers["direct_extend"], timings)
    metrics["timings_s"]["total"] = time.perf_counter() - t_start
    metrics["matmul_1024_fp32_ms"] = reference_ms
    write_report(metrics, Path(out) / "report")
    print(f"\nreport: {Path(out) / 'report' / 'report.md'}\nwall time: {metrics['timings_s']['total'] / 60:.1f} min")
    return metrics


def _samples(config, out, base, jointnet, direct_extend) -> dict:
    """Image -> depth on the ``num_scenes`` held-out scenes, and the report's grids (the first
    ``probe_scenes`` of them, generated from their captions by each model with the probe's seed)."""
    d = config.demo
    captions, images, gt_depth = held_out_scenes(config, d.num_scenes)
    size = dict(height=config.data.resolution, width=config.data.resolution, steps=d.sample_steps, seed=d.seed)
    size["progress"] = False  # a loop compiled without progress callbacks can live in JAX's disk cache
    pipe, few = jointnet.pipeline(), slice(0, d.probe_scenes)
    # One call per scene (its caption as the prompt), each an ensemble of d.ensemble samples in one batch.
    settings = dict(cfg=1.0, steps=d.sample_steps, seed=d.seed, ensemble=d.ensemble)
    settings["processing_resolution"] = config.data.resolution
    pred = np.stack([pipe.depth(im, prompt=c, **settings)["depth"] for c, im in zip(captions, images, strict=True)])
    joint = pipe.generate(captions[few], cfg=d.cfg, **size)
    base_rgb = base.pipeline().generate(captions[few], cfg=d.cfg, **size)["rgb"]
    de_rgb = direct_extend.pipeline().generate(captions[few], cfg=d.cfg, **size)["rgb"]
    report = Path(out) / "report"
    report.mkdir(parents=True, exist_ok=True)
    grid = [images[few], gray(pred[few]), gray(1.0 / gt_depth[few])]
    write_png_rgb(report / "image_to_depth.png", image_grid(grid))
    write_png_rgb(report / "joint_generation.png", image_grid([joint["rgb"], gray(joint["depth"])]))
    write_png_rgb(report / "rgb_base_jointnet_direct_extend.png", image_grid([base_rgb, joint["rgb"], de_rgb]))
    return depth_scores(pred, gt_depth)


def _preservation(config, base, jointnet, direct_extend) -> dict:
    """The output-preservation measurements: RGB eval losses relative to the base's (joint and marginal) and
    the same-seed distances over training, on the scale of the base's own seed-to-seed distance."""
    base_eval = base.eval_history[-1]["eval_loss_rgb"]  # the base's RGB marginal is its RGB loss
    captions = held_out_scenes(config, config.demo.probe_scenes)[0]
    scale = probes.seed_distance(probes.reference(config, base, captions))
    return {
        "base_eval_loss_rgb": base_eval,
        "base_seed_to_seed_distance": scale,
        "jointnet_rgb_rel_change": _relative(jointnet.eval_history, base_eval),
        "jointnet_rgb_marginal_rel_change": _relative(jointnet.eval_history, base_eval, "eval_loss_rgb_marginal"),
        "direct_extend_rgb_rel_change": _relative(direct_extend.eval_history, base_eval),
        "direct_extend_rgb_marginal_rel_change": _relative(
            direct_extend.eval_history, base_eval, "eval_loss_rgb_marginal"
        ),
        "jointnet_same_seed": jointnet.probe_curve,
        "direct_extend_same_seed": direct_extend.probe_curve,
    }


def evaluate(config, out, base, jointnet, direct_extend, timings: dict | None = None) -> dict:
    """Sampling and metrics on held-out scenes; writes the grids into ``out/report`` and returns the
    metrics (eval-loss curves relative to the base, same-seed distances, image -> depth scores, targets met or
    missed: ``targets.py``). ``timings``: the phases' wall times (seconds), reported next to the sampling time;
    their sum is the wall time checked."""
    print("\n== sampling and evaluation on held-out scenes ==", flush=True)
    t0 = time.perf_counter()
    depth = _samples(config, out, base, jointnet, direct_extend)
    p = _preservation(config, base, jointnet, direct_extend)
    timings = {**(timings or {}), "sampling": time.perf_counter() - t0}
    jn_far = max(point["distance"] for point in p["jointnet_same_seed"])
    values = {
        "image_to_depth_absrel": depth["absrel"],
        "image_to_depth_delta1": depth["delta1"],
        "jointnet_rgb_max_rel_rise": max(p["jointnet_rgb_rel_change"]),
        "jointnet_rgb_marginal_max_rel_rise": max(p["jointnet_rgb_marginal_rel_change"]),
        "direct_extend_rgb_max_rel_rise": max(p["direct_extend_rgb_rel_change"]),
        "jointnet_same_seed_distance": jn_far / p["base_seed_to_seed_distance"],
        "direct_extend_over_jointnet_distance": _ratio(
            p["direct_extend_same_seed"][-1]["distance"], p["jointnet_same_seed"][-1]["distance"]
        ),
        "wall_time_min": sum(timings.values()) / 60,
    }
    checks, met = check(values)
    steps_per_s = {
        phase: 1.0 / float(np.median(t.step_times))
        for phase, t in (("base", base), ("jointnet", jointnet), ("direct_extend", direct_extend))
        if t.step_times
    }
    return {
        **p,
        "base_eval_history": base.eval_history,
        "jointnet_eval_history": jointnet.eval_history,
        "direct_extend_eval_history": direct_extend.eval_history,
        "image_to_depth": depth,
        "checks": checks,
        "targets": {name: {"rule": r, "threshold": v} for name, (r, v, _) in TARGETS.items()},
        "met": met,
        "timings_s": timings,
        "steps_per_s": steps_per_s,
        "config": config.to_dict(),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf") if a > 0 else 1.0
