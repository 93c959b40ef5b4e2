"""Encode labelled record shards once into a latent cache for training: an Apache Beam job, the sibling of the
labelling job ``label.py``.

Example::

    jointnet-cache-latents --input data/labelled --out data/latents --model /data/stable-diffusion-2-1-base \\
        --resolution 512 [--flip] [--normal] [--dtype bf16] [--runner DataflowRunner --project P ...]

Our flags are parsed with argparse; every other argument goes to Beam's ``PipelineOptions`` (DirectRunner by
default). ``--input`` takes record shards, folders of shards or globs (the output of ``jointnet-label``);
``--model`` a base model folder or Hub id with ``vae/``, ``text_encoder/`` and ``tokenizer/``, resolved and
loaded the way training loads ``config.base`` (``models.hub``, ``models.loading``). The pixel-space codec
(``vae: none``) is refused: it encodes nothing, so there is nothing to cache.

Per record: the image and the dense maps (depth; normals with ``--normal``) at the data loader's held-out
crop (``loader.held_out_box``: the centred largest square) resized to ``--resolution`` exactly as the loader
does (``loader.crop_map``, ``loader.unit_range``), then the VAE posterior's mean and log-variance of each
map, and with ``--flip`` those of the horizontally flipped maps too; the caption's token ids (as the loader
makes them) through the text encoder (its last hidden state). Stored as ``--dtype`` (bf16, fp16 or fp32);
the record layout and the ``latents.json`` / ``uncond.npy`` files beside the shards are described in
``latent_records.py``. The VAE and text encoder run in fp32; the launching process loads them once too, to
write ``latents.json`` and ``uncond.npy`` (atomically, before the shards).

Pipeline (as ``label.py``; shard plumbing in ``shards.py``, the Beam job in ``jobs.py``): one work item per input
shard, planned at construction, its output ``{prefix}-{i:05d}-of-{n:05d}.array_record``; items whose shard exists
are skipped (resume: rerun the same command; a half-written temporary folder is not a shard); the rest are spread
over workers and ``cache_shard`` encodes each one in batches of ``--batch-size`` into a temporary folder, renamed into
place when complete. A shard that cannot be opened is one warning naming it and counts ``shards_failed``
(no output, so a rerun tries it again); a record that does not decode (or lacks a map asked for) is one
warning and counts ``failed``. Beam counters (namespace ``latents``): ``read`` = ``failed`` + ``written``,
``shards_written``, ``shards_failed``; printed with ``shards`` / ``shards_skipped`` as one JSON line.

Only ``run`` (the command) imports Beam: ``LatentEncoder``, ``cache_shard`` and ``write_in_process`` (the same
shards, encoded one after another in this process) work on a machine without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np

from jointnet_jax.data import latent_records, loader, records, shards

NAMESPACE = "latents"
REPORTED = ("read", "failed", "written", "shards_written", "shards_failed")
MODEL_SUBFOLDERS = ("vae", "text_encoder", "tokenizer")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Everything a worker needs besides its work item (pickled into the DoFn)."""

    model: str  # a resolved local folder
    resolution: int = 512
    batch_size: int = 8
    dtype: str = "bf16"
    flip: bool = False
    normal: bool = False
    max_length: int = 77
    prefix: str = "latents"

    @property
    def maps(self) -> tuple[str, ...]:
        return ("image", "depth", "normal") if self.normal else ("image", "depth")


@dataclasses.dataclass
class WorkItem:
    """One input shard and the path of its output shard."""

    index: int
    num_shards: int
    path: str
    out: str


def plan_work_items(inputs: list[str], out: str, prefix: str) -> list[WorkItem]:
    """One work item per input shard (files, folders or globs), in order; a missing input is an error."""
    for path in inputs:
        if not any(c in path for c in "*?[") and not os.path.exists(path):
            raise FileNotFoundError(f"no record shard or folder {path!r}.")
    paths = records.expand_paths(inputs)
    return [
        WorkItem(i, len(paths), path, os.path.join(out, records.shard_name(prefix, i, len(paths))))
        for i, path in enumerate(paths)
    ]


class LatentEncoder:
    """The VAE, text encoder and tokenizer of a model folder, with the compiled encodings (one compile each:
    short batches are padded to ``batch_size``)."""

    def __init__(self, config: CacheConfig):
        import jax.numpy as jnp
        from flax import nnx

        from jointnet_jax.models import functional
        from jointnet_jax.models.loading import load_text_encoder, load_tokenizer, load_vae

        self.config = config
        self.vae = load_vae(os.path.join(config.model, "vae"))
        self.text_encoder = load_text_encoder(os.path.join(config.model, "text_encoder"))
        self.tokenizer = load_tokenizer(os.path.join(config.model, "tokenizer"))
        vae_def, vae_state = nnx.split(self.vae)
        text_def, text_state = nnx.split(self.text_encoder)

        def moments(state, x):
            posterior = nnx.merge(vae_def, state).encode(x)
            return posterior.mean, posterior.logvar

        moments = functional.jit(moments)
        text = functional.jit(lambda state, ids: nnx.merge(text_def, state)(ids.astype(jnp.int32)))
        self._moments = lambda x: moments(vae_state, x)  # weights as arguments, not constants of the program
        self._text = lambda ids: text(text_state, ids)

    def _padded(self, fn, batch: np.ndarray):
        n, size = len(batch), self.config.batch_size
        if n < size:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        return fn(batch), n

    def moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean, logvar) float32 of (B, H, W, 3) maps in [-1, 1]."""
        (mean, logvar), n = self._padded(self._moments, pixels)
        return np.asarray(mean)[:n], np.asarray(logvar)[:n]

    def text(self, captions: list[str]) -> np.ndarray:
        """Last hidden states (B, L, D) float32 of captions tokenised as the data loader does."""
        ids = np.stack([loader.token_ids(self.tokenizer, c, self.config.max_length) for c in captions])
        out, n = self._padded(self._text, ids)
        return np.asarray(out, np.float32)[:n]

    def uncond(self) -> np.ndarray:
        """The empty prompt's embedding (1, L, D), tokenised as training's ``Models.uncond_embedding``."""
        from jointnet_jax.models.clip_text import tokenize

        return np.asarray(self.text_encoder(np.asarray(tokenize(self.tokenizer, [""]), np.int32)), np.float32)

    def info(self) -> dict:
        size = self.config.resolution // self.vae.scale_factor
        c = self.config
        return {
            "format": latent_records.FORMAT,
            "resolution": c.resolution,
            "dtype": c.dtype,
            "flip": c.flip,
            "maps": list(c.maps),
            "latent_shape": [size, size, self.vae.config.latent_channels],
            "text_shape": list(self.uncond().shape[1:]),
            "scaling_factor": float(self.vae.scaling_factor),
            "max_length": c.max_length,
            "model": c.model,
        }

    def encode(self, examples: list[records.Example]) -> list[latent_records.LatentExample]:
        """Cached records of a batch of decoded examples."""
        c, arrays = self.config, [{} for _ in examples]
        for name in c.maps:
            for flip in (False, True)[: 1 + c.flip]:
                maps = [_crop(getattr(example, name), name, flip, c.resolution) for example in examples]
                mean, logvar = self.moments(loader.unit_range(np.stack(maps), name))
                for out, m, v in zip(arrays, mean, logvar, strict=True):
                    out.update(zip(latent_records.moment_names(name, flip), (m, v), strict=True))
        for out, text in zip(arrays, self.text([e.caption for e in examples]), strict=True):
            out["text"] = text
        return [latent_records.LatentExample(e.key, e.caption, a) for e, a in zip(examples, arrays, strict=True)]


def _crop(array: np.ndarray, name: str, flip: bool, size: int) -> np.ndarray:
    box = loader.held_out_box(*array.shape[:2])
    return loader.crop_map(array, box, flip, size, normal=name == "normal")


def _decoded(reader: records.RecordReader, maps: tuple[str, ...], count) -> Iterator[records.Example]:
    """The shard's records decoded, counting each read and the ones that fail (one warning each)."""
    for index in range(len(reader)):
        count("read")
        try:
            example = records.decode_example(reader[index])
            missing = [name for name in maps if getattr(example, name) is None]
            if missing:
                raise records.RecordError(f"record has no {missing[0]} map.")
        except records.RecordError as error:
            log.warning("skipping record %d of %s: %s", index, reader.paths[0], error)
            count("failed")
            continue
        yield example


def _batches(iterator: Iterator, size: int) -> Iterator[list]:
    batch = []
    for element in iterator:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cache_shard(item: WorkItem, encoder: LatentEncoder, config: CacheConfig, count) -> None:
    """Encode every record of the item's shard and publish its output shard atomically."""
    try:
        reader = records.RecordReader([item.path], decode=False)
    except records.RecordError as error:
        log.warning("skipping shard: %s", error)
        count("shards_failed")
        return
    with shards.published_shard(item.out, config.prefix) as writer:
        for batch in _batches(_decoded(reader, config.maps, count), config.batch_size):
            for example in encoder.encode(batch):
                writer.write(latent_records.encode_latent_example(example, config.dtype))
    count("written", writer.shard_lengths[0])
    count("shards_written")


def shard_job():
    """The latent cache as a Beam shard job (``jobs.py``): the encoders loaded once per worker, a shard each."""
    from jointnet_jax.data import jobs

    return jobs.ShardJob("CacheShards", NAMESPACE, LatentEncoder, cache_shard, ("read", "written", "failed"))


def write_in_process(items: list[WorkItem], encoder: LatentEncoder, config: CacheConfig) -> dict[str, int]:
    """Encode the items' shards one after another in this process, as the Beam job's workers do (same shards,
    same counters), for a machine without Beam or a run too small to distribute."""
    count, counts = shards.tally()
    for item in items:
        cache_shard(item, encoder, config, count)
    return dict.fromkeys(REPORTED, 0) | dict(counts)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the remaining arguments for Beam's ``PipelineOptions``."""
    parser = argparse.ArgumentParser(
        prog="jointnet-cache-latents",
        description="Encode labelled record shards once (VAE posteriors, text embeddings) for training.",
        epilog="Other arguments are Beam pipeline options, e.g. --runner DataflowRunner --project P.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="record shards, folders or globs (jointnet-label)")
    parser.add_argument("--out", required=True, help="output folder (shared by all workers)")
    parser.add_argument("--model", required=True, help="base model folder or Hub id (vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--prefix", default="latents", help="shard file-name prefix")
    parser.add_argument("--resolution", type=shards.positive, default=512, help="square training size")
    parser.add_argument("--batch-size", type=shards.positive, default=8)
    parser.add_argument("--dtype", choices=tuple(latent_records.DTYPES), default="bf16", help="storage dtype")
    parser.add_argument("--flip", action="store_true", help="also store the horizontally flipped copy")
    parser.add_argument("--normal", action="store_true", help="also cache the normal maps (records must have them)")
    parser.add_argument("--max-length", type=shards.positive, default=77, help="token ids per caption")
    return parser.parse_known_args(argv)


def _resolve_model(model: str) -> str:
    from jointnet_jax.models import hub

    path = hub.resolve(model, what="model folder (--model)", subfolders=MODEL_SUBFOLDERS)
    if not (path / "vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"{model} has no vae/: jointnet-cache-latents caches VAE posteriors, and pixel-space training "
            "(vae: none) encodes nothing, so it needs no cache."
        )
    return str(path)


def run(argv: list[str] | None = None) -> dict[str, int]:
    """Plan, skip finished shards, write the cache's info and empty-prompt files, run the job and return the
    final counts."""
    args, beam_args = parse_args(argv)
    items = plan_work_items(args.input, args.out, args.prefix)
    todo = shards.pending_work_items(items, args.out, args.prefix)
    log.info("%d shards planned, %d already written, %d to encode", len(items), len(items) - len(todo), len(todo))
    counts = dict.fromkeys(REPORTED, 0) | {"shards": len(items), "shards_skipped": len(items) - len(todo)}
    config = CacheConfig(
        _resolve_model(args.model),
        args.resolution,
        args.batch_size,
        args.dtype,
        args.flip,
        args.normal,
        args.max_length,
        args.prefix,
    )
    encoder = LatentEncoder(config)
    os.makedirs(args.out, exist_ok=True)
    latent_records.write_cache_files(args.out, {**encoder.info(), "model": args.model}, encoder.uncond())
    if todo:
        from jointnet_jax.data import jobs  # Beam

        counts |= jobs.run_shard_job(beam_args, todo, shard_job(), config)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    counts = run(argv)
    print(json.dumps(counts, sort_keys=True), flush=True)
    return counts


INPUT_ERRORS = (OSError, ValueError)  # a missing folder, an unreadable input, a cache of other settings


def cli(argv: list[str] | None = None) -> int:
    """The ``jointnet-cache-latents`` console script: bad input is one sentence on stderr and exit status 1."""
    try:
        main(argv)
    except INPUT_ERRORS as error:
        print(f"jointnet-cache-latents: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
