"""Shared test fixtures: the vendored official tiny fixture (``tests/fixtures/official_tiny``, see its README)
and helpers to move NCHW torch tensors to NHWC."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake CPU devices for the sharded-training tests (single-device programs are unaffected), and a
# persistent compilation cache shared with the subprocesses that some tests start.
# XLA's CPU compile time dominates these tests; LLVM optimisation level 0 cuts it by about a third.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
# Every compiled program is cached, even sub-second ones: building a tiny random model compiles ~100 small
# initialiser programs, and each subprocess (CLI, SIGKILL and multi-process tests) would compile them again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"


def nhwc(a):
    """NCHW (PyTorch fixtures) -> NHWC (JAX convention here)."""
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def official():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixture folder {FIXTURES} is missing; it is part of the repository (git checkout tests/fixtures)")
    return FIXTURES
