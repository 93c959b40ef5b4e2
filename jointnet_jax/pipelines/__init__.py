"""Sampling pipelines: one compiled denoising loop, tasks as data."""

from jointnet_jax.pipelines.pipeline import Pipeline, SampleSettings
from jointnet_jax.pipelines.tasks import TASKS

__all__ = ["TASKS", "Pipeline", "SampleSettings"]
