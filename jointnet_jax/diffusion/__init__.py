"""Noise schedules, samplers and guidance as pure JAX functions for a single compiled sampling loop.

``SAMPLERS`` is the one table of sampler names (canonical name -> accepted aliases); ``make_sampler`` and
every layer above take any of ``SAMPLER_NAMES``.
"""

from jointnet_jax.diffusion.guidance import cfg, rescale_guidance
from jointnet_jax.diffusion.samplers import Sampler, make_sampler
from jointnet_jax.diffusion.schedule import (
    SAMPLER_KINDS,
    SAMPLER_NAMES,
    SAMPLERS,
    NoiseSchedule,
    add_noise,
    load_schedule,
    sampler_name,
    strength_start_index,
    timesteps,
    training_target,
    velocity,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_KINDS",
    "SAMPLER_NAMES",
    "NoiseSchedule",
    "Sampler",
    "add_noise",
    "cfg",
    "load_schedule",
    "make_sampler",
    "rescale_guidance",
    "sampler_name",
    "strength_start_index",
    "timesteps",
    "training_target",
    "velocity",
]
