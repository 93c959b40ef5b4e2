"""Console + TensorBoard logging and model-FLOPs utilisation."""

from __future__ import annotations

import json
from pathlib import Path

import jax

# Dense bf16 peak FLOP/s per device (vendor figures), for MFU. Unknown devices (CPU) report no MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def matmul_reference_s() -> float:
    """Seconds of one 1024 x 1024 float32 matmul on the default device (the mean of 10 after a warm-up): a
    fixed reference figure, so that speeds measured on days when the machine is faster or slower compare."""
    import time

    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        f(a).block_until_ready()
    return (time.perf_counter() - start) / 10


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (per device program)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = cost.get("flops") if cost else None
    return float(flops) if flops else None


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes of one call of a compiled function, from XLA's buffer assignment: its arguments,
    outputs, the outputs that reuse donated arguments, and the temporaries it allocates while it runs (what
    a step needs on top of the resident train state)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement memory analysis
        return None
    if m is None:
        return None
    names = ("argument", "output", "alias", "temp")
    return {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes")) for k in names}


class Writer:
    """TensorBoard scalars/images plus a ``metrics.jsonl`` next to them, from process 0 only."""

    def __init__(self, logdir):
        self.tb = self.jsonl = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(logdir))
            self.jsonl = open(Path(logdir) / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()

    def scalars(self, step: int, values: dict):
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
            self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
            self.jsonl.flush()

    def image(self, step: int, name: str, image):
        if self.tb is not None:
            self.tb.add_image(name, image, step, dataformats="HWC")

    def close(self):
        if self.tb is None:
            return
        errors = []
        try:
            self.tb.close()
        except OSError as e:
            # A full disk: what is buffered cannot be written. Mark tensorboardX's event file closed, or its
            # exit hook retries the flush and prints a traceback after our one-line error.
            errors.append(e)
            writer = getattr(self.tb, "file_writer", None)
            if writer is not None and hasattr(writer, "event_writer"):
                writer.event_writer._closed = True
        try:
            self.jsonl.close()
        except OSError as e:
            errors.append(e)
        if errors:
            raise errors[0]


def logged_evals(logdir, *, up_to: int) -> list[dict]:
    """The held-out evaluations in ``metrics.jsonl`` at steps <= ``up_to`` (the newest row per step), so a
    resumed run still knows the curve it logged before it was stopped."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "eval_loss" in row and row.get("step", up_to + 1) <= up_to:
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
