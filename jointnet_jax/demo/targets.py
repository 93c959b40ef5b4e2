"""The demo's targets as data (issue 18), fixed before any tuning: what each measures, its rule and threshold.

``check`` turns the measured values into ``checks`` (name -> value, rule, threshold, met) and ``met`` (name ->
bool) for ``metrics.json``; nothing here is tuned to what a run measured.

The same-seed thresholds were stated before the probe was first run, from the paper's claim (§3.1, Fig. 9:
"the Direct Extend method loses the RGB generation capability in early steps, while JointNet successfully
preserves it"): JointNet's sample of a seed is still the base model's sample, i.e. at every probe point its
distance to it is at most a quarter of the distance between the base model's own samples of two seeds
(``probes.seed_distance``); and Direct Extend's final distance is at least three times JointNet's ("several
times larger").
"""

from __future__ import annotations

import operator

RULES = {"<=": operator.le, ">=": operator.ge, ">": operator.gt}

# name: (rule, threshold, what is measured)
TARGETS = {
    "image_to_depth_absrel": ("<=", 0.10, "JointNet image -> depth AbsRel on the held-out scenes"),
    "image_to_depth_delta1": (">=", 0.90, "JointNet image -> depth delta1 on the held-out scenes"),
    "jointnet_rgb_max_rel_rise": (
        "<=",
        0.02,
        "JointNet's RGB eval loss (joint denoising) rises at most 2% above the base's, at every evaluation",
    ),
    "jointnet_rgb_marginal_max_rel_rise": (
        "<=",
        0.02,
        "the same with an uninformative dense input (pure noise): the RGB marginal",
    ),
    "direct_extend_rgb_max_rel_rise": (">", 0.20, "Direct Extend's RGB eval loss rises by more than 20%"),
    "jointnet_same_seed_distance": (
        "<=",
        0.25,
        "JointNet's largest same-seed RGB distance to the base, over the base's own seed-to-seed distance",
    ),
    "direct_extend_over_jointnet_distance": (
        ">=",
        3.0,
        "Direct Extend's final same-seed distance over JointNet's",
    ),
    "wall_time_min": ("<=", 15.0, "the whole demo's wall time in minutes"),
}


def check(values: dict[str, float]) -> tuple[dict, dict]:
    """``(checks, met)`` for the measured ``values`` (one per target)."""
    checks = {}
    for name, (rule, threshold, what) in TARGETS.items():
        value = float(values[name])
        checks[name] = {"value": value, "rule": rule, "threshold": threshold, "met": RULES[rule](value, threshold)}
        checks[name]["what"] = what
    return checks, {name: c["met"] for name, c in checks.items()}
