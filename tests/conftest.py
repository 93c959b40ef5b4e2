"""Shared test fixtures: the official tiny fixture folder and helpers to move NCHW torch tensors to NHWC."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_tiny"


def nhwc(a):
    """NCHW (PyTorch fixtures) -> NHWC (JAX convention here)."""
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def official():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixture folder {FIXTURES} is missing (expected ../shared/fixtures/official_tiny)")
    return FIXTURES
