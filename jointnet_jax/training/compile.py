"""Compiling the train step so that it fits the host's memory, without process-wide XLA flags.

XLA's CPU backend schedules for concurrency by default, which can keep many large temporaries alive at once:
the SD2.1-shaped fp32 stage-1 step at 128² needs 7.0 GB of temporaries that way, and 3.6 GB (little more
than its gradients) with the memory-optimised scheduler (``benchmarks/RESULTS.md``). That scheduler slows
small models by 20-27% on two cores, so it is not a default. It is asked for per program
(``compiler_options``), and only for a step whose temporaries would not fit in the memory the host has free.
The decision is taken alike on every process, because all of them must run one program.

Compiling a large program leaves the compiler's freed memory in glibc's heap (1.3 GB for the SD2.1-shaped step),
where it counts in the process's resident memory until glibc trims it: it is handed back after compiling.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import jax
from absl import logging

from jointnet_jax import sharding as sh
from jointnet_jax.training.metrics import compiled_memory

MEMORY_OPTIMIZED_CPU = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
HEADROOM = 0.9  # of MemAvailable, left to the temporaries


def host_memory_available() -> int | None:
    """Bytes the kernel reports as available (``MemAvailable``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_host_memory(memory: dict | None, available: int | None) -> bool:
    """Whether a compiled CPU program's temporaries fit in ``HEADROOM`` of ``available``; unknown = fits."""
    if not memory or available is None:
        return True
    return memory["temp_bytes"] <= HEADROOM * available


def return_freed_heap() -> bool:
    """Hand the heap memory glibc keeps after frees back to the OS (``malloc_trim``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def compile_step(lowered, name: str = "train_step"):
    """``lowered.compile()``; on the CPU, again with the memory-optimised scheduler when the first program's
    temporaries do not fit in the memory any process has free."""
    compiled = _compile_within_memory(lowered, name)
    return_freed_heap()
    return compiled


def _compile_within_memory(lowered, name: str):
    compiled = lowered.compile()
    if jax.default_backend() != "cpu":
        return compiled
    memory = compiled_memory(compiled)
    if sh.all_processes_agree(fits_host_memory(memory, host_memory_available()), f"{name}_fits_memory"):
        return compiled
    logging.warning(
        "%s needs %.2f GB of temporaries with XLA's default CPU scheduler, more than this host has free; "
        "compiling it again with the memory-optimised scheduler",
        name,
        memory["temp_bytes"] / 1e9,
    )
    return lowered.compile(compiler_options=MEMORY_OPTIMIZED_CPU)
