"""``python -m jointnet_jax.train --config configs/sd21_depth.py[:tiny] --workdir DIR [--config.key=value]``

Runs (or resumes, from ``DIR/checkpoints``) a JointNet training stage and exports the result in the
official layout to ``DIR/export``. Exit status: 0 when trained to the end, 143 when stopped by SIGTERM (after
saving a checkpoint; rerun to resume), 1 with one sentence for a mistake (a busy workdir, a bad config).
Multi-host: one process per host; TPU pods and SLURM are detected automatically, otherwise pass
``--coordinator host:port --num_processes N --process_id i``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from jointnet_jax import cli as cli_plumbing
from jointnet_jax import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (`file.py:arg` for variants).")
flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and the export go here.")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    import jax

    cli_plumbing.tracebacks_to(Path(FLAGS.workdir) / "logs" / f"train.{jax.process_index()}.log")
    from jointnet_jax.training.trainer import RUN_ERRORS, Stopped, Trainer

    def body():
        history = Trainer(FLAGS.config, FLAGS.workdir).train()
        if history:
            print(f"trained to step {history[-1]['step']}, final loss {history[-1]['loss']:.4f}")

    sys.exit(cli_plumbing.run(body, errors=RUN_ERRORS, stopped=(Stopped,)))


def cli():
    """The ``jointnet-train`` console script. absl's ``--help`` shows the ``__main__`` module's docstring, which for a
    console script is the generated wrapper's (none), so this module's is put there."""
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    cli()
