"""CLI plumbing shared by every command line (``sample``, ``evaluate``, ``train``, ``mesh``, ``label``,
``demo``): the model, prompt and sampling arguments, reading prompts, strict JSON written atomically, and
the one error handler that turns a user's mistake into one sentence and exit status 1. Results are written
with ``io_utils.write_json`` (strict JSON, atomically).

Each CLI declares only the flags its subcommands use, through the ``add_*`` functions here, so the same flag
has the same name, default and help everywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

DTYPES = ("fp32", "bf16")
# What counts as the user's mistake (a missing file, a bad value or layout, a missing optional package):
# one sentence on stderr and exit 1. Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (OSError, ValueError, ImportError)


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


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


def add_sampler_arguments(p: argparse.ArgumentParser, *, steps: int = 50) -> None:
    """Steps, guidance, the sampler (any name of ``diffusion.SAMPLER_NAMES``; ``--scheduler`` is its old
    spelling), DDIM's eta and the seed."""
    from jointnet_jax.diffusion import SAMPLER_NAMES

    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = unguided)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--sampler", "--scheduler", dest="sampler", choices=SAMPLER_NAMES, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)


def add_size_arguments(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--height", type=int, help=f"default: {default}")
    p.add_argument("--width", type=int)


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


def run(command: Callable[[], object]) -> int:
    """Run a CLI body: 0 on success; a user error is one ``error: ...`` line on stderr and status 1."""
    try:
        command()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
