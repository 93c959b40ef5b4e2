"""CLI plumbing shared by every command line (``sample``, ``evaluate``, ``train``, ``mesh``, ``label``,
``demo``): the model, prompt and sampling arguments, reading prompts, strict JSON written atomically, and
the one error handler that turns a user's mistake into one sentence and exit status 1. Results are written
with ``io_utils.write_json`` (strict JSON, atomically).

Each CLI declares only the flags its subcommands use, through the ``add_*`` functions here, so the same flag
has the same name, default and help everywhere.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

DTYPES = ("fp32", "bf16")
# What counts as the user's mistake (a missing file, a bad value or layout, a missing optional package):
# one sentence on stderr and exit 1. Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (OSError, ValueError, ImportError)


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


def number(kind: type = float, *, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse ``type``: a finite ``kind`` (float or int) in ``[low, high]`` (``(low, high]`` with
    ``above``). ``nan``, ``inf`` and out-of-range values are refused with one sentence naming the flag, before
    any work, so no run is silently unguided and no record holds a value that is not JSON."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, low=1)
COUNT = number(int, low=0)
NON_NEGATIVE = number(float, low=0)
FRACTION = number(float, low=0, high=1)


def check_output_folder(path, flag: str = "--out") -> Path:
    """Create the output folder now (before any model is loaded) and prove it writable, or say in one
    sentence what is wrong with it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"cannot write to {flag} {path}: {e.strerror or e}") from None
    return path


def check_output_file(path, flag: str = "--out") -> Path:
    """:func:`check_output_folder` for the folder a single output file goes into; refuses an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is an existing folder, not a file name")
    check_output_folder(path.parent if str(path.parent) else Path("."), flag)
    return path


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="SD2.1-base-style diffusers folder (vae/ text_encoder/ tokenizer/ scheduler/) or a Hub id "
        "such as stabilityai/stable-diffusion-2-1-base (read from the local Hub cache when offline)",
    )
    p.add_argument(
        "--model", required=True, help="JointNet folder in the official layout (unet/ + jointnet/) or a Hub id"
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (parameters stay float32)")


def add_prompt_arguments(p: argparse.ArgumentParser, *, negative: bool = True) -> None:
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    if negative:
        p.add_argument("--negative-prompt", default="")


def add_sampler_arguments(p: argparse.ArgumentParser, *, steps: int = 50, cfg: float = 7.5) -> None:
    """Steps, guidance, the sampler (any name of ``diffusion.SAMPLER_NAMES``; ``--scheduler`` is its old
    spelling), DDIM's eta and the seed."""
    from jointnet_jax.diffusion import SAMPLER_NAMES

    p.add_argument("--steps", type=POSITIVE_INT, default=steps)
    p.add_argument("--cfg", type=NON_NEGATIVE, default=cfg, help=f"guidance scale (1 = unguided; default {cfg})")
    p.add_argument("--guidance-rescale", type=FRACTION, default=0.0)
    p.add_argument("--sampler", "--scheduler", dest="sampler", choices=SAMPLER_NAMES, default="ddim")
    p.add_argument("--eta", type=FRACTION, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=COUNT, default=0)


def add_size_arguments(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--height", type=POSITIVE_INT, help=f"default: {default}")
    p.add_argument("--width", type=POSITIVE_INT)


def read_prompts(args) -> list[str]:
    """``--prompt``s, then the lines of ``--prompts-file``; at least one."""
    prompts = list(args.prompt)
    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


STOPPED_EXIT = 143  # 128 + SIGTERM: the shell's status for a process ended by SIGTERM


def run(command: Callable[[], object], *, errors: tuple = (), stopped: tuple = ()) -> int:
    """Run a CLI body: 0 on success; a user error (``USER_ERRORS`` and ``errors``) is one ``error: ...`` line
    on stderr and status 1; a ``stopped`` exception (a preempted run that saved its work) is its one line and
    ``STOPPED_EXIT``, so a scheduler sees that the job did not finish."""
    try:
        command()
    except stopped as e:
        print(e, file=sys.stderr)
        return STOPPED_EXIT
    except (*USER_ERRORS, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def tracebacks_to(log_file) -> Path:
    """Send every log record in full (tracebacks included) to ``log_file``, and only its message line to
    stderr. A failure deep in a library's worker thread (orbax writing a checkpoint to a full disk, say) then
    reads as one line on stderr, next to the one-sentence error, while the log file keeps the traceback."""
    import logging as std

    from absl import logging as absl_logging

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = std.FileHandler(log_file)
    to_file.setFormatter(std.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
    std.getLogger().addHandler(to_file)
    std.raiseExceptions = False  # a log file on a full disk must not print a traceback per record

    class OneLine(absl_logging.PythonFormatter):
        def format(self, record):
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                line = super().format(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved
            return line + (f" (traceback in {log_file})" if saved[0] or saved[2] else "")

    absl_logging.get_absl_handler().python_handler.setFormatter(OneLine())
    return log_file
