"""Where model folders come from: a local folder, or a Hugging Face Hub repository id.

Every place that takes a base or a model (``jj.load_*``, ``Pipeline.from_pretrained``, the CLIs' ``--base`` and
``--model``, the training config's ``base`` and ``init_from``) accepts either

* a local folder (``/data/stable-diffusion-2-1-base``, ``runs/stage1/export``), used as it is; or
* a Hub id ``org/name``, optionally followed by a subfolder (``stabilityai/stable-diffusion-2-1-base/unet``).

A Hub id is resolved through ``huggingface_hub``'s own cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``): a snapshot already there is used without any network access, which is how
offline machines and ``HF_HUB_OFFLINE=1`` work; otherwise the files are downloaded into the cache. A download
takes only what the loaders read (configs, tokenizer files and safetensors weights of the subfolders asked
for, of one precision variant), never the multi-GB single-file ``.ckpt`` copies that SD repositories also carry.

A local path wins over a Hub id of the same spelling, so ``runs/export`` is never looked up online when it
exists; when it does not, the error names both readings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/[\w.-]+)*")
# What the loaders read; weights are safetensors (weights-only .bin is read from local folders too, but SD
# repositories carry both formats, and downloading one is enough).
_FILES = ("*.json", "*.txt", "*.model")
_VARIANTS = ("fp16", "bf16")


def is_hub_id(name: str | os.PathLike) -> bool:
    """``org/name[/subfolder...]`` that is not an existing local path, an absolute path or ``./``-relative."""
    s = str(name)
    return bool(_HUB_ID.fullmatch(s)) and not Path(s).exists() and not s.startswith(".")


def download_patterns(subfolders: Iterable[str] = ("",), variant: str | None = None) -> tuple[list, list]:
    """(allow, ignore) glob patterns for ``snapshot_download``: configs, tokenizers and the safetensors weights
    of ``subfolders`` ("" = the repository root), in precision ``variant`` (None: the plain files).

    diffusers and transformers name a variant's files ``{stem}.fp16.safetensors``, its shards
    ``{stem}.fp16-0000k-of-0000n.safetensors`` and its shard index ``{stem}.safetensors.index.fp16.json``.
    """
    prefixes = [f"{s.strip('/')}/" if s.strip("/") else "" for s in subfolders]
    allow = [p + f for p in prefixes for f in _FILES]
    if variant:
        allow += [p + f for p in prefixes for f in (f"*.{variant}.safetensors", f"*.{variant}-*.safetensors")]
        return allow, []
    allow += [p + "*.safetensors" for p in prefixes]
    ignore = [f"*.{v}{tail}" for v in _VARIANTS for tail in (".*", "-*", ".json")]
    return allow, ignore


def resolve(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    *,
    what: str = "model folder",
    subfolders: Iterable[str] | None = None,
    variant: str | None = None,
) -> Path:
    """The local folder of ``name_or_path`` (joined with ``subfolder``).

    ``subfolders``: for a Hub download, the parts of the repository to fetch, relative to the folder that
    ``name_or_path`` names (default: ``subfolder``, else all of it). ``what`` names the thing in errors.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path / subfolder if subfolder else path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    org, name, *inner = str(name_or_path).split("/")
    repo_id, inner = f"{org}/{name}", "/".join(inner)
    wanted = list(subfolders) if subfolders is not None else [subfolder or ""]
    parts = ["/".join(p for p in (inner, w) if p) for w in wanted]
    snapshot = _snapshot(repo_id, parts, variant, what=what, shown=str(name_or_path))
    folder = snapshot / inner if inner else snapshot
    return folder / subfolder if subfolder else folder


def _snapshot(repo_id: str, parts: list[str], variant: str | None, *, what: str, shown: str) -> Path:
    """The cached snapshot of ``repo_id``, downloading ``parts`` of it when it is not cached and the Hub is
    reachable; one FileNotFoundError sentence otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    allow, ignore = download_patterns(parts, variant)
    try:  # the cache first: no network round trip when the snapshot is there (offline machines, CI)
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow, ignore_patterns=ignore))
    except LocalEntryNotFoundError:  # not cached, or known to be incomplete (IncompleteSnapshotError)
        pass
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{what} {shown} is neither a local folder nor a Hub model in {where}, and HF_HUB_OFFLINE is set; "
            f"download it once on a machine online (hf download {repo_id}) or give a local folder"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore or None))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{what} {shown} is neither a local folder nor a Hub model in {where}, and downloading {repo_id} "
            f"from the Hub failed: {first}"
        ) from None
