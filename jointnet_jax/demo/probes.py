"""The same-seed probe of output preservation (paper §3.1, Fig. 9): RGB samples of a model in training against
the base model's, all from the same initial noise.

The paper checks its claim by sampling the same prompt and seed during training: JointNet's images stay the
base model's, Direct Extend's are lost early. Here that is a number. For the probe's held-out captions the base
model's RGB samples from ``seed`` are drawn once (``reference``), and at each probe point a phase's joint
samples from the same seed are compared with them: the mean absolute per-pixel difference in [0, 1] RGB. The
scale it is judged on is the base model's own seed-to-seed distance (its samples from ``seed`` against those
from ``seed + 1``, captions alike), i.e. the distance of unrelated samples of the same captions.

At step 0 JointNet's RGB branch is the base UNet and every exchange layer is zero, and the twin draws the same
RGB noise as the base for a seed, so its distance is exactly 0; so is Direct Extend's, whose added input and
output channels start at zero (tested). What the probe shows is how far each moves in training: JointNet's RGB
branch is frozen but, in joint generation, reads the dense branch through the trained exchange layers, and
Direct Extend trains the shared weights themselves. The curve of each phase is kept in its workdir
(``probe.json``), so a resumed phase keeps the points measured before it was stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jointnet_jax.io_utils import atomic_write

REFERENCE = "probe_reference.npz"
CURVE = "probe.json"


def _settings(config, seed: int) -> dict:
    d = config.demo
    size = config.data.resolution
    return dict(height=size, width=size, steps=d.sample_steps, seed=seed, cfg=d.cfg, progress=False)


def reference(config, base, captions: list[str]) -> dict[str, np.ndarray]:
    """The base model's RGB samples of ``captions`` from ``demo.seed`` and ``demo.seed + 1``, drawn once and
    kept in the base workdir (``probe_reference.npz``)."""
    path = Path(base.workdir) / REFERENCE
    if path.is_file():
        with np.load(path) as stored:
            if list(stored["captions"]) == captions:
                return {k: stored[k] for k in ("rgb", "rgb_other_seed")}
    pipe, seed = base.pipeline(), config.demo.seed
    out = {
        "rgb": pipe.generate(captions, **_settings(config, seed))["rgb"],
        "rgb_other_seed": pipe.generate(captions, **_settings(config, seed + 1))["rgb"],
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            np.savez(file, captions=np.array(captions), **out)

    atomic_write(path, write)
    return out


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute per-pixel difference of two batches of RGB samples in [0, 1]."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def seed_distance(ref: dict[str, np.ndarray]) -> float:
    """The base model's own seed-to-seed distance: the scale a preserved sample is judged on."""
    return distance(ref["rgb"], ref["rgb_other_seed"])


def load_curve(workdir) -> list[dict]:
    path = Path(workdir) / CURVE
    return json.loads(path.read_text()) if path.is_file() else []


def measure(trainer, config, captions: list[str], ref: dict[str, np.ndarray], curve: list[dict]) -> list[dict]:
    """Add the point of the trainer's current step to ``curve`` (unless it is there) and keep it on disk."""
    step = int(trainer.state.step)
    if any(point["step"] == step for point in curve):
        return curve
    rgb = trainer.pipeline().generate(captions, **_settings(config, config.demo.seed))["rgb"]
    curve = sorted([*curve, {"step": step, "distance": distance(rgb, ref["rgb"])}], key=lambda p: p["step"])
    atomic_write(Path(trainer.workdir) / CURVE, lambda tmp: tmp.write_text(json.dumps(curve, indent=1)))
    return curve
