"""PyTorch weight files (safetensors, weights-only .bin) <-> NNX state, strictly, in both directions.

Parameter paths mirror the PyTorch state-dict keys (``down_blocks.0.attentions.1.proj_in`` ...), so the
conversion is a layout rule per leaf name, not a table per layer:

* ``kernel`` (4-D conv)   <- ``weight`` OIHW, transposed to HWIO
* ``kernel`` (2-D linear) <- ``weight`` (out, in), transposed to (in, out)
* ``scale`` (norms)       <- ``weight``;  ``embedding`` <- ``weight``;  ``bias`` <- ``bias``

Reading is lazy (one tensor at a time from safetensors, or from a weights-only torch pickle), and each
tensor goes straight into the model's abstract state, so loading never holds two full copies in host
memory. Writing goes to a temporary name in the target folder and is renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jointnet_jax.io_utils import atomic_write
from jointnet_jax.models.layers import abstract_params

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(ValueError):
    """A checkpoint does not match the model it is loaded into (keys, shapes) or cannot be read."""


def _names(keys, limit=8):
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------------------
# Reading


class TensorReader:
    """Lazy name -> numpy array access to one checkpoint (safetensors, sharded safetensors, or torch .bin)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._torch: dict[Path, dict] = {}
        for f in files:
            for k in self._keys_of(f):
                self._where[k] = f

    def _keys_of(self, f: Path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="numpy") as h:
                    return list(h.keys())
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise WeightsError(f"cannot read {f}: not a valid safetensors file (truncated or corrupt: {e})") from e
        return list(self._torch_state(f).keys())

    def _torch_state(self, f: Path) -> dict:
        if f not in self._torch:
            try:
                import torch
            except ImportError as e:
                raise WeightsError(
                    f"{f} is a PyTorch pickle; install torch to read it (or convert it to safetensors)"
                ) from e
            try:
                # weights_only: never execute pickled code; mmap: do not read the whole file up front.
                self._torch[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise WeightsError(f"cannot read {f} as a weights-only PyTorch checkpoint: {e}") from e
        return self._torch[f]

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> np.ndarray:
        f = self._where[key]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="numpy") as h:
                    return h.get_tensor(key)
            except Exception as e:
                raise WeightsError(f"cannot read tensor {key!r} from {f}: {e}") from e
        t = self._torch_state(f)[key]
        return t.float().numpy() if t.dtype.is_floating_point else t.numpy()


def _weight_names(stem: str, ext: str, variant: str | None) -> tuple[str, str]:
    """(single file, shard index) names of a diffusers/transformers weights file in precision ``variant``:
    ``model.fp16.safetensors`` and ``model.safetensors.index.fp16.json`` (shards ``model.fp16-00001-of-...``)."""
    if variant:
        return f"{stem}.{variant}{ext}", f"{stem}{ext}.index.{variant}.json"
    return f"{stem}{ext}", f"{stem}{ext}.index.json"


def _variants_present(folder: Path, stems: list[str]) -> list[str]:
    """Precision variants (``fp16``, ...) that ``folder`` has weights for, from the file names."""
    found = set()
    for s in stems:
        for ext in (".safetensors", ".bin"):
            for f in folder.glob(f"{s}.*{ext}"):
                middle = f.name[len(s) + 1 : -len(ext)]
                if middle and "." not in middle and "-of-" not in middle:
                    found.add(middle)
            for f in folder.glob(f"{s}{ext}.index.*.json"):
                found.add(f.name[len(f"{s}{ext}.index.") : -len(".json")])
    return sorted(found)


def checkpoint_files(
    folder: str | os.PathLike, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> list[Path]:
    """The weight files of a diffusers/transformers model folder: safetensors first, then .bin, sharded or not.

    ``stem`` is ``diffusion_pytorch_model`` for diffusers models; transformers uses ``model`` (safetensors)
    and ``pytorch_model`` (.bin). ``variant`` (``"fp16"``) picks ``{stem}.fp16.safetensors`` and its sharded
    form; with None the plain files are used, or the one variant present when there are no plain files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    stems = [stem] if stem != "model" else ["model", "pytorch_model"]
    for s in stems:
        for ext in (".safetensors", ".bin"):
            single, index_name = _weight_names(s, ext, variant)
            if (folder / single).is_file():
                return [folder / single]
            index = folder / index_name
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise WeightsError(f"{index} is not a valid shard index (JSON with a weight_map): {e}") from e
                missing = [x for x in shards if not (folder / x).is_file()]
                if missing:
                    raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
                return [folder / x for x in shards]
    present = _variants_present(folder, stems)
    if variant is None and len(present) == 1:
        return checkpoint_files(folder, stem, present[0])
    wanted = f"{stems[0]}.{variant}.safetensors" if variant else f"{stems[0]}.safetensors or .bin"
    hint = f"; it has the variants {', '.join(present)} (pass variant=...)" if present else ""
    raise FileNotFoundError(f"{folder} has no weights file ({wanted}){hint}")


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a diffusers/transformers model folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------------
# Path <-> key and layout rules


def torch_key(path: tuple) -> str:
    """NNX state path -> PyTorch state-dict key."""
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_jax_layout(leaf: str, value: np.ndarray, target_shape: tuple) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4 and len(target_shape) == 4:
        value = value.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(target_shape) == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):  # legacy 1x1-conv attention projections
            value = value[:, :, 0, 0]
        if value.ndim == 2:
            value = value.T
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


# ---------------------------------------------------------------------------------------------------------
# Model <-> tensors


def abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
    """Build a model on abstract shapes only (no parameter memory, no random init compute)."""
    with abstract_params():
        return build()


class PrefixedReader:
    """Several readers seen as one, keys prefixed ``"{prefix}.{key}"`` (the two branches of a JointNet)."""

    def __init__(self, readers: dict[str, TensorReader]):
        self.readers = readers

    def keys(self) -> set[str]:
        return {f"{p}.{k}" for p, r in self.readers.items() for k in r.keys()}

    def get(self, key: str) -> np.ndarray:
        prefix, rest = key.split(".", 1)
        return self.readers[prefix].get(rest)


def fill(
    model: nnx.Module,
    tensors,
    *,
    source: str = "checkpoint",
    rename: Callable[[str], str] | None = None,
    allow_missing: Callable[[str], bool] | None = None,
    ignore_unexpected: Callable[[str], bool] | None = None,
    sharding: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
    param_dtype=None,
) -> nnx.Module:
    """Return ``model`` (abstract or concrete) with every parameter taken from ``tensors``, strictly.

    ``tensors`` is anything with ``keys()`` and ``get(key)`` returning PyTorch-layout arrays (a dict, a
    ``TensorReader``). Every stored tensor must be consumed and every parameter filled with the right
    shape, else one ``WeightsError`` names the offending keys. ``allow_missing(key)`` lets named parameters
    start at zero (freshly added exchange convs); ``rename`` maps stored names (legacy VAE attention names)
    first; ``sharding(path, shape)`` places each parameter as it is read (multi-device loading).
    Parameters keep the model's dtype (float32) whatever the stored one (fp16 variants are widened), unless
    ``param_dtype`` asks for another.
    """
    stored = {(rename(k) if rename else k): k for k in tensors.keys()}
    graphdef, state = nnx.split(model)
    missing, bad_shape, new_leaves = [], [], []
    for path, var in nnx.to_flat_state(state):
        key = torch_key(path)
        leaf = str(path[-1])
        target = var.get_value()
        shape, dtype = tuple(target.shape), target.dtype
        if key in stored:
            value = to_jax_layout(leaf, np.asarray(tensors.get(stored.pop(key))), shape)
        elif allow_missing is not None and allow_missing(key):
            value = np.zeros(shape, dtype)
        else:
            missing.append(key)
            continue
        if tuple(value.shape) != shape:
            model_shape = to_torch_layout(leaf, np.empty(shape, np.int8)).shape
            bad_shape.append(f"{key} (stored {tuple(to_torch_layout(leaf, value).shape)}, model {model_shape})")
            continue
        value = value.astype(param_dtype or dtype)
        shard = sharding(path, shape) if sharding is not None else None
        new_leaves.append((path, var.replace(jax.device_put(value, shard) if shard else jnp.asarray(value))))
    unexpected = [k for k in stored if not (ignore_unexpected and ignore_unexpected(k))]
    problems = []
    if missing:
        problems.append(f"missing from the {source}: {_names(missing)}")
    if unexpected:
        problems.append(f"not used by the model: {_names(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shape: {_names(bad_shape)}")
    if problems:
        raise WeightsError(f"{source} does not match the model; " + "; ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(new_leaves))


def load_folder(model: nnx.Module, folder, *, stem="diffusion_pytorch_model", variant=None, **kw) -> nnx.Module:
    """Fill ``model`` strictly from the weights in a diffusers/transformers model folder."""
    files = checkpoint_files(folder, stem, variant)
    return fill(model, TensorReader(files), source=str(folder), **kw)


def state_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(PyTorch key, PyTorch-layout float32 numpy array) for every parameter of ``model``."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield torch_key(path), to_torch_layout(str(path[-1]), np.asarray(jax.device_get(var.get_value())))


def save_folder(model: nnx.Module, folder, config: dict, *, stem="diffusion_pytorch_model") -> None:
    """Write ``config.json`` + ``{stem}.safetensors`` (PyTorch keys and layouts), each atomically."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_tensors(model)}
    atomic_write(folder / f"{stem}.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda p: p.write_text(text))
