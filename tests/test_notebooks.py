"""The Colab notebooks in notebooks/: executed end to end at tiny size (nbclient), or at least compiled.

Executed notebooks run in a fresh IPython kernel of this interpreter with ``JOINTNET_NOTEBOOK_SIZE=tiny``
(random tiny models, tiny sizes and step counts), ``JAX_PLATFORMS=cpu``, a temporary working directory and
``JOINTNET_NOTEBOOK_OUT`` pointing into it. The kernel is a separate process, so it gets the persistent
compilation cache and the XLA flags of tests/conftest.py through its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Executed at tiny size. Each must exist: a missing notebook fails rather than being skipped.
EXECUTED = ["01_quickstart.ipynb", "02_inference.ipynb"]
# Only validated and compiled (they need an accelerator and real data to be worth running).
COMPILED = ["03_training.ipynb"]
# Files each executed notebook must leave in its JOINTNET_NOTEBOOK_OUT folder.
EXPECTED_OUTPUTS = {
    "01_quickstart.ipynb": [
        f"report/{f}"
        for f in (
            "metrics.json",
            "report.md",
            "image_to_depth.png",
            "joint_generation.png",
            "rgb_base_jointnet_direct_extend.png",
        )
    ],
    "02_inference.ipynb": [
        *(
            f"{task}/0000{suffix}"
            for task in ("generate", "depth", "image", "panorama")
            for suffix in ("_rgb.png", "_depth.png", "_depth_color.png", ".npz", ".json")
        ),
        "panorama.glb",
    ],
}
TIMEOUT_S = 600  # per cell; a whole tiny notebook takes about a minute on a 2-core CPU with a cold cache


def _read(name: str) -> nbformat.NotebookNode:
    path = NOTEBOOKS / name
    if not path.is_file():
        pytest.fail(f"notebook {path} does not exist", pytrace=False)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> Path:
    """A kernelspec for *this* interpreter, so a user-level ``python3`` kernelspec pointing at another Python
    cannot take over (jupyter_client searches the user's data dir before the venv's)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / "jointnet-test", overrides={"display_name": "jointnet-jax tests"})
    return root


def _kernel_env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JOINTNET_NOTEBOOK_SIZE="tiny",
        JOINTNET_NOTEBOOK_OUT=str(out),
        JAX_PLATFORMS="cpu",
        # One CPU device, as a user's laptop; LLVM -O0 as in conftest (compilation dominates tiny runs).
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "JAX_COMPILATION_CACHE_DIR", str(NOTEBOOKS.parent / ".pytest_cache" / "jax")
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join([str(NOTEBOOKS.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TQDM_DISABLE="1",
    )
    return env


def _errors(nb) -> list[str]:
    """The error outputs of all code cells, each with the start of its cell."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                found.append(f"cell {i} ({cell.source[:60]!r}): {output.ename}: {output.evalue}")
    return found


@pytest.fixture(scope="module")
def demo_stopped_then_resumed(tmp_path_factory):
    """The demo CLI at tiny size in its own process (the notebook kernel's environment), sent SIGTERM as soon as
    its first phase holds its workdir (``base/LOCK``: the trainer's SIGTERM handler is in place from then on),
    then run again with the same command. Returns the output folder and both completed processes."""
    out = tmp_path_factory.mktemp("demo_cli") / "out"
    command = [sys.executable, "-m", "jointnet_jax.demo", "--config", f"{ROOT / 'configs' / 'demo.py'}:tiny"]
    command += ["--out", str(out)]
    env = _kernel_env(out)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "base" / "LOCK").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    stopped = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    stopped.folders = sorted(p.name for p in out.iterdir())  # what the stopped run left
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3 * TIMEOUT_S)
    return out, stopped, resumed


def test_demo_stopped_by_sigterm_exits_nonzero_and_resumes_to_a_full_report(demo_stopped_then_resumed):
    """A stopped phase stops the demo: exit 143, one sentence and no traceback, no later phase and no report.
    The same command then resumes and writes the complete report."""
    out, stopped, resumed = demo_stopped_then_resumed
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 0 of 4" in stopped.stderr and "Traceback" not in stopped.stderr
    assert stopped.folders == ["base"]  # no later phase ran, and no report was written
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "wall time:" in resumed.stdout and "Traceback" not in resumed.stderr
    missing = [f for f in EXPECTED_OUTPUTS["01_quickstart.ipynb"] if not (out / f).is_file()]
    assert not missing, f"the resumed demo did not write {missing}"
    _check_demo_report(json.loads((out / "report" / "metrics.json").read_text()))


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_executes_at_tiny_size(name, tmp_path, kernel_dirs, request):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = _read(name)
    out = tmp_path / "out"
    if name == "01_quickstart.ipynb":
        # The quickstart's phases are the demo CLI's: start from that run's trained phases (not its report), so
        # every training cell resumes a finished run and what the kernel spends is the notebook's own work.
        demo_out = request.getfixturevalue("demo_stopped_then_resumed")[0]
        shutil.copytree(demo_out, out, ignore=shutil.ignore_patterns("report"))
    km = KernelManager(
        kernel_name="jointnet-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dirs)])
    )
    client = NotebookClient(nb, km=km, timeout=TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(out))
    except CellExecutionError as e:
        pytest.fail(f"{name} failed at tiny size:\n{e}")
    finally:  # keep the executed notebook for inspection; a kernel we started is ours to stop
        nbformat.write(nb, tmp_path / name)
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    elapsed = time.perf_counter() - start
    print(f"{name}: executed in {elapsed:.1f} s", file=sys.stderr)

    assert not _errors(nb), _errors(nb)
    missing = [f for f in EXPECTED_OUTPUTS.get(name, []) if not (out / f).is_file()]
    assert not missing, f"{name} did not write {missing} into {out}"
    for meta in out.glob("*/0000.json"):
        assert json.loads(meta.read_text())["prompt"]
    if name == "01_quickstart.ipynb":
        _check_demo_report(json.loads((out / "report" / "metrics.json").read_text()))


def _check_demo_report(m: dict):
    """The demo's own bookkeeping, at tiny size: output preservation is exact at step 0 for both JointNet and
    Direct Extend (same held-out batch, noise and timesteps as the base model's evaluation), for JointNet in
    joint denoising and in its RGB marginal (dense input of pure noise) alike; the same-seed samples of both
    are the base's at step 0 (distance 0), and Direct Extend's have moved by the end; the depth scores and
    every target's check are reported."""
    base = m["base_eval_loss_rgb"]
    assert m["jointnet_eval_history"][0]["eval_loss_rgb"] == base
    assert m["jointnet_eval_history"][0]["eval_loss_rgb_marginal"] == base
    assert m["direct_extend_eval_history"][0]["eval_loss_rgb"] == base
    assert m["jointnet_rgb_rel_change"][0] == 0.0 and len(m["jointnet_rgb_rel_change"]) >= 2
    assert m["jointnet_rgb_marginal_rel_change"][0] == 0.0
    assert [p["step"] for p in m["jointnet_same_seed"]] == [0, 2, 4]  # probe_every 2 of the tiny config's 4 steps
    # Both start as the base (Direct Extend's added input channels are zero too), and training moves both.
    assert [p["step"] for p in m["direct_extend_same_seed"]] == [0, 2, 4]
    assert m["jointnet_same_seed"][0]["distance"] == m["direct_extend_same_seed"][0]["distance"] == 0.0
    assert m["direct_extend_same_seed"][-1]["distance"] > 0.0
    assert m["base_seed_to_seed_distance"] > 0
    for key in ("absrel", "rmse_disp", "delta1", "constant_absrel"):
        assert 0.0 <= m["image_to_depth"][key] < float("inf")
    assert set(m["met"]) == set(m["targets"]) == set(m["checks"])
    for name, c in m["checks"].items():
        assert set(c) == {"value", "rule", "threshold", "met", "what"} and c["met"] == m["met"][name], name
    assert set(m["steps_per_s"]) <= {"base", "jointnet", "direct_extend"}


def _python_source(cell_source: str) -> str:
    """A cell as the Python IPython runs: ``!cmd`` and ``%magic`` lines become function calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell_source)


@pytest.mark.parametrize("name", EXECUTED + COMPILED)
def test_notebook_is_valid_and_compiles(name):
    """Valid nbformat, committed without outputs, a Colab install cell and a size switch, and every code cell
    compiles (after IPython's own transformation of shell and magic lines)."""
    nb = _read(name)
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} cell {i} was committed with outputs"
            compile(_python_source(cell.source), f"{name}[{i}]", "exec")
    text = "\n".join(sources)
    assert '"google.colab" in sys.modules' in text, f"{name} has no guarded Colab install cell"
    assert "JOINTNET_NOTEBOOK_SIZE" in text, f"{name} has no small-size switch"
