"""The data loader (Grain): record shards -> augmented, tokenised, per-process numpy batches.

Stages (each line runs where noted)::

    record positions    seeded global shuffle, new per epoch; process i takes slots i, i+n, ...   (MapDataset)
    load                read bytes, decode, shared random crop + flip, resize, tokenise          (grain workers)
    skip / batch        count and drop corrupt records, stack, scale to [-1, 1]                  (this process)

Why this split: everything up to ``load`` is a grain ``MapDataset`` indexed by stream position, so
``mp_prefetch`` workers interleave elements in exactly the in-process order (batches do not depend
on ``worker_count``) and grain's own iterator state locates the next element. Counting corrupt
records and batching happen in :class:`Loader`, a ``grain.DatasetIterator`` running in this
process, so the counters are readable here and are part of the checkpointed state. The state is a
JSON-serialisable dict, so grain's Orbax ``CheckpointHandler`` (or plain ``json``) stores it.
``grain.DataLoader`` is not used: its ``IndexSampler`` shuffles only within each process's contiguous
shard of records, and its operations run in the workers, out of reach of the counters.

Shuffling is global: every process walks the same seeded permutation of all records (grain's
``shuffle`` reseeds per epoch) and keeps every ``process_count``-th slot, so per epoch the processes
see disjoint records. Each process gets ``len // process_count`` records per epoch (the shuffled
leftover differs every epoch) and the stream repeats forever.

Augmentation draws one square crop (area fraction ``crop_scale`` of the largest square that fits,
uniform position) and one horizontal flip per example from a generator seeded by ``(seed, global
stream position)``, and applies both to the image and the dense map so pixels stay aligned. Flipping
camera-space normals (x right) also negates their x component (encoded ``v -> 255 - v``). All maps are
resized with antialiased bilinear filtering; resized normals are not renormalised.

Batches are dicts of numpy arrays: ``image`` (B, H, W, 3) float32 in [-1, 1]; the dense map under its
modality name, ``depth`` (B, H, W, 3) float32 in [-1, 1] (normalised inverse depth, near = 1, gray
replicated to three channels because JointNet encodes it with the RGB VAE) or ``normal`` (B, H, W, 3);
``input_ids`` (B, max_length) int32, or ``caption`` (B,) str without a tokenizer; ``key`` (B,) str,
``index`` (B,) int64 record index (-1 for padding) and ``valid`` (B,) bool.

Eval mode (``training=False``) reads each record once in file order with a centred largest-square
crop and no flip. Every process yields ``ceil(ceil(len / n) / B)`` batches, the tail padded with
``valid=False`` rows, and corrupt records become ``valid=False`` rows instead of being dropped, so
all hosts stay in step.

:class:`LatentLoader` is the same pipeline over a latent cache (``latents.py`` writes it, the format is in
``latent_records.py``): its elements are the cached posterior moments and text embeddings instead of pixels
and token ids; positions, shuffling, process slots, corrupt-record counting and the iterator state are
shared with :class:`Loader`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from jointnet_jax.data import latent_records, records

MODALITIES = ("depth", "normal")
_OK, _CORRUPT, _PADDING = 0, 1, 2


class TooManyCorruptRecordsError(RuntimeError):
    """More than ``max_corrupt_fraction`` of the records read so far failed to decode."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Loader settings; ``LoaderConfig(**config_dict)`` accepts an ml_collections ConfigDict's items.

    ``crop_scale`` is the (min, max) area fraction of the largest square that fits the image;
    ``batch_size`` is per process. ``tokenizer`` is the ``tokenizer/`` folder of the base model, a
    tokenizer object, or ``None`` to keep raw captions. ``max_corrupt_fraction`` is enforced once
    ``corrupt_check_after`` records were read. ``worker_count`` 0 decodes in this process.
    """

    paths: str | Sequence[str]
    resolution: int = 512
    batch_size: int = 8
    seed: int = 0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    modality: str = "depth"
    tokenizer: Any = None
    max_length: int = 77
    training: bool = True
    worker_count: int = 0
    read_threads: int = 2
    prefetch_buffer_size: int = 16
    max_corrupt_fraction: float = 0.01
    corrupt_check_after: int = 100

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}.")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}.")
        if self.resolution < 1 or self.batch_size < 1 or self.worker_count < 0 or self.read_threads < 1:
            raise ValueError("resolution, batch_size and read_threads must be >= 1 and worker_count >= 0.")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError(f"max_corrupt_fraction must be in [0, 1], got {self.max_corrupt_fraction}.")


class _ProcessSlots(grain.MapDataset):
    """Stream position k of process i -> (record index, global position), reading ``order`` epoch by epoch.

    ``order`` maps global position ``epoch * num_records + slot`` to a record (a grain shuffle reseeds
    per epoch). Training repeats forever over ``num_records // count`` slots per epoch; eval makes one
    pass over ``ceil(num_records / count)`` slots, where slots past the end are padding (record -1).
    """

    def __init__(self, order: grain.MapDataset, index: int, count: int, training: bool):
        super().__init__(order)
        self._num_records = len(order)
        self._index, self._count, self._training = index, count, training
        self._per_epoch = self._num_records // count if training else -(-self._num_records // count)
        if self._per_epoch == 0:
            raise ValueError(f"{self._num_records} records cannot feed {count} processes.")

    def __len__(self) -> int:
        return sys.maxsize if self._training else self._per_epoch

    def __str__(self) -> str:
        return f"_ProcessSlots(index={self._index}, count={self._count}, training={self._training})"

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        epoch, slot = divmod(k, self._per_epoch)
        position = epoch * self._num_records + slot * self._count + self._index
        if not self._training and position >= self._num_records:
            return -1, position
        return int(self._parent[position]), position


def _resize(array: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` (left, top, right, bottom) and resize to ``size``²; float32 HxW maps stay float."""
    image = Image.fromarray(array)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


def held_out_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The held-out (``training=False``) crop: the centred largest square, as (left, top, right, bottom)."""
    largest = min(height, width)
    left, top = (width - largest) // 2, (height - largest) // 2
    return left, top, left + largest, top + largest


def draw_crop(config: LoaderConfig, height: int, width: int, rng: np.random.Generator):
    """The crop box and flip of one example: :func:`held_out_box` and no flip when not training; else a
    square of area fraction ``crop_scale`` at a uniform position and a flip with probability 1/2, drawn from
    ``rng`` in that order."""
    if not config.training:
        return held_out_box(height, width), False
    largest = min(height, width)
    side = max(1, round(largest * math.sqrt(rng.uniform(*config.crop_scale))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    flip = bool(config.flip and rng.random() < 0.5)
    return (left, top, left + side, top + side), flip


def crop_map(array: np.ndarray, box, flip: bool, size: int, *, normal: bool = False) -> np.ndarray:
    """One map (image, depth or encoded normals) cropped to ``box``, resized to ``size``² and flipped; a flip
    of camera-space normals also negates their x component."""
    array = _resize(array, box, size)
    if flip:
        array = np.ascontiguousarray(array[:, ::-1])
        if normal:
            array[..., 0] = 255 - array[..., 0]  # mirrored x: n_x -> -n_x, exact on (n + 1) * 127.5
    return array


def unit_range(maps: np.ndarray, name: str) -> np.ndarray:
    """Stacked maps as the models see them: float32 in [-1, 1]; depth replicated to three channels."""
    if name == "depth":
        return np.repeat((maps * np.float32(2.0) - np.float32(1.0))[..., None], 3, axis=-1)
    return maps.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def token_ids(tokenizer, caption: str, max_length: int) -> np.ndarray:
    """A caption's token ids (max_length,) int32, padded and truncated."""
    ids = tokenizer(caption, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32)


class _Load:
    """Record (index, position) -> augmented element; runs in grain workers, so it must pickle."""

    def __init__(self, reader: records.RecordReader, config: LoaderConfig, tokenizer):
        self.reader, self.config, self.tokenizer = reader, config, tokenizer

    def placeholder(self, index: int, status: int, error: str = "") -> dict[str, Any]:
        """Zero-filled element standing in for a corrupt record or eval padding."""
        size = self.config.resolution
        dense_shape = (size, size) if self.config.modality == "depth" else (size, size, 3)
        dense_dtype = np.float32 if self.config.modality == "depth" else np.uint8
        element = {
            "image": np.zeros((size, size, 3), np.uint8),
            self.config.modality: np.zeros(dense_shape, dense_dtype),
            "key": "",
            "index": np.int64(index),
            "status": status,
            "error": error,
        }
        if self.tokenizer is None:
            element["caption"] = ""
        else:
            element["input_ids"] = np.zeros(self.config.max_length, np.int32)
        return element

    def __call__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, position = item
        if index < 0:
            return self.placeholder(index, _PADDING)
        modality = self.config.modality
        try:
            example = records.decode_example(self.reader[index])
            dense = getattr(example, modality)
            if dense is None:
                raise records.RecordError(f"record has no {modality} map.")
        except records.RecordError as error:
            return self.placeholder(index, _CORRUPT, str(error))
        rng = np.random.default_rng([self.config.seed, position])
        box, flip = draw_crop(self.config, example.height, example.width, rng)
        image = crop_map(example.image, box, flip, self.config.resolution)
        dense = crop_map(dense, box, flip, self.config.resolution, normal=modality == "normal")
        element = {
            "image": image,
            modality: dense,
            "key": example.key,
            "index": np.int64(index),
            "status": _OK,
            "error": "",
        }
        if self.tokenizer is None:
            element["caption"] = example.caption
        else:
            element["input_ids"] = token_ids(self.tokenizer, example.caption, self.config.max_length)
        return element


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocess prefetch reads absl flags; outside an ``absl.app`` entry point they are unparsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Loader(grain.DatasetIterator):
    """Infinite (training) or single-pass (eval) iterator of per-process batches; see the module docstring.

    ``num_seen`` / ``num_corrupt`` count the records this process read and the corrupt ones among
    them. ``get_state()`` / ``set_state()`` checkpoint and resume exactly (counters included); build
    the restored loader with the same config and process layout. Call ``close()`` to stop workers.
    """

    _closed = True  # until grain's __init__ runs: a loader whose construction failed has nothing to close

    def __init__(
        self,
        config: LoaderConfig | Mapping[str, Any],
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if not isinstance(config, LoaderConfig):
            config = LoaderConfig(**dict(config))
        self.config = config
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count}).")
        self._reader = records.RecordReader(config.paths, decode=False)
        self._load = self._make_load(self._reader)
        order = grain.MapDataset.range(len(self._reader))
        if config.training:
            order = order.shuffle(seed=config.seed)
        dataset = _ProcessSlots(order, self.process_index, self.process_count, config.training).map(self._load)
        dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)
        )
        if config.worker_count:
            _ensure_absl_flags_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=config.worker_count, per_worker_buffer_size=config.prefetch_buffer_size
                )
            )
        super().__init__(iter(dataset))
        self.num_seen = 0
        self.num_corrupt = 0

    def _make_load(self, reader: records.RecordReader):
        """The element function of the grain workers (record position -> element, and its placeholder)."""
        tokenizer = self.config.tokenizer
        if isinstance(tokenizer, str | os.PathLike):
            from jointnet_jax.models.loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return _Load(reader, self.config, tokenizer)

    @property
    def num_records(self) -> int:
        """Records in the shards, all processes together."""
        return len(self._reader)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        elements = []
        while len(elements) < self.config.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if not elements:
                    raise
                break
            status = element.pop("status")
            error = element.pop("error")
            if status != _PADDING:
                self.num_seen += 1
            if status == _CORRUPT:
                self.num_corrupt += 1
                logging.warning("skipping corrupt record %d: %s", element["index"], error)
                self._check_corrupt_fraction()
                if self.config.training:
                    continue
            element["valid"] = status == _OK
            elements.append(element)
        while len(elements) < self.config.batch_size:  # only the last eval batch is short
            padding = self._load.placeholder(-1, _PADDING)
            del padding["status"], padding["error"]
            elements.append(padding | {"valid": False})
        return self._collate(elements)

    def _check_corrupt_fraction(self) -> None:
        fraction = self.num_corrupt / self.num_seen
        if self.num_seen >= self.config.corrupt_check_after and fraction > self.config.max_corrupt_fraction:
            raise TooManyCorruptRecordsError(
                f"{self.num_corrupt} of the {self.num_seen} records read so far ({fraction:.1%}) are corrupt, "
                f"more than max_corrupt_fraction={self.config.max_corrupt_fraction:.1%}; the shards "
                f"{self._reader.paths[:3]}{'...' if len(self._reader.paths) > 3 else ''} look damaged, stopping."
            )

    def _collate(self, elements: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Stack the elements and scale the maps to float32 [-1, 1] (done here on whole batches)."""
        batch = {name: np.stack([element[name] for element in elements]) for name in elements[0]}
        for name in ("image", self.config.modality):
            batch[name] = unit_range(batch[name], name)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"elements": self._parent.get_state(), "num_seen": self.num_seen, "num_corrupt": self.num_corrupt}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["elements"])
        self.num_seen = int(state["num_seen"])
        self.num_corrupt = int(state["num_corrupt"])

    def __str__(self) -> str:
        return (
            f"Loader({self.num_records} records, process {self.process_index}/{self.process_count}, "
            f"training={self.config.training})"
        )


class _LoadLatents:
    """Cached record (index, position) -> element of posterior moments and text embedding (see
    :class:`LatentLoader`); runs in grain workers, so it must pickle."""

    def __init__(self, reader: records.RecordReader, config: LoaderConfig, info: dict):
        self.reader, self.config = reader, config
        self.maps = ("image", config.modality)
        self.shapes = {"latent": tuple(info["latent_shape"]), "text": tuple(info["text_shape"])}
        self.flip_rule = dataclasses.replace(config, crop_scale=(1.0, 1.0))  # the flip draw of a full crop

    def placeholder(self, index: int, status: int, error: str = "") -> dict[str, Any]:
        latent = np.zeros(self.shapes["latent"], np.float32)
        element = {name: latent for m in self.maps for name in latent_records.moment_names(m)}
        text = np.zeros(self.shapes["text"], np.float32)
        return element | {"text": text, "key": "", "index": np.int64(index), "status": status, "error": error}

    def _arrays(self, example: latent_records.LatentExample, flip: bool) -> dict[str, np.ndarray]:
        element = {}
        for m in self.maps:
            for name, stored in zip(latent_records.moment_names(m), latent_records.moment_names(m, flip), strict=True):
                element[name] = example.arrays.get(stored)
        element["text"] = example.arrays.get("text")
        for name, array in element.items():
            expected = self.shapes["text" if name == "text" else "latent"]
            if array is None or array.shape != expected:
                got = "nothing" if array is None else array.shape
                raise records.RecordError(f"cached record has {got} for {name}, not {expected}.")
            element[name] = array.astype(np.float32)
        return element

    def __call__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, position = item
        if index < 0:
            return self.placeholder(index, _PADDING)
        _, flip = draw_crop(self.flip_rule, 1, 1, np.random.default_rng([self.config.seed, position]))
        try:
            example = latent_records.decode_latent_example(self.reader[index])
            element = self._arrays(example, flip)
        except records.RecordError as error:
            return self.placeholder(index, _CORRUPT, str(error))
        return element | {"key": example.key, "index": np.int64(index), "status": _OK, "error": ""}


class LatentLoader(Loader):
    """The data loader over a latent cache (``data/latents.py``, format in ``data/latent_records.py``): the
    same positions, shuffling, process slots, corrupt-record counting and iterator state as :class:`Loader`,
    but its elements are already encoded. Batches: ``image_mean``, ``image_logvar``, ``{modality}_mean``,
    ``{modality}_logvar`` (B, h, w, c) and ``text`` (B, L, D), float32 whatever the storage dtype, with
    ``key``, ``index`` and ``valid``; ``uncond`` holds the cache's empty-prompt embedding (1, L, D).

    The crop is the one the cache was made with (the held-out crop), so ``crop_scale`` is not used. With
    ``flip`` an example takes the flipped copy when the pixel loader's rule (:func:`draw_crop`, from the
    same generator seeded by ``(seed, position)``) flips a full-size crop: on square records the cached and
    the pixel loader with ``crop_scale=(1, 1)`` flip the same examples. ``tokenizer`` is not used.
    """

    def _make_load(self, reader: records.RecordReader):
        self.info, self.uncond = latent_records.read_cache_files(reader.paths)
        c, info, where = self.config, self.info, os.path.dirname(reader.paths[0])
        if info["resolution"] != c.resolution:
            raise ValueError(f"the latent cache {where} is at resolution {info['resolution']}, not {c.resolution}.")
        if c.modality not in info["maps"]:
            raise ValueError(f"the latent cache {where} has no {c.modality} maps (it has {info['maps']}).")
        if c.flip and c.training and not info["flip"]:
            raise ValueError(
                f"the latent cache {where} has no flipped copies: remake it with --flip, or train with flip off."
            )
        return _LoadLatents(reader, c, info)

    def _collate(self, elements: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {name: np.stack([element[name] for element in elements]) for name in elements[0]}


def make_global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assemble every host's numeric batch arrays into global ``jax.Array``s laid out by ``sharding``.

    The leading (batch) axis is concatenated across processes. String fields (``key``, ``caption``)
    stay on the host and are left out.
    """
    return {
        name: jax.make_array_from_process_local_data(sharding, value)
        for name, value in batch.items()
        if value.dtype.kind in "biuf"
    }
