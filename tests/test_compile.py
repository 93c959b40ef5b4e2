"""The train step is compiled again with the memory-optimised CPU scheduler only when it would not fit."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jointnet_jax.training import compile as compile_mod


class _Recording:
    """A real ``Lowered`` that records the compiler options of each compile."""

    def __init__(self, lowered):
        self.lowered, self.options = lowered, []

    def compile(self, compiler_options=None):
        self.options.append(compiler_options)
        return self.lowered.compile(compiler_options=compiler_options)


def _lowered():
    x = jnp.arange(64.0).reshape(8, 8)
    return _Recording(jax.jit(lambda a: jnp.sin(a) @ a + a.T).lower(x)), x


def test_fits_host_memory_compares_temporaries_with_the_free_memory():
    assert compile_mod.fits_host_memory({"temp_bytes": 10}, 100)
    assert not compile_mod.fits_host_memory({"temp_bytes": 95}, 100)  # more than HEADROOM of it
    assert compile_mod.fits_host_memory(None, 100) and compile_mod.fits_host_memory({"temp_bytes": 10}, None)


def test_a_step_that_fits_is_compiled_once_with_default_options(monkeypatch):
    monkeypatch.setattr(compile_mod, "host_memory_available", lambda: 1 << 40)
    lowered, x = _lowered()
    compiled = compile_mod.compile_step(lowered)
    assert lowered.options == [None]
    np.testing.assert_allclose(np.asarray(compiled(x)), np.asarray(jnp.sin(x) @ x + x.T), rtol=1e-6)


def test_a_step_that_does_not_fit_is_recompiled_with_the_memory_scheduler(monkeypatch):
    monkeypatch.setattr(compile_mod, "host_memory_available", lambda: 0)
    lowered, x = _lowered()
    compiled = compile_mod.compile_step(lowered)
    assert lowered.options == [None, compile_mod.MEMORY_OPTIMIZED_CPU]
    np.testing.assert_allclose(np.asarray(compiled(x)), np.asarray(jnp.sin(x) @ x + x.T), rtol=1e-6)


def test_host_memory_is_read_from_the_kernel():
    available = compile_mod.host_memory_available()
    if Path("/proc/meminfo").exists():
        assert available is not None and available > 0
    else:
        assert available is None


def test_freed_heap_is_returned_on_linux_with_glibc():
    import platform

    returned = compile_mod.return_freed_heap()
    assert returned == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
