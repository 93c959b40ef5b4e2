"""Host barriers between processes (``sharding.sync_processes``), on two local CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

# Process 0 does 35 s of work alone (as when it writes the tiny base or exports a model) before the barrier;
# then both run a device collective. With a device collective as the barrier instead, the other process's
# Gloo context gives up after 30 s ("GetKeyValue() timed out").
PROCESS = """
import sys, time
import jax
from jax.experimental import multihost_utils
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from jointnet_jax import sharding
if jax.process_index() == 0:
    time.sleep(35)
sharding.sync_processes("slow_process_0")
print("gathered", multihost_utils.process_allgather(jax.numpy.int32(jax.process_index())).tolist(), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_barrier_waits_for_slow_process_zero():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, port, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "gathered [0, 1]" in out, out[-3000:]
