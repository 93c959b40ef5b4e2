"""The compiled train and eval steps, as pure functions of (train state or parameters, frozen parameters,
codec and text-encoder states, the empty prompt's embedding, a batch).

Randomness comes from ``fold_in(seed, step)`` (and the record index inside the objective), so a resumed run
reproduces the losses of an uninterrupted one; evaluation uses a fixed key (``eval_seed``) so that its
losses are comparable across steps and runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.pixel_space import branch_codecs
from jointnet_jax.training.objective import LossSettings, cached_loss, joint_loss


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: object


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


def make_loss(models, settings: LossSettings, cached: bool = False):
    """The objective as a pure function of (params, frozen, vae state, text state, uncond, batch, key). With
    ``cached`` the batches come from the latent cache (``objective.cached_loss``): the VAE and the text
    encoder are not part of it, and their states are ignored (the trainer passes empty ones)."""
    graphdef, vae_def, text_def, schedule, channels = (
        models.graphdef,
        models.vae_def,
        models.text_def,
        models.schedule,
        models.channels,
    )
    if cached:
        scaling_factor = models.scaling_factor()

        def loss(params, frozen, vae_state, text_state, uncond, batch, key):
            model = nnx.merge(graphdef, params, frozen)
            return cached_loss(model, scaling_factor, len(channels), schedule, uncond, batch, key, settings)

        return loss

    def loss(params, frozen, vae_state, text_state, uncond, batch, key):
        codecs = branch_codecs(None if vae_def is None else nnx.merge(vae_def, vae_state), *channels)
        model = nnx.merge(graphdef, params, frozen)
        return joint_loss(model, codecs, nnx.merge(text_def, text_state), schedule, uncond, batch, key, settings)

    return loss


def make_train_step(loss, tx, lr_schedule, seed: int):
    """One optimizer step; the trainable partition alone is differentiated."""

    def train_step(state: TrainState, frozen, vae_state, text_state, uncond, batch):
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_of(params):
            return loss(params, frozen, vae_state, text_state, uncond, batch, key)

        (loss_value, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.params, updates)
        metrics.update(loss=loss_value, grad_norm=global_norm(grads), lr=lr_schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(loss, eval_seed: int):
    """Per-batch sums of the losses (weighted by the valid examples), from a fixed key."""
    key = jax.random.key(eval_seed)

    def eval_step(params, frozen, vae_state, text_state, uncond, batch):
        _, metrics = loss(params, frozen, vae_state, text_state, uncond, batch, key)
        n = batch["valid"].astype(jnp.float32).sum()
        return {k: v * n for k, v in metrics.items()}, n

    return eval_step


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
