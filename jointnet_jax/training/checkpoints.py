"""Orbax checkpoints of the whole training state: parameters, optimizer state, step, the Grain
iterator state of every process and the config. Orbax writes to a temporary directory and renames it,
so an interrupted save never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import orbax.checkpoint as ocp


class _FrozenIteratorState:
    """The iterator's state at save time (async saves must not see later batches), in the encoded form
    grain's handler writes for non-dataset iterators."""

    def __init__(self, state: dict):
        self.state = json.dumps(state, indent=2).encode()

    def get_state(self) -> bytes:
        return self.state


def make_manager(workdir, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(workdir).resolve() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config_dict: dict, *, force=False):
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
            config=ocp.args.JsonSave(json.loads(json.dumps(config_dict, default=str))),
        ),
        force=force,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restore ``step`` into ``abstract_state``'s structure and shardings; the iterator is restored in place."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["state"]
