"""``jointnet-demo`` (``python -m jointnet_jax.demo``, ``make demo``): the embedded CPU demo, end to end.

    jointnet-demo --out runs/demo                                     # ~15 min on a 2-core CPU
    jointnet-demo --config configs/demo.py:tiny --out runs/demo_tiny  # smoke-sized

Trains a pixel-space base model on the synthetic world (stage 0), then JointNet stage 1 and the Direct Extend
baseline with the same budget, samples and evaluates on held-out scenes, and writes ``OUT/report/``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jointnet_jax import cli as cli_plumbing
from jointnet_jax.demo.config import default_config
from jointnet_jax.demo.run import run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Demo config file; default: jointnet_jax.demo.config.default_config().")
flags.DEFINE_string("out", "runs/demo", "Output folder: the runs, their exports and report/.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress bars and the report, not every checkpoint file
    from jointnet_jax.training.trainer import RUN_ERRORS, Stopped

    # A stopped phase stops the demo (exit 143); rerunning resumes that phase.
    sys.exit(
        cli_plumbing.run(
            lambda: run(FLAGS.config or default_config(), FLAGS.out), errors=RUN_ERRORS, stopped=(Stopped,)
        )
    )


def cli():
    """The ``jointnet-demo`` console script. absl's ``--help`` shows the ``__main__`` module's docstring, which for a
    console script is the generated wrapper's (none), so this module's is put there."""
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    cli()
