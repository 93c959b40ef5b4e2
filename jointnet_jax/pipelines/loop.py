"""The one denoising loop: both branches, CFG, the sampler update and known-region replacement, compiled
as a single program (``jax.lax.fori_loop``) per (task structure, shapes, sampler).

Every task is data for this loop (see ``tasks.py``): generation has nothing known; image->depth knows
the RGB latent; inpainting knows parts of both. Nothing here is specific to a task. Tile-based generation
(``tiles.py``) is a static setting of the same loop: only where the step's eps comes from changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.diffusion.guidance import cfg, rescale_guidance
from jointnet_jax.diffusion.samplers import Sampler
from jointnet_jax.models import functional
from jointnet_jax.pipelines import tiles


class Progress:
    """Where the compiled loop reports its steps: a host callback per step updates ``bar`` (a tqdm bar, or
    None between runs). It is a static argument of ``denoise`` hashed by identity, so a caller keeps one
    (``Pipeline`` has its own) and sets ``bar`` around each run: the program, compiled once, calls back into
    the same object every time."""

    def __init__(self):
        self.bar = None

    def tick(self, _step):
        if self.bar is not None:
            self.bar.update(1)


@dataclass(frozen=True)
class LoopInputs:
    """Per-run arrays of the loop (all NHWC, joint latents = RGB | dense channels, 4 + 4 for SD).

    ``x``: starting latents (noise, or noised known latents for SDEdit); ``noise``: the fixed noise used to
    re-noise known regions at every step (the initial noise, reused as the official code does; see
    docs/official-differences.md); ``known``: clean known latents; ``generate``: 1 where the loop generates,
    0 where ``known`` is pasted back (per channel);
    ``cond_rgb``/``cond_dense``: the masked-latent conditioning (B, h, w, 5) or None; ``text``: prompt
    embeddings, [uncond; cond] when guided.
    """

    x: jax.Array
    noise: jax.Array
    known: jax.Array | None
    generate: jax.Array | None
    cond_rgb: jax.Array | None
    cond_dense: jax.Array | None
    text: jax.Array


jax.tree_util.register_dataclass(
    LoopInputs, data_fields=["x", "noise", "known", "generate", "cond_rgb", "cond_dense", "text"], meta_fields=[]
)


def guided_eps(model, x, t, text, cond_rgb, cond_dense, guidance_scale, guidance_rescale, guided: bool):
    """Both branches on the [uncond; cond] batch, then classifier-free guidance over all channels."""
    n_rgb = model.channels[0]
    if guided:
        x = jnp.concatenate([x, x])
        cond_rgb = None if cond_rgb is None else jnp.concatenate([cond_rgb, cond_rgb])
        cond_dense = None if cond_dense is None else jnp.concatenate([cond_dense, cond_dense])
    eps_rgb, eps_dense = model(x[..., :n_rgb], x[..., n_rgb:], t, text, cond_rgb, cond_dense)
    out = jnp.concatenate([eps_rgb, eps_dense], axis=-1).astype(jnp.float32)
    if not guided:
        return out
    uncond, cond = jnp.split(out, 2)
    return rescale_guidance(cfg(uncond, cond, guidance_scale), cond, guidance_rescale)


def loop_step(
    model, sampler: Sampler, inputs: LoopInputs, guidance_scale, guidance_rescale, key, guided, i, carry, tiling=None
):
    """One step of the loop: guided two-branch eps (of the whole canvas, or tiled when ``tiling`` is a
    ``tiles.TileGrid``), the sampler update, then known-region replacement."""
    x, sampler_state = carry
    t = sampler.timestep_at(i)

    def eps_fn(x, cond_rgb, cond_dense, text):
        return guided_eps(model, x, t, text, cond_rgb, cond_dense, guidance_scale, guidance_rescale, guided)

    step_key = jax.random.fold_in(key, i)
    canvas = (sampler.scale_model_input(x, i), inputs.cond_rgb, inputs.cond_dense)
    if tiling is None:
        eps = eps_fn(*canvas, inputs.text)
    else:
        last = tiling.full_view_last_step(sampler.num_steps)
        full_view = None if last is None else i <= last
        eps = tiles.tiled_eps(tiling, eps_fn, canvas, inputs.text, jax.random.fold_in(step_key, 1), full_view)
    x, sampler_state = sampler.step(sampler_state, i, eps, x, step_key)
    if inputs.known is not None:
        known_t = sampler.add_noise_at(inputs.known, inputs.noise, i + 1)
        x = inputs.generate * x + (1 - inputs.generate) * known_t
    return x, sampler_state


@functools.partial(functional.jit, static_argnames=("graphdef", "sampler", "guided", "progress", "tiling"))
def denoise(
    graphdef,
    state,
    sampler: Sampler,
    inputs: LoopInputs,
    guidance_scale,
    guidance_rescale,
    key,
    *,
    guided,
    progress: Progress | None = None,
    tiling: tiles.TileGrid | None = None,
):
    """Run the whole sampler trajectory in one compiled program; returns the final joint latents (float32).
    ``progress``: a ``Progress`` told about every step (None: no host callbacks, and a program that JAX's
    persistent cache can keep)."""
    model = nnx.merge(graphdef, state)

    def body(i, carry):
        carry = loop_step(model, sampler, inputs, guidance_scale, guidance_rescale, key, guided, i, carry, tiling)
        if progress is not None:
            jax.debug.callback(progress.tick, i)
        return carry

    x0 = inputs.x.astype(jnp.float32)
    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x0, sampler.init_state(x0)))
    return x
