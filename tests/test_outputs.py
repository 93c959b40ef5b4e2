"""pipelines.outputs: two runs writing one output folder at once leave every file complete and every sample's
files from one run (the folder lock)."""

from __future__ import annotations

import json
import threading

import numpy as np

from jointnet_jax import io_utils
from jointnet_jax.pipelines import outputs

SIZE = (24, 32)


def _result(value: float) -> dict:
    return {"rgb": np.full((1, *SIZE, 3), value, np.float32), "depth": np.full((1, *SIZE), value, np.float32)}


def _sample_values(out) -> set[float]:
    """The value each file of sample 0 holds (each writer fills its arrays with one value and names it)."""
    stem = out / "0000"
    with np.load(f"{stem}.npz") as npz:
        arrays = [npz["rgb"], npz["depth"]]
    arrays += [io_utils.read_image(f"{stem}_rgb.png"), io_utils.read_depth(f"{stem}_depth.png")]
    assert all(np.ptp(a) < 1e-6 for a in arrays), "a file holds more than one run's values"
    return {round(float(a.mean()), 2) for a in arrays} | {json.loads(open(f"{stem}.json").read())["run"]}


def test_a_second_run_cannot_write_into_a_sample_being_written(tmp_path, monkeypatch):
    """Run A writes the first file of sample 0 and then pauses, giving run B up to 1 s to write the same sample
    meanwhile. With the folder lock B waits for A and then writes the whole sample: all five files are B's.
    (Without it B's files land in the pause and A's later files overwrite only some of them: a mix.)"""
    atomic_write = io_utils.atomic_write
    a_paused, b_done = threading.Event(), threading.Event()

    def pausing_atomic_write(path, write):
        atomic_write(path, write)
        if threading.current_thread().name == "A" and not a_paused.is_set():
            a_paused.set()
            b_done.wait(timeout=1.0)

    monkeypatch.setattr(io_utils, "atomic_write", pausing_atomic_write)
    out = tmp_path / "out"

    def run(value):
        outputs.write_outputs(out, _result(value), ["a prompt"], {"run": value}, "depth")

    a = threading.Thread(target=run, args=(0.2,), name="A")
    a.start()
    assert a_paused.wait(timeout=30)
    b = threading.Thread(target=lambda: (run(0.8), b_done.set()), name="B")
    b.start()
    a.join()
    b.join()
    assert _sample_values(out) == {0.8}
    assert sorted(p.name for p in out.iterdir()) == [
        "0000.json",
        "0000.npz",
        "0000_depth.png",
        "0000_depth_color.png",
        "0000_rgb.png",
    ]  # complete, and no temporary file left behind
