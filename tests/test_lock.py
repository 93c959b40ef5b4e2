"""The workdir lock (``training/lock.py``): one run per workdir, stale locks taken over, only our own released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jointnet_jax.training import lock
from jointnet_jax.training.lock import WorkdirBusy, WorkdirLock
from jointnet_jax.training.metrics import logged_evals


def _write_lock(path, **holder):
    path.write_text(json.dumps({"started": "2026-01-01 00:00:00", **holder}))


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / "LOCK").read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(WorkdirBusy, match=rf"in use by process {os.getpid()} on host {socket.gethostname()}"):
        WorkdirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / "LOCK").exists()
    second = WorkdirLock(tmp_path)
    second.acquire()  # free again
    first.release()  # no longer the holder: leaves the new holder's lock alone
    assert json.loads((tmp_path / "LOCK").read_text())["token"] == second.token
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path / "LOCK", host=socket.gethostname(), pid=int(dead.stdout))
    taker = WorkdirLock(tmp_path)
    taker.acquire()
    assert json.loads((tmp_path / "LOCK").read_text())["token"] == taker.token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]  # the stale file was set aside and removed
    taker.release()


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    _write_lock(tmp_path / "LOCK", host="elsewhere", pid=1)
    with pytest.raises(WorkdirBusy, match="in use by process 1 on host elsewhere"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - lock.STALE_S - 5
    os.utime(tmp_path / "LOCK", (old, old))
    taker = WorkdirLock(tmp_path)
    taker.acquire()
    assert json.loads((tmp_path / "LOCK").read_text())["host"] == socket.gethostname()
    taker.release()


def test_logged_evals_survive_a_resume(tmp_path):
    """A resumed run's eval history: the logged evaluations up to the restored step, newest row per step;
    training rows and a line cut short by a kill are ignored."""
    rows = [
        {"step": 0, "eval_loss": 3.0, "eval_loss_rgb": 2.0},
        {"step": 1, "loss": 1.0},
        {"step": 2, "eval_loss": 2.5, "eval_loss_rgb": 1.5},
        {"step": 2, "eval_loss": 2.4, "eval_loss_rgb": 1.4},  # logged again by a rerun of step 2
        {"step": 4, "eval_loss": 2.0, "eval_loss_rgb": 1.0},  # after the checkpoint: lost with the kill
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"step": 5, "eval_lo')
    assert logged_evals(tmp_path, up_to=3) == [rows[0], rows[3]]
    assert logged_evals(tmp_path / "missing", up_to=3) == []
