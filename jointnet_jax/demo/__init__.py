"""The embedded CPU demo: ``run`` (the whole demo), its phases and evaluation (``run.py``), its config
(``config.py``) and its report (``report.py``); the command line is ``python -m jointnet_jax.demo``."""

from jointnet_jax.demo.config import default_config
from jointnet_jax.demo.report import write_report
from jointnet_jax.demo.run import evaluate, gray, held_out_scenes, run, train_phase

__all__ = ["default_config", "evaluate", "gray", "held_out_scenes", "run", "train_phase", "write_report"]
