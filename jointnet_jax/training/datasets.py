"""The run's training and held-out data: record shards from ``data.paths`` / ``data.eval_paths``, or the
embedded synthetic world rendered once into the workdir (held-out scenes are the indices after the training
ones, so none is seen in training). Only process 0 renders; the others wait at a host barrier."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jointnet_jax import sharding as sh
from jointnet_jax.data import records, synthetic
from jointnet_jax.data.loader import LoaderConfig


def _synthetic(config, out: Path, indices: range) -> str:
    """Synthetic-world examples ``indices`` rendered once into ``out`` (process 0 writes)."""
    if jax.process_index() == 0 and not (out.is_dir() and records.list_shards(out, "synthetic")):
        examples = (synthetic.make_example(i, config.data.synthetic_size, seed=config.data.seed) for i in indices)
        records.write_shards(examples, out, "synthetic", num_shards=config.data.synthetic_shards)
    sh.sync_processes(f"synthetic_data_{out.name}")
    return str(out)


def training_data(config, workdir: Path) -> str:
    """``data.paths``, or the embedded synthetic world rendered once into ``workdir/data``."""
    if config.data.paths:
        return config.data.paths
    return _synthetic(config, workdir / "data", range(config.data.synthetic_num))


def eval_data(config, workdir: Path) -> str:
    """``data.eval_paths``, or held-out synthetic scenes (the indices after the training ones)."""
    if config.data.eval_paths:
        return config.data.eval_paths
    n = config.data.synthetic_num
    return _synthetic(config, workdir / "eval_data", range(n, n + config.data.synthetic_eval_num))


def _check_latent_paths(config) -> None:
    """A latent cache is made from labelled records by ``jointnet-cache-latents``; there is no synthetic one."""
    if not config.data.paths:
        raise ValueError("data.latents needs data.paths: the latent cache folder(s) written by jointnet-cache-latents")
    if config.eval_every and not config.data.eval_paths:
        raise ValueError("data.latents with eval_every needs data.eval_paths: a latent cache of held-out records")


def loader_configs(config, workdir: Path, tokenizer) -> tuple[LoaderConfig, LoaderConfig | None]:
    """(training, held-out) loader settings of this process; no held-out set without ``eval_every``. With
    ``data.latents`` the paths are latent caches (read by ``loader.LatentLoader``)."""
    if config.data.get("latents", False):
        _check_latent_paths(config)
    train = LoaderConfig(
        paths=training_data(config, workdir),
        resolution=config.data.resolution,
        batch_size=config.batch_size // jax.process_count(),
        seed=config.data.seed,
        modality=config.modality,
        tokenizer=tokenizer,
        worker_count=config.data.worker_count,
        crop_scale=tuple(config.data.crop_scale),
        flip=config.data.flip,
    )
    if not config.eval_every:
        return train, None
    held_out = dataclasses.replace(
        train, paths=eval_data(config, workdir), training=False, worker_count=0, crop_scale=(1.0, 1.0), flip=False
    )
    return train, held_out
