"""The Beam side of the data jobs (the labelling job ``label.py`` and the latent-cache job ``latents.py``): a
job is a ``ShardJob``, data saying how a worker loads its model once and writes one shard; ``ShardFn`` is the
one ``DoFn`` that runs any of them, ``build_job`` the transforms (work items, reshuffled over workers, one
shard each) and ``run_shard_job`` the run on Beam's ``PipelineOptions``, returning the job's counters. Shard
planning, resume and atomic writes need no Beam and live in ``shards.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from jointnet_jax.data import shards

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """A shard job as data. ``load(config)`` runs once per worker (the model it writes with);
    ``write(item, loaded, config, count)`` writes the item's shard (``shards.published_shard``) and counts
    into ``count``; ``logged``: the counters named in the per-shard log line, ``read`` first. The functions
    are module-level, so the DoFn pickles."""

    label: str  # the transform's name, e.g. "LabelShards"
    namespace: str  # of the Beam counters
    load: Callable
    write: Callable
    logged: tuple[str, ...]


def counter(namespace: str) -> tuple[shards.Count, collections.Counter]:
    """``shards.tally`` whose ``count(name, value=1)`` also adds to the Beam counter ``namespace/name``."""
    add, counts = shards.tally()

    def count(name: str, value: int = 1) -> None:
        add(name, value)
        Metrics.counter(namespace, name).inc(value)

    return count, counts


class ShardFn(beam.DoFn):
    """Work item -> written shard path, for any ``ShardJob``; its model is loaded once per worker in
    ``setup``, and each shard ends in one log line with its counts and rate."""

    def __init__(self, job: ShardJob, config):
        self.job, self.config, self.loaded = job, config, None

    def setup(self):
        self.loaded = self.job.load(self.config)

    def process(self, item):
        start = time.perf_counter()
        count, counts = counter(self.job.namespace)
        self.job.write(item, self.loaded, self.config, count)
        seconds = time.perf_counter() - start
        tallies = ", ".join(f"{counts[name]} {name}" for name in self.job.logged)
        rate = counts[self.job.logged[0]] / max(seconds, 1e-9)
        log.info(
            "shard %d/%d done: %s (%s; %.1f s, %.2f records/s)",
            item.index + 1,
            item.num_shards,
            item.out,
            tallies,
            seconds,
            rate,
        )
        yield item.out


def build_job(pipeline: beam.Pipeline, items: list, job: ShardJob, config) -> beam.PCollection:
    """The job's transforms for ``items`` on a Beam ``pipeline``; returns the written shard paths."""
    return (
        pipeline
        | "WorkItems" >> beam.Create(items)
        | "Distribute" >> beam.Reshuffle()
        | job.label >> beam.ParDo(ShardFn(job, config))
    )


def metric_counts(result, namespace: str) -> dict[str, int]:
    """A job's counters from a finished ``PipelineResult`` (committed where the runner reports them)."""
    counts = collections.Counter()
    for found in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        counts[found.key.metric.name] += found.committed if found.committed is not None else found.attempted
    return dict(counts)


def run_shard_job(beam_args: list[str], items: list, job: ShardJob, config) -> dict[str, int]:
    """Run ``job`` over ``items`` on Beam's options to the end and return its counters."""
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_job(pipeline, items, job, config)
    result = pipeline.run()
    result.wait_until_finish()
    return metric_counts(result, job.namespace)
