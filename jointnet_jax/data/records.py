"""On-disk record format for joint RGB + depth training examples.

One training example is one ArrayRecord record holding a serialised ``tf.train.Example`` protobuf
(the message class ships with ``tensorflow_datasets``, so TensorFlow itself is not needed). This is
exactly what TFDS writes for the matching ``FeaturesDict`` (see ``tfds_builder.features``), so the
same shards are readable both by :class:`RecordReader` and by ``tfds.data_source``; protobuf also
gives forward compatibility (unknown fields are ignored) and a cheap integrity check on parse.

Fields (``tf.train.Example`` feature name -> contents):

* ``key``, ``caption``, ``source``: UTF-8 bytes.
* ``image``: encoded PNG or JPEG bytes of the RGB image.
* ``depth``: 16-bit grayscale PNG of inverse depth normalised per image to [0, 1] (near = 1 = bright),
  quantised as ``round(d * 65535)``; see :func:`normalize_inverse_depth`.
* ``normal`` (optional, absent when unknown): 8-bit RGB PNG of camera-space unit normals mapped by
  ``(n + 1) / 2 * 255`` (x right, y up, z towards the camera).
* ``width``, ``height``: int64 size of the stored image (and depth/normal maps).
* ``watermark``, ``aesthetic``, ``clip_similarity``: float32 scores. Unknown (``None``/NaN) scores are
  stored as :data:`MISSING_SCORE` (-1.0, outside the watermark [0, 1] and aesthetic [0, 10] ranges
  and the minimum possible cosine similarity) so threshold filters reject them; decoding maps the
  sentinel back to ``None``.

Shards are named ``{prefix}-{index:05d}-of-{num_shards:05d}.array_record`` and are written with
``group_size:1`` (required for fast random access). :class:`ShardWriter` writes every shard to a
hidden temporary file in the output folder and renames it only after all shards were written
successfully, so a crash or kill never leaves a half-written file under a final name.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import math
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_data_source, array_record_module
from google.protobuf import message as protobuf_message
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

MISSING_SCORE = -1.0
SCORE_FIELDS = ("watermark", "aesthetic", "clip_similarity")
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1,uncompressed"  # payloads are PNG/JPEG already; group_size 1 for random access
_SHARD_RE = re.compile(r"^(?P<prefix>[^.].*)-(?P<index>\d{5,})-of-(?P<num>\d{5,})\.array_record$")


class RecordError(ValueError):
    """A record could not be decoded (corrupt bytes or a missing/invalid field)."""


@dataclasses.dataclass
class Example:
    """One decoded training example.

    ``image`` is uint8 HxWx3 RGB, ``depth`` float32 HxW normalised inverse depth in [0, 1] (near = 1),
    ``normal`` optional uint8 HxWx3 encoded camera-space normals. Scores are ``None`` when unknown.
    """

    key: str
    caption: str
    image: np.ndarray
    depth: np.ndarray
    normal: np.ndarray | None = None
    watermark: float | None = None
    aesthetic: float | None = None
    clip_similarity: float | None = None
    source: str = ""

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def encode_png(array: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps/metadata) of a uint8 HxW[x3] or uint16 HxW array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_image(image: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Encode a uint8 HxWx3 RGB image as PNG (lossless, default) or JPEG."""
    if image_format == "png":
        return encode_png(image)
    if image_format == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
        return buffer.getvalue()
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")


def normalize_inverse_depth(depth: np.ndarray) -> np.ndarray:
    """Map metric depth (HxW, > 0, inf = no hit) to per-image min-max normalised inverse depth.

    Near pixels become 1 and the farthest 0, the affine-invariant disparity convention of the
    monocular depth estimators that label real data. A constant-depth image maps to all zeros.
    """
    inverse = np.where(np.isfinite(depth), 1.0 / np.maximum(depth, 1e-12), 0.0)
    low, high = float(inverse.min()), float(inverse.max())
    if high - low <= 1e-12 * max(high, 1.0):
        return np.zeros(depth.shape, np.float32)
    return ((inverse - low) / (high - low)).astype(np.float32)


def encode_depth_png(depth: np.ndarray) -> bytes:
    """Quantise a float HxW map in [0, 1] to 16 bits (``round(d * 65535)``) and encode it as PNG."""
    depth = np.asarray(depth)
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth must be a float HxW array, got dtype {depth.dtype} shape {depth.shape}.")
    if not np.all(np.isfinite(depth)) or depth.min() < 0.0 or depth.max() > 1.0:
        raise ValueError("depth must be finite and within [0, 1] (normalised inverse depth).")
    return encode_png(np.round(depth.astype(np.float64) * 65535.0).astype(np.uint16))


def decode_depth_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_depth_png`: float32 HxW in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("I;16", "I;16B", "I"):
            raise RecordError(f"depth must be a 16-bit grayscale PNG, got {image.format} mode {image.mode}.")
        values = np.asarray(image).astype(np.float32)
    return values / np.float32(65535.0)


def _decode_rgb(data: bytes, field: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            raise RecordError(f"{field} must be an 8-bit RGB image, got mode {image.mode}.")
        return np.asarray(image, dtype=np.uint8)


def _score(value: Any, name: str) -> float:
    if value is None:
        return MISSING_SCORE
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}.")
    return MISSING_SCORE if math.isnan(value) else float(value)


def _check_rgb(array: Any, name: str, height_width: tuple[int, int] | None = None) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        shape = getattr(array, "shape", None)
        raise ValueError(f"{name} must be a uint8 HxWx3 numpy array, got {type(array).__name__} {shape}.")
    if height_width is not None and array.shape[:2] != height_width:
        raise ValueError(f"{name} is {array.shape[:2]} but the image is {height_width}; sizes must match.")


def _bytes_feature(value: bytes) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[value]))


def _int_feature(value: int) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[value]))


def _float_feature(value: float) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=[value]))


def example_to_features(example: Example, image_format: str = "png") -> dict[str, Any]:
    """Validate ``example`` and return the flat dict of encoded field values (also TFDS's input)."""
    for name in ("key", "caption", "source"):
        if not isinstance(getattr(example, name), str):
            raise TypeError(f"{name} must be a str, got {type(getattr(example, name)).__name__}.")
    if not example.key:
        raise ValueError("key must be a non-empty string.")
    _check_rgb(example.image, "image")
    height_width = example.image.shape[:2]
    depth = example.depth
    if not isinstance(depth, np.ndarray) or depth.shape != height_width:
        shape = getattr(depth, "shape", None)
        raise ValueError(f"depth must be an HxW array matching the image {height_width}, got {shape}.")
    features = {
        "key": example.key,
        "caption": example.caption,
        "image": encode_image(example.image, image_format),
        "depth": encode_depth_png(depth),
        "width": example.width,
        "height": example.height,
        "source": example.source,
    }
    if example.normal is not None:
        _check_rgb(example.normal, "normal", height_width)
        features["normal"] = encode_png(example.normal)
    for name in SCORE_FIELDS:
        features[name] = _score(getattr(example, name), name)
    return features


def encode_example(example: Example, image_format: str = "png") -> bytes:
    """Serialise an :class:`Example` to record bytes; raises ``ValueError``/``TypeError`` if invalid."""
    features = {}
    for name, value in example_to_features(example, image_format).items():
        if isinstance(value, str):
            features[name] = _bytes_feature(value.encode("utf-8"))
        elif isinstance(value, bytes):
            features[name] = _bytes_feature(value)
        elif isinstance(value, int):
            features[name] = _int_feature(value)
        else:
            features[name] = _float_feature(value)
    proto = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=features))
    return proto.SerializeToString(deterministic=True)


def _get(features: Any, name: str, kind: str, optional: bool = False) -> Any:
    if name not in features.feature:
        if optional:
            return None
        raise RecordError(f"record has no {name!r} field.")
    values = getattr(features.feature[name], kind).value
    if len(values) != 1:
        raise RecordError(f"record field {name!r} must hold exactly one {kind} value, got {len(values)}.")
    return values[0]


def decode_example(data: bytes) -> Example:
    """Parse record bytes into an :class:`Example`; raises :class:`RecordError` on any corruption."""
    try:
        features = tf_example_pb2.Example.FromString(data).features
        text = {name: _get(features, name, "bytes_list").decode("utf-8") for name in ("key", "caption")}
        image = _decode_rgb(_get(features, "image", "bytes_list"), "image")
        depth = decode_depth_png(_get(features, "depth", "bytes_list"))
        normal_bytes = _get(features, "normal", "bytes_list", optional=True)
        normal = None if normal_bytes is None else _decode_rgb(normal_bytes, "normal")
        size = (_get(features, "height", "int64_list"), _get(features, "width", "int64_list"))
        scores = {name: _get(features, name, "float_list") for name in SCORE_FIELDS}
        source = _get(features, "source", "bytes_list", optional=True) or b""
        source = source.decode("utf-8")
    except RecordError:
        raise
    except (protobuf_message.DecodeError, OSError, UnicodeDecodeError, ValueError, SyntaxError) as error:
        raise RecordError(f"corrupt record: {type(error).__name__}: {error}") from error
    for name, array in (("image", image), ("depth", depth), ("normal", normal)):
        if array is not None and array.shape[:2] != size:
            raise RecordError(f"record {name} is {array.shape[:2]} but width/height say {size}.")
    scores = {name: None if value == MISSING_SCORE else float(value) for name, value in scores.items()}
    return Example(image=image, depth=depth, normal=normal, source=source, **text, **scores)


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def list_shards(folder: str | os.PathLike, prefix: str | None = None) -> list[str]:
    """Final-named shards in ``folder`` (temporary files are skipped), sorted by prefix and index.

    Raises ``FileNotFoundError`` when a prefix's shard set is incomplete, so a reader never silently
    trains on part of a dataset.
    """
    found: dict[str, dict[int, str]] = {}
    for name in os.listdir(folder):
        match = _SHARD_RE.match(name)
        if match and (prefix is None or match["prefix"] == prefix):
            found.setdefault(f"{match['prefix']}-of-{match['num']}", {})[int(match["index"])] = name
    paths = []
    for group, shards in sorted(found.items()):
        num_shards = int(group.rsplit("-of-", 1)[1])
        if sorted(shards) != list(range(num_shards)):
            raise FileNotFoundError(f"incomplete shard set {group} in {folder}: have {sorted(shards)}.")
        paths += [os.path.join(folder, shards[index]) for index in range(num_shards)]
    return paths


def _existing_shards(folder: str, prefix: str) -> list[str]:
    """Every final-named shard of ``prefix`` in ``folder``, complete set or not."""
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if (match := _SHARD_RE.match(name)) and match["prefix"] == prefix
    )


class ShardWriter:
    """Context manager writing examples into ``num_shards`` or ``examples_per_shard`` sized shards.

    With ``num_shards`` the examples are dealt round-robin (the total need not be known, but reading
    the shards in order then yields examples 0, K, 2K, ..., 1, K+1, ...); with
    ``examples_per_shard`` shards are filled one after another and the shard count is fixed at close.
    Files are written under hidden temporary names and renamed to their final names only when the
    context exits without an exception; on an exception they are deleted. Existing shards with the
    same prefix raise ``FileExistsError`` unless ``overwrite`` (then they are replaced on commit).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        *,
        num_shards: int | None = None,
        examples_per_shard: int | None = None,
        image_format: str = "png",
        overwrite: bool = False,
    ):
        if (num_shards is None) == (examples_per_shard is None):
            raise ValueError("pass exactly one of num_shards and examples_per_shard.")
        if (num_shards or examples_per_shard) < 1:
            raise ValueError("num_shards / examples_per_shard must be >= 1.")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise ValueError(f"prefix must be a plain file-name prefix not starting with '.', got {prefix!r}.")
        self.out_dir = os.fspath(out_dir)
        self.prefix = prefix
        self.num_shards = num_shards
        self.examples_per_shard = examples_per_shard
        self.image_format = image_format
        self.overwrite = overwrite
        self.paths: list[str] = []
        self.shard_lengths: list[int] = []
        self._token = secrets.token_hex(4)
        self._temp_paths: list[str] = []
        self._writers: list[Any] = []
        self._count = 0

    def __enter__(self) -> ShardWriter:
        os.makedirs(self.out_dir, exist_ok=True)
        if not self.overwrite and _existing_shards(self.out_dir, self.prefix):
            raise FileExistsError(f"shards with prefix {self.prefix!r} already exist in {self.out_dir}.")
        for _ in range(self.num_shards or 1):
            self._open_shard()
        return self

    def _open_shard(self) -> None:
        index = len(self._temp_paths)
        path = os.path.join(self.out_dir, f".{self.prefix}-{index:05d}{SHARD_SUFFIX}.tmp-{self._token}")
        self._temp_paths.append(path)
        self._writers.append(array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS))
        self.shard_lengths.append(0)

    def write(self, example: Example | bytes) -> None:
        """Append an :class:`Example` (validated and encoded) or already-encoded record bytes."""
        if not self._writers:
            raise RuntimeError("ShardWriter.write called outside its `with` block.")
        record = example if isinstance(example, bytes) else encode_example(example, self.image_format)
        if self.num_shards is not None:
            index = self._count % self.num_shards
        else:
            if self.shard_lengths[-1] == self.examples_per_shard:
                self._open_shard()
            index = len(self._writers) - 1
        self._writers[index].write(record)
        self.shard_lengths[index] += 1
        self._count += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            for writer in self._writers:
                writer.close()
            if exc_type is None:
                self._commit()
        finally:
            self._writers = []
            for path in self._temp_paths:
                if os.path.exists(path):
                    os.remove(path)

    def _commit(self) -> None:
        num_shards = len(self._temp_paths)
        final = [os.path.join(self.out_dir, shard_name(self.prefix, i, num_shards)) for i in range(num_shards)]
        for path in self._temp_paths:  # make the data durable before it becomes visible
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        stale = set(_existing_shards(self.out_dir, self.prefix)) - set(final)
        for temp, path in zip(self._temp_paths, final, strict=True):
            os.replace(temp, path)
        for path in stale:
            os.remove(path)
        self.paths = final


def write_shards(
    examples: Iterable[Example | bytes],
    out_dir: str | os.PathLike,
    prefix: str,
    *,
    num_shards: int | None = None,
    examples_per_shard: int | None = None,
    image_format: str = "png",
    overwrite: bool = False,
) -> list[str]:
    """Write ``examples`` atomically (see :class:`ShardWriter`) and return the final shard paths."""
    with ShardWriter(
        out_dir,
        prefix,
        num_shards=num_shards,
        examples_per_shard=examples_per_shard,
        image_format=image_format,
        overwrite=overwrite,
    ) as writer:
        for example in examples:
            writer.write(example)
    return writer.paths


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard files of ``paths`` (files, folders of complete shard sets, or globs); none found is an error."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    expanded = []
    for item in map(os.fspath, items):
        if os.path.isdir(item):
            expanded += list_shards(item)
        elif glob.has_magic(item):
            expanded += sorted(p for p in glob.glob(item) if _SHARD_RE.match(os.path.basename(p)))
        else:
            expanded.append(item)
    if not expanded:
        raise FileNotFoundError(f"no record shards found for {paths!r}.")
    return expanded


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class RecordReader:
    """Random-access reader over record shards; a grain ``RandomAccessDataSource``.

    ``paths`` may be shard files, folders (all complete shard sets inside) or glob patterns; hidden
    temporary files of unfinished writes are never picked up. Items are decoded :class:`Example`
    objects, or raw record bytes with ``decode=False`` (e.g. to decode in grain workers instead).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], decode: bool = True):
        self.paths = expand_paths(paths)
        self.decode = decode
        try:
            self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        except (RuntimeError, OSError, ValueError) as error:
            raise RecordError(f"{self._unreadable_shard()} cannot be opened: {_first_line(error)}") from None

    def _unreadable_shard(self) -> str:
        """The first shard that does not open on its own (its index or footer is damaged)."""
        for path in self.paths:
            try:
                array_record_data_source.ArrayRecordDataSource([path])
            except (RuntimeError, OSError, ValueError):
                return f"record shard {path}"
        return f"one of the record shards {self.paths}"

    def _read(self, index: int) -> bytes:
        """One record's bytes; a damaged chunk (block-level corruption: a hash mismatch) is a RecordError, which
        the data loader counts and skips like an undecodable record."""
        try:
            return self._source[index % len(self)]
        except RuntimeError as error:
            raise RecordError(f"record {index} lies in a damaged chunk: {_first_line(error)}") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example | bytes:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records.")
        record = self._read(index)
        return decode_example(record) if self.decode else record

    def __getitems__(self, indices: Sequence[int]) -> list[Example | bytes]:
        try:
            records = self._source.__getitems__(list(indices))
        except RuntimeError:  # a damaged chunk among them: read one by one, so the error names the record
            records = [self._read(i) for i in indices]
        return [decode_example(r) for r in records] if self.decode else list(records)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"RecordReader({len(self.paths)} shards, {len(self)} records, decode={self.decode})"
