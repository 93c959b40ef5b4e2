"""Noise schedules, samplers and guidance as pure JAX functions for a single compiled sampling loop."""

from jointnet_jax.diffusion.guidance import cfg, rescale_guidance
from jointnet_jax.diffusion.samplers import Sampler, make_sampler
from jointnet_jax.diffusion.schedule import (
    SAMPLER_KINDS,
    NoiseSchedule,
    add_noise,
    load_schedule,
    model_output_to_eps,
    model_output_to_x0,
    strength_start_index,
    timesteps,
    timesteps_for_strength,
    training_target,
    v_target,
    velocity,
)

__all__ = [
    "SAMPLER_KINDS",
    "NoiseSchedule",
    "Sampler",
    "add_noise",
    "cfg",
    "load_schedule",
    "make_sampler",
    "model_output_to_eps",
    "model_output_to_x0",
    "rescale_guidance",
    "strength_start_index",
    "timesteps",
    "timesteps_for_strength",
    "training_target",
    "v_target",
    "velocity",
]
