"""Orbax checkpoints of the whole training state: parameters, optimizer state, step, the Grain
iterator state of every process and the config. Orbax writes to a temporary directory and renames it,
so an interrupted save never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jointnet_jax import sharding as sh

# Orbax splits the device-to-host copy of a replicated array across its replicas. Per array that costs a
# round of slicing and transfers, which for the hundreds of small arrays of a training state (biases, norms,
# optimizer moments) takes longer than copying them whole: 5 s against 2 s per save of the tiny test state.
# Arrays whose per-replica slice would be under 1 MiB are therefore written whole by replica 0; the large
# kernels of a real model are still written in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's standard handlers, with the replica-parallel threshold above for ``jax.Array``."""
    standard = (int, float, bytes, np.number, np.ndarray, str)
    return ocp.type_handlers.create_type_handler_registry(
        *((t, ocp.type_handlers.get_type_handler(t)) for t in standard),
        (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
    )


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
        # cleanup_tmp_directories: an unfinished save (a kill or a full disk) leaves a *.orbax-checkpoint-tmp
        # folder behind; it is removed when the next run starts.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        ),
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config_dict: dict, *, force=False):
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
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
            state=ocp.args.PyTreeRestore(
                abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
            ),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["state"]


def _leaf_shapes(tree) -> list[tuple]:
    """The (shape, dtype) of every array of a tree, sorted: the same for the same model and optimizer, however
    orbax names the paths of namedtuples and dataclasses in its metadata."""
    return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree))


def restore_newest_good(manager: ocp.CheckpointManager, abstract_state, data_iterator, damaged: Path):
    """Restore the newest checkpoint that can be read; ``(step, state)``, or None when there is none.

    Each candidate is verified by orbax's metadata and a full read. One that fails (a truncated or missing
    file, say) is moved to ``damaged/<step>`` with one warning naming it, never deleted, and the next older
    one is tried. With several processes a checkpoint is good only when every process read it (one host may
    fail alone), so all of them resume from the same step. A checkpoint whose arrays are not those of
    ``abstract_state`` (another model or optimizer: the config changed) is an error, not damage: nothing is
    moved.
    """
    expected, moved = _leaf_shapes(abstract_state), []
    for step in sorted(manager.all_steps(), reverse=True):
        path = Path(manager.directory) / str(step)
        try:
            stored = _leaf_shapes(manager.item_metadata(step)["state"].tree)
        except Exception as e:  # noqa: BLE001 - unreadable metadata is damage, whatever raised it
            stored, error = None, e
        if stored is not None and stored != expected:
            raise ValueError(
                f"checkpoint {path} holds a different training state ({len(stored)} arrays) than this config "
                f"builds ({len(expected)}); resume with the config it was written with, or use a new workdir"
            )
        state = None
        if stored is not None:
            try:
                state = restore(manager, step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - a failed read of a matching checkpoint is damage
                error = e
        if sh.all_processes_agree(state is not None, f"restored_{step}"):
            return step, state
        if state is not None:
            error = RuntimeError("another process could not read it")
        moved.append(_set_aside(manager, path, damaged / str(step)))
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        logging.warning(
            "checkpoint %s is damaged (%s); moved it to %s, trying the one before", path, first_line, moved[-1]
        )
    if moved:  # the data iterator may hold a half-restored position: never start over silently
        raise ValueError(
            f"no checkpoint in {manager.directory} could be read; the damaged ones are in {damaged}. Rerun to "
            "start this workdir from step 0, or move them back once repaired"
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, path: Path, to: Path) -> Path:
    """Process 0 moves a damaged checkpoint out of orbax's way (a rerun would write the same step again);
    every process then rereads the list of steps."""
    if jax.process_index() == 0:
        to.parent.mkdir(parents=True, exist_ok=True)
        if to.exists():
            to = to.with_name(f"{to.name}-{len(list(to.parent.iterdir()))}")
        path.rename(to)
    sh.sync_processes(f"set_aside_{path.name}")
    manager.reload()
    return to
