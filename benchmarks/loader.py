"""Input pipeline throughput: training examples/s per process on synthetic record shards.

Renders ``--num`` synthetic examples at ``--size``² into ``--data`` (kept and reused when it already
holds shards, since rendering dominates), then times ``--batches`` batches of the training pipeline
after one warm-up batch (which includes starting the workers). Prints one JSON line.

    python benchmarks/loader.py --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

from jointnet_jax.data import records, synthetic
from jointnet_jax.data.loader import Loader


def _shards(folder: str, num: int, size: int) -> float:
    """Write the synthetic shards unless present; returns the seconds spent rendering."""
    os.makedirs(folder, exist_ok=True)
    if any(name.endswith(records.SHARD_SUFFIX) for name in os.listdir(folder)):
        return 0.0
    start = time.perf_counter()
    records.write_shards((synthetic.make_example(i, size) for i in range(num)), folder, "bench", num_shards=4)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "jointnet_input_bench"))
    parser.add_argument("--num", type=int, default=200, help="examples to render when --data is empty")
    parser.add_argument("--size", type=int, default=512, help="stored image side")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="timed batches after one warm-up batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read-threads", type=int, default=2)
    args = parser.parse_args(argv)

    render_s = _shards(args.data, args.num, args.size)
    pipeline = Loader(
        dict(
            paths=args.data,
            resolution=args.resolution,
            batch_size=args.batch_size,
            worker_count=args.workers,
            read_threads=args.read_threads,
        ),
        process_index=0,
        process_count=1,
    )
    try:
        start = time.perf_counter()
        next(pipeline)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.batches):
            next(pipeline)
        elapsed = time.perf_counter() - start
    finally:
        pipeline.close()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "command": shlex.join([sys.executable, *sys.argv]),
        "records": pipeline.num_records,
        "size": args.size,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "read_threads": args.read_threads,
        "render_s": round(render_s, 1),
        "warmup_s": round(warmup_s, 2),
        "examples_per_s": round(args.batches * args.batch_size / elapsed, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
