"""The CPU demo (``make demo`` = ``python -m jointnet_jax.demo``): a pixel-space text-to-image base model
trained on the synthetic world (stage 0), then JointNet stage 1 (RGB frozen) and the Direct Extend baseline
with the same budget, then sampling and evaluation on held-out scenes.

``configs/demo.py`` is the full run (~15 min on a 2-core CPU); ``configs/demo.py:tiny`` is a smoke-sized
run (tests, the quickstart notebook). Any key can be overridden: ``--config.demo.joint_steps=200``. The
values live in ``jointnet_jax.demo.config.default_config`` so the installed package (and the notebook) has them.
"""

from jointnet_jax.demo.config import default_config


def get_config(arg: str = ""):
    return default_config(arg)
