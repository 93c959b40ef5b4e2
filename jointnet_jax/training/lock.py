"""One training run per workdir: ``WORKDIR/LOCK``, taken by process 0 when a Trainer starts.

The lock file holds its holder (host, pid, start time) as JSON and is created with ``O_EXCL``, so of two runs
starting at once exactly one gets it. A second run on a held workdir is refused with one sentence naming the
holder. The holder touches the file every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when
its process is gone (same host: the pid no longer runs) or its heartbeat is older than ``STALE_S`` (another
host, whose processes cannot be seen from here). Taking over renames the stale file away first: of two runs
that both find it stale, only one rename succeeds, and the other then finds the new holder's lock.
On multi-host runs only process 0 takes the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import jax
import numpy as np

from jointnet_jax import sharding as sh

HEARTBEAT_S = 60.0
STALE_S = 600.0


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or unreadable: judged by its age alone


def _stale(path: Path, holder: dict) -> bool:
    """Its process is gone (visible only on the same host), or its heartbeat stopped ``STALE_S`` ago."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    same_host = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
    return (same_host and not _alive(holder["pid"])) or age > STALE_S


class WorkdirLock:
    def __init__(self, workdir):
        self.path = Path(workdir) / "LOCK"
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._stop = threading.Event()
        self.held = False

    def _try_create(self) -> bool:
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": self.token,
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> None:
        """Take the lock (process 0) and tell every process the outcome; WorkdirBusy when it is held."""
        error = self._acquire_here() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            sh.sync_processes("workdir_lock")
            busy = sh.broadcast_from_process0(np.int32(error is not None))
            if busy and error is None:
                error = f"process 0 could not take the lock {self.path}; see its log"
        if error is not None:
            raise WorkdirBusy(error)
        self.held = True
        if jax.process_index() == 0:
            self._stop.clear()
            threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True).start()

    def _acquire_here(self) -> str | None:
        for _ in range(3):
            if self._try_create():
                return None
            holder = _holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if not _stale(self.path, holder):
                return (
                    f"workdir {self.path.parent} is in use by process {holder.get('pid')} on host "
                    f"{holder.get('host')} (since {holder.get('started')}); wait for it to finish, or use another "
                    f"--workdir. If that run is dead and cannot be seen from here, delete {self.path}"
                )
            try:  # stale: set it aside (only one of several takers succeeds), then create ours
                self.path.rename(self.path.with_name(f"LOCK.stale-{self.token}"))
                self.path.with_name(f"LOCK.stale-{self.token}").unlink()
            except FileNotFoundError:
                pass
        return f"could not take the lock {self.path}: it changed hands repeatedly; try again"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self.held = False
        if jax.process_index() == 0 and (_holder(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
