"""The latent cache's on-disk format: what ``jointnet-cache-latents`` (``data/latents.py``) writes and the
cached data loader (``loader.LatentLoader``) reads.

A cache folder holds record shards ``{prefix}-{i:05d}-of-{n:05d}.array_record`` (one per labelled input
shard, same ArrayRecord container as ``records.py``) and two small files written atomically next to them:

* ``latents.json``: the settings every record was made with: ``format`` (1), ``resolution``, ``dtype``
  (storage: bf16, fp16 or fp32), ``flip`` (flipped copies stored), ``maps`` (``image`` and the dense maps:
  ``depth``, ``normal``), ``latent_shape`` (h, w, c), ``text_shape`` (L, D), ``scaling_factor`` (of the VAE),
  ``max_length`` (of the token ids) and ``model`` (the folder or Hub id the encoders came from).
* ``uncond.npy``: the empty prompt's text embedding (1, L, D) float32, the target of text drop.

One record is a ``tf.train.Example`` with ``key`` and ``caption`` (UTF-8 bytes) and, per stored array
``NAME``, three features: ``NAME`` (the raw bytes in C order, little-endian as on every
supported machine), ``NAME.shape`` (int64 list) and
``NAME.dtype`` (``bfloat16``, ``float16`` or ``float32``). The arrays are ``{map}_mean`` and ``{map}_logvar``
(the VAE posterior's moments of the map at the held-out crop, (h, w, c)), ``{map}_flip_mean`` and
``{map}_flip_logvar`` for the horizontally flipped copy when ``flip``, and ``text`` (the text encoder's last
hidden state of the caption, (L, D)).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np
from google.protobuf import message as protobuf_message
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from jointnet_jax.data.records import RecordError
from jointnet_jax.io_utils import write_json, write_npy

FORMAT = 1
INFO_NAME = "latents.json"
UNCOND_NAME = "uncond.npy"
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
_BY_NAME = {dtype.name: dtype for dtype in DTYPES.values()}


def moment_names(map_name: str, flipped: bool = False) -> tuple[str, str]:
    """The record's (mean, logvar) array names of one map, or of its flipped copy."""
    stem = f"{map_name}_flip" if flipped else map_name
    return f"{stem}_mean", f"{stem}_logvar"


@dataclasses.dataclass
class LatentExample:
    """One cached record: its ``key`` and ``caption`` and the named arrays (in their storage dtype)."""

    key: str
    caption: str
    arrays: dict[str, np.ndarray]


def encode_latent_example(example: LatentExample, dtype: str) -> bytes:
    """Record bytes of ``example``, every array stored as ``DTYPES[dtype]``."""
    feature = tf_feature_pb2.Feature
    features = {
        "key": feature(bytes_list=tf_feature_pb2.BytesList(value=[example.key.encode("utf-8")])),
        "caption": feature(bytes_list=tf_feature_pb2.BytesList(value=[example.caption.encode("utf-8")])),
    }
    for name, array in example.arrays.items():
        stored = np.ascontiguousarray(np.asarray(array, np.float32).astype(DTYPES[dtype]))
        features[name] = feature(bytes_list=tf_feature_pb2.BytesList(value=[stored.tobytes()]))
        features[f"{name}.shape"] = feature(int64_list=tf_feature_pb2.Int64List(value=list(stored.shape)))
        features[f"{name}.dtype"] = feature(bytes_list=tf_feature_pb2.BytesList(value=[stored.dtype.name.encode()]))
    proto = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=features))
    return proto.SerializeToString(deterministic=True)


def _one(features, name: str, kind: str):
    if name not in features.feature:
        raise RecordError(f"cached record has no {name!r} field.")
    values = getattr(features.feature[name], kind).value
    if len(values) != 1:
        raise RecordError(f"cached record field {name!r} must hold one value, got {len(values)}.")
    return values[0]


def _array(features, name: str) -> np.ndarray:
    dtype = _BY_NAME.get(_one(features, f"{name}.dtype", "bytes_list").decode("utf-8", "replace"))
    if dtype is None:
        raise RecordError(f"cached record array {name!r} has an unknown dtype.")
    shape = tuple(features.feature[f"{name}.shape"].int64_list.value)
    data = _one(features, name, "bytes_list")
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise RecordError(f"cached record array {name!r} holds {len(data)} bytes, not a {dtype.name} {shape}.")
    return np.frombuffer(data, dtype).reshape(shape)


def decode_latent_example(data: bytes) -> LatentExample:
    """Parse cached record bytes; raises ``records.RecordError`` on any corruption."""
    try:
        features = tf_example_pb2.Example.FromString(data).features
        key, caption = (_one(features, name, "bytes_list").decode("utf-8") for name in ("key", "caption"))
    except (protobuf_message.DecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"corrupt cached record: {type(error).__name__}: {error}") from error
    names = [name[: -len(".shape")] for name in features.feature if name.endswith(".shape")]
    return LatentExample(key, caption, {name: _array(features, name) for name in sorted(names)})


def write_cache_files(folder: str, info: dict, uncond: np.ndarray) -> None:
    """``latents.json`` and ``uncond.npy`` into ``folder``, each atomically; refuses a folder whose existing
    ``latents.json`` says other settings (its shards were made with them)."""
    path = os.path.join(folder, INFO_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            existing = json.load(file)
        if existing != info:
            changed = sorted(k for k in {**existing, **info} if existing.get(k) != info.get(k))
            raise FileExistsError(
                f"{folder} holds a latent cache made with other settings ({', '.join(changed)} differ); "
                "rerun with the same flags or use another --out."
            )
    write_npy(os.path.join(folder, UNCOND_NAME), np.asarray(uncond, np.float32))
    write_json(path, info)


def read_cache_files(shard_paths: Sequence[str]) -> tuple[dict, np.ndarray]:
    """(info, uncond) of the cache folders holding ``shard_paths``; they must all agree on the info."""
    folders = sorted({os.path.dirname(os.path.abspath(path)) for path in shard_paths})
    infos = []
    for folder in folders:
        path = os.path.join(folder, INFO_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no {INFO_NAME}: it is not a latent cache of jointnet-cache-latents.")
        with open(path, encoding="utf-8") as file:
            infos.append(json.load(file))
    if any({**info, "model": ""} != {**infos[0], "model": ""} for info in infos):
        raise ValueError(f"the latent caches {folders} were made with different settings; use one cache at a time.")
    if infos[0].get("format") != FORMAT:
        raise ValueError(f"{folders[0]} holds latent-cache format {infos[0].get('format')}, not {FORMAT}.")
    return infos[0], np.load(os.path.join(folders[0], UNCOND_NAME))
