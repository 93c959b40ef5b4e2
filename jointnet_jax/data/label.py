"""Label images with monocular depth (and optional normals) into record shards: an Apache Beam job.

Example::

    python -m jointnet_jax.data.label --input 'photos/' --input-format folder --out data/labelled \\
        --depth-model Intel/dpt-hybrid-midas [--runner DataflowRunner --project P --region R ...]

Our flags are parsed with argparse; every other argument is handed to Beam's ``PipelineOptions``, so the same
command runs on the DirectRunner (default) or Dataflow/Flink/Spark. Workers need this package installed (e.g.
``--setup_file`` or a custom container) and ``--out`` must be a POSIX path all workers share.

Inputs (``--input``: paths or globs; ``--input-format``):

* ``folder``: every image (jpg/jpeg/png/webp/bmp/tif) under the folders, recursively in sorted order; the
  caption is the sidecar ``name.txt`` next to ``name.jpg`` (empty when absent). There are no scores.
* ``list``: ``.jsonl`` / ``.csv`` / ``.parquet`` files, one row per image: ``path`` (relative to the list
  file), optional ``key`` (default: the ``path`` value) and ``caption`` (or COYO's ``text``), and COYO-style
  metadata ``width``, ``height``, ``watermark_score``, ``aesthetic_score`` (or ``aesthetic_score_laion_v2``),
  ``clip_similarity`` (or ``clip_similarity_vitl14`` / ``_vitb32``).
* ``wds``: webdataset tars (or folders of ``*.tar``): members ``key.jpg``/``png``/``webp`` + ``key.txt``
  (caption) and/or ``key.json`` (caption and metadata as for lists). Each tar becomes one output shard, so
  ``--examples-per-shard`` does not apply; a tar that breaks off counts one failure and keeps what was read.

Record keys: ``folder``, the path under the folder with its extension (``sub/cat.jpg``; with several folders,
under their common parent); ``list``, the row's ``key``, else its ``path``; ``wds``, ``<tar name>/<sample
key>``. Two inputs with one key are refused before any work. Images are read by ``io_utils.decode_image``
(upright by EXIF; 16-bit images scaled by their range, 65535 -> 255, never clipped).

Filters (defaults from the paper's COYO recipe): shorter side >= ``--min-side`` (512; the decoded size is
checked too, metadata may lie), watermark score < ``--max-watermark`` (0.5), aesthetic score >
``--min-aesthetic`` (5.0), optionally CLIP similarity >= ``--min-clip-similarity``. A rule set to ``none`` is
off; ``--no-filter`` turns all off. A score that is missing passes its rule unless ``--drop-missing-metadata``.
Metadata rules run before the image is read, so a listed-but-corrupt image that fails them counts as filtered.

Pipeline (its shard plumbing in ``shards.py`` and its Beam job in ``jobs.py``, both shared with the latent-cache
job ``latents.py``): the inputs are listed at construction into work items, one per output shard
``{prefix}-{i:05d}-of-{n:05d}.array_record``; items whose shard already exists are skipped (resume: rerun
the same command). The rest are spread over workers (``Reshuffle``) and ``jobs.ShardFn`` runs ``label_shard`` on
each one streaming: read + decode + filter -> batches of ``--batch-size`` through the model (loaded once per
worker in ``setup``, on GPU when available) -> ``records.ShardWriter`` into a temporary folder, renamed into
place when complete. Labelling a whole shard in one DoFn (rather than per-image elements regrouped by a
GroupByKey) keeps memory at one batch, shuffles no image bytes and makes the shard the unit of retry and
resume. Unreadable images are counted and skipped. Beam counters (namespace ``label``): ``read`` =
``filtered`` + ``failed`` + ``written``, ``filtered_<rule>`` per rule, ``shards_written``; the command
prints them with ``shards`` / ``shards_skipped`` as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import itertools
import json
import logging
import math
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from jointnet_jax.data import jobs, records, shards
from jointnet_jax.io_utils import decode_rgb8

NAMESPACE = "label"
REPORTED = ("read", "filtered", "failed", "written")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
LIST_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Metadata field -> accepted column names, first present wins (COYO-700M spells some differently).
METADATA_COLUMNS = {
    "caption": ("caption", "text"),
    "width": ("width",),
    "height": ("height",),
    "watermark": ("watermark_score", "watermark"),
    "aesthetic": ("aesthetic_score", "aesthetic_score_laion_v2", "aesthetic"),
    "clip_similarity": ("clip_similarity", "clip_similarity_vitl14", "clip_similarity_vitb32"),
}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

log = logging.getLogger(__name__)
Count = shards.Count


@dataclasses.dataclass
class Source:
    """One listed input; ``caption`` None means "read the sidecar .txt", ``meta`` holds the known scores."""

    path: str
    key: str
    caption: str | None = None
    meta: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WorkItem:
    """The inputs of one output shard: listed ``sources`` or one webdataset ``tar``."""

    index: int
    num_shards: int
    out: str
    sources: list[Source] = dataclasses.field(default_factory=list)
    tar: str | None = None


@dataclasses.dataclass(frozen=True)
class FilterRules:
    """Metadata thresholds; ``None`` turns a rule off (see the module docstring for the semantics)."""

    min_side: int | None = 512
    max_watermark: float | None = 0.5
    min_aesthetic: float | None = 5.0
    min_clip_similarity: float | None = None
    drop_missing: bool = False

    def reject_metadata(self, meta: dict[str, float]) -> str | None:
        """Name of the first rule the listed metadata fails, or None to keep the input."""
        side = min(meta["width"], meta["height"]) if "width" in meta and "height" in meta else None
        rules = (
            ("size", side, self.min_side, lambda value, limit: value >= limit),
            ("watermark", meta.get("watermark"), self.max_watermark, lambda value, limit: value < limit),
            ("aesthetic", meta.get("aesthetic"), self.min_aesthetic, lambda value, limit: value > limit),
            (
                "clip_similarity",
                meta.get("clip_similarity"),
                self.min_clip_similarity,
                lambda value, limit: value >= limit,
            ),
        )
        for name, value, limit, passes in rules:
            if limit is None:
                continue
            if value is None:
                if self.drop_missing and name != "size":  # the size is checked after decoding anyway
                    return "missing_metadata"
            elif not passes(value, limit):
                return name
        return None

    def reject_size(self, height: int, width: int) -> str | None:
        return "size" if self.min_side is not None and min(height, width) < self.min_side else None


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Everything a worker needs besides its work item (pickled into the DoFn)."""

    depth_model: str
    normal_model: str | None = None
    batch_size: int = 8
    resolution: int | None = None
    rules: FilterRules = FilterRules()
    estimate_size: int | None = None
    percentile: float = 0.0
    image_format: str = "png"
    prefix: str = "labelled"


@dataclasses.dataclass
class Sample:
    key: str
    caption: str
    image: np.ndarray
    source: str
    meta: dict[str, float]


def _number(value) -> float | None:
    """A metadata value as float; None for absent, empty, NaN or unparsable values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _first(row: dict, field: str):
    return next((row[name] for name in METADATA_COLUMNS[field] if row.get(name) not in (None, "")), None)


def metadata(row: dict) -> dict[str, float]:
    """The numeric metadata of a list row / webdataset json under our field names, missing ones left out."""
    values = {field: _number(_first(row, field)) for field in METADATA_COLUMNS if field != "caption"}
    return {field: value for field, value in values.items() if value is not None}


def _caption(row: dict) -> str:
    caption = _first(row, "caption")
    return "" if caption is None or (isinstance(caption, float) and math.isnan(caption)) else str(caption)


def _expand(patterns: Iterable[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [path for path in matches if not os.path.exists(path)]
        if not matches or missing:
            raise FileNotFoundError(f"no input matches {pattern!r}.")
        paths += matches
    return paths


def list_folder(roots: Iterable[str]) -> list[Source]:
    """Every image under ``roots`` in sorted order (stable shards across reruns). The key is the file's path
    relative to the root, extension included (``sub/cat.jpg``), so ``cat.png`` and ``cat.jpg`` differ; with
    several roots it is relative to their common parent (``a/cat.jpg``, ``b/cat.jpg``). A file reached
    through two roots is listed once."""
    roots = list(roots)
    for root in roots:
        if not os.path.isdir(root):
            raise NotADirectoryError(f"--input-format folder needs folders, got {root!r}.")
    base = roots[0] if len(roots) == 1 else os.path.commonpath([os.path.abspath(r) for r in roots])
    sources, seen = [], set()
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders.sort()
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith(".") or name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                    continue
                if os.path.realpath(path) not in seen:
                    seen.add(os.path.realpath(path))
                    key = os.path.relpath(path if len(roots) == 1 else os.path.abspath(path), base)
                    sources.append(Source(path, key.replace(os.sep, "/")))
    return sources


def _rows(path: str) -> Iterator[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet  # only list inputs need it

        yield from pyarrow.parquet.read_table(path).to_pylist()
    elif path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as file:
            yield from csv.DictReader(file)
    else:
        with open(path, encoding="utf-8") as file:
            yield from (json.loads(line) for line in file if line.strip())


def list_rows(paths: Iterable[str]) -> list[Source]:
    """The rows of jsonl/csv/parquet list files; relative ``path`` values are relative to the list file."""
    sources = []
    for list_path in paths:
        if not list_path.lower().endswith(LIST_SUFFIXES):
            raise ValueError(f"list files must be one of {LIST_SUFFIXES}, got {list_path!r}.")
        base = os.path.dirname(os.path.abspath(list_path))
        for number, row in enumerate(_rows(list_path)):
            if not row.get("path"):
                raise ValueError(f"{list_path} row {number} has no 'path'.")
            path = os.path.join(base, os.path.expanduser(str(row["path"])))
            key = str(row.get("key") or row["path"])  # the listed path, extension included, by default
            sources.append(Source(path, key, _caption(row), metadata(row)))
    return sources


def list_tars(paths: Iterable[str]) -> list[str]:
    tars = []
    for path in paths:
        tars += sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))) if os.path.isdir(path) else [path]
    return tars


def _check_unique_keys(sources: list[Source]) -> None:
    """Record keys name examples (and their source) downstream: two inputs must never share one."""
    first: dict[str, str] = {}
    for source in sources:
        if source.key in first:
            raise ValueError(
                f"inputs {first[source.key]} and {source.path} would both get the record key {source.key!r}; "
                "give them distinct 'key' values."
            )
        first[source.key] = source.path


def plan_work_items(inputs: list[str], input_format: str, out: str, prefix: str, examples_per_shard: int):
    """Split the inputs into shard-sized work items with their final shard paths (deterministic order)."""
    paths = _expand(inputs)
    if input_format == "wds":
        groups = [{"tar": tar} for tar in list_tars(paths)]
    else:
        sources = list_folder(paths) if input_format == "folder" else list_rows(paths)
        _check_unique_keys(sources)
        groups = [
            {"sources": sources[start : start + examples_per_shard]}
            for start in range(0, len(sources), examples_per_shard)
        ]
    num_shards = len(groups)
    return [
        WorkItem(index, num_shards, os.path.join(out, records.shard_name(prefix, index, num_shards)), **group)
        for index, group in enumerate(groups)
    ]


def _failing(error: Exception) -> Callable[[], bytes]:
    def read() -> bytes:
        raise error

    return read


def _read_file(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as file:
            return file.read()

    return read


def _wds_sample(tar: str, key: str, members: dict[str, bytes]) -> tuple[Source, Callable[[], bytes]]:
    name = f"{os.path.splitext(os.path.basename(tar))[0]}/{key}"
    source = Source(f"{tar}:{key}", name, "")
    try:
        row = json.loads(members["json"]) if "json" in members else {}
        source.caption = members["txt"].decode("utf-8") if "txt" in members else _caption(row)
        source.meta = metadata(row)
    except ValueError as error:
        return source, _failing(ValueError(f"bad caption/json: {error}"))
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    return source, _failing(ValueError("no image member")) if image is None else lambda: image


def _tar_candidates(tar: str) -> Iterator[tuple[Source, Callable[[], bytes]]]:
    """Samples of a webdataset tar, streamed (members of one key are consecutive in webdataset)."""
    key, members = None, {}
    try:
        with tarfile.open(tar, "r|*") as stream:
            for member in stream:
                folder, name = posixpath.split(member.name)
                if not member.isfile() or name.startswith("."):
                    continue
                stem, _, extension = name.partition(".")
                if posixpath.join(folder, stem) != key and members:
                    yield _wds_sample(tar, key, members)
                    members = {}
                key = posixpath.join(folder, stem)
                members[extension.lower()] = stream.extractfile(member).read()
        if members:
            yield _wds_sample(tar, key, members)
    except (tarfile.TarError, OSError, EOFError) as error:
        yield Source(tar, f"{os.path.basename(tar)}:error", ""), _failing(ValueError(f"unreadable tar: {error}"))


def _candidates(item: WorkItem) -> Iterator[tuple[Source, Callable[[], bytes]]]:
    if item.tar is not None:
        yield from _tar_candidates(item.tar)
    else:
        yield from ((source, _read_file(source.path)) for source in item.sources)


def _sidecar_caption(path: str) -> str:
    sidecar = os.path.splitext(path)[0] + ".txt"
    if not os.path.exists(sidecar):
        return ""
    with open(sidecar, encoding="utf-8") as file:
        return file.read().strip()


def iter_samples(item: WorkItem, rules: FilterRules, count: Count) -> Iterator[Sample]:
    """Read, decode and filter the inputs of ``item``, counting each as read and filtered / failed."""
    for source, read in _candidates(item):
        count("read")
        reason = rules.reject_metadata(source.meta)
        if reason is None:
            try:
                image = decode_rgb8(read(), source.path)
                caption = _sidecar_caption(source.path) if source.caption is None else source.caption
            except DECODE_ERRORS as error:
                log.warning("skipping unreadable input %s: %s", source.path, error)
                count("failed")
                continue
            reason = rules.reject_size(*image.shape[:2])
        if reason is not None:
            count("filtered")
            count(f"filtered_{reason}")
            continue
        yield Sample(source.key, caption, image, source.path, source.meta)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (aspect kept, Lanczos) so the shorter side is ``size``; training crops later."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.LANCZOS))


def _batches(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def label_shard(item: WorkItem, estimator, config: LabelConfig, count: Count) -> None:
    """Label every kept input of ``item`` and publish its shard atomically (``ShardWriter`` then rename).

    The image is resized to ``config.resolution`` first, so the depth is estimated on (and aligned with)
    exactly the stored pixels.
    """
    with shards.published_shard(item.out, config.prefix, config.image_format) as writer:
        for batch in _batches(iter_samples(item, config.rules, count), config.batch_size):
            if config.resolution:
                for sample in batch:
                    sample.image = resize_shorter_side(sample.image, config.resolution)
            for sample, (depth, normal) in zip(batch, estimator([s.image for s in batch]), strict=True):
                example = records.Example(
                    key=sample.key,
                    caption=sample.caption,
                    image=sample.image,
                    depth=depth,
                    normal=normal,
                    watermark=sample.meta.get("watermark"),
                    aesthetic=sample.meta.get("aesthetic"),
                    clip_similarity=sample.meta.get("clip_similarity"),
                    source=sample.source,
                )
                writer.write(example)
    count("written", writer.shard_lengths[0])
    count("shards_written")


def load_estimator(config: LabelConfig):
    """The job's model, loaded once per worker (torch and transformers are imported only there)."""
    from jointnet_jax.data.depth_estimator import DepthEstimator

    return DepthEstimator.from_pretrained(
        config.depth_model, config.normal_model, estimate_size=config.estimate_size, percentile=config.percentile
    )


JOB = jobs.ShardJob("LabelShards", NAMESPACE, load_estimator, label_shard, ("read", "written", "filtered", "failed"))


def _optional(kind: type) -> Callable[[str], float | int | None]:
    return lambda text: None if text.lower() == "none" else kind(text)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the remaining arguments for Beam's ``PipelineOptions``."""
    parser = argparse.ArgumentParser(
        prog="python -m jointnet_jax.data.label",
        description="Label images with DPT depth (and normals) into record shards (Apache Beam).",
        epilog="Other arguments are Beam pipeline options, e.g. --runner DataflowRunner --project P.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="paths or globs (see --input-format)")
    parser.add_argument("--input-format", choices=("folder", "list", "wds"), required=True)
    parser.add_argument("--out", required=True, help="output folder (shared by all workers)")
    parser.add_argument("--prefix", default="labelled", help="shard file-name prefix")
    parser.add_argument("--depth-model", required=True, help="DPTForDepthEstimation folder or hub id")
    parser.add_argument("--normal-model", help="DPT folder/hub id with a 3-channel (normal) head; no normals if unset")
    parser.add_argument("--examples-per-shard", type=shards.positive, default=1000, help="inputs per shard (not wds)")
    parser.add_argument("--batch-size", type=shards.positive, default=8)
    parser.add_argument("--resolution", type=shards.positive, help="resize so the shorter side is this (default: keep)")
    parser.add_argument("--estimate-size", type=shards.positive, help="square model input (default: processor's size)")
    parser.add_argument("--percentile", type=float, default=0.0, help="normalise depth between p / 100-p pct")
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="stored image encoding")
    parser.add_argument("--min-side", type=_optional(int), default=512, help="or 'none'")
    parser.add_argument("--max-watermark", type=_optional(float), default=0.5, help="or 'none'")
    parser.add_argument("--min-aesthetic", type=_optional(float), default=5.0, help="or 'none'")
    parser.add_argument("--min-clip-similarity", type=_optional(float), default=None, help="or 'none'")
    parser.add_argument("--drop-missing-metadata", action="store_true", help="a missing score fails its rule")
    parser.add_argument("--no-filter", action="store_true", help="keep every readable image")
    return parser.parse_known_args(argv)


def run(argv: list[str] | None = None) -> dict[str, int]:
    """Plan, skip finished shards, run the labelling job and return the final counts."""
    args, beam_args = parse_args(argv)
    thresholds = (args.min_side, args.max_watermark, args.min_aesthetic, args.min_clip_similarity)
    rules = FilterRules(*((None,) * 4 if args.no_filter else thresholds), drop_missing=args.drop_missing_metadata)
    config = LabelConfig(
        depth_model=args.depth_model,
        normal_model=args.normal_model,
        batch_size=args.batch_size,
        resolution=args.resolution,
        rules=rules,
        estimate_size=args.estimate_size,
        percentile=args.percentile,
        image_format=args.image_format,
        prefix=args.prefix,
    )
    items = plan_work_items(args.input, args.input_format, args.out, args.prefix, args.examples_per_shard)
    todo = shards.pending_work_items(items, args.out, args.prefix)
    log.info("%d shards planned, %d already written, %d to label", len(items), len(items) - len(todo), len(todo))
    counts = dict.fromkeys(REPORTED, 0) | {"shards": len(items), "shards_skipped": len(items) - len(todo)}
    if todo:
        os.makedirs(args.out, exist_ok=True)
        counts |= jobs.run_shard_job(beam_args, todo, JOB, config)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    counts = run(argv)
    print(json.dumps(counts, sort_keys=True), flush=True)
    return counts


def cli() -> int:
    """The ``jointnet-label`` console script (``main`` returns the counts, which are not an exit status)."""
    main()
    return 0


if __name__ == "__main__":
    cli()
