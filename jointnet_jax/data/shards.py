"""The shard plumbing of the data jobs that needs no Beam (the labelling job ``label.py`` and the latent-cache
job ``latents.py``): output shards planned at construction and skipped when already written (resume per
shard), each shard written into a hidden temporary folder and renamed into place when complete (atomic), and
a per-shard tally of counters. ``jobs.py`` runs such shard writers as a Beam job; without Beam they run in
this process (``latents.write_in_process``, for a machine with no Beam, such as a GPU benchmark host).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator

from jointnet_jax.data import records

Count = Callable[..., None]  # count(name, value=1): add to a counter


def pending_work_items(items: list, out: str, prefix: str) -> list:
    """Items (anything with an ``out`` shard path) whose shard is not written yet; refuses an output folder
    holding another split of the input. A half-written temporary folder never counts as written."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{5,}}-of-(\d{{5,}}){re.escape(records.SHARD_SUFFIX)}$")
    if os.path.isdir(out):
        other = sorted(n for n in os.listdir(out) if (m := pattern.match(n)) and int(m[1]) != len(items))
        if other:
            raise FileExistsError(
                f"{out} holds shards of a different split ({other[0]}, ...), not of {len(items)} shards; "
                "rerun with the same input and --examples-per-shard, or use another --out/--prefix."
            )
    return [item for item in items if not os.path.exists(item.out)]


@contextlib.contextmanager
def published_shard(out: str, prefix: str, image_format: str = "png") -> Iterator[records.ShardWriter]:
    """A one-shard ``records.ShardWriter`` in a hidden temporary folder next to ``out``; the shard is renamed
    to ``out`` when the block ends without an exception, and the temporary folder is always removed."""
    out_dir, name = os.path.split(out)
    temp_dir = os.path.join(out_dir, f".{name}.tmp-{secrets.token_hex(4)}")
    try:
        writer = records.ShardWriter(temp_dir, prefix, num_shards=1, image_format=image_format)
        with writer:
            yield writer
        os.replace(writer.paths[0], out)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def tally() -> tuple[Count, collections.Counter]:
    """``(count, counts)``: ``count(name, value=1)`` adds to ``counts``, a shard's (or a run's) tally."""
    counts = collections.Counter()

    def count(name: str, value: int = 1) -> None:
        counts[name] += value

    return count, counts


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
