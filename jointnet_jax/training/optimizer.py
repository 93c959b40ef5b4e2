"""AdamW with linear warmup then a constant rate (paper §3.4), gradient clipping and accumulation."""

from __future__ import annotations

import optax


def learning_rate(lr: float, warmup_steps: int):
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
    )


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config``: lr, warmup_steps, grad_clip, weight_decay, adam_b1/b2/eps, grad_accum."""
    schedule = learning_rate(config.lr, config.warmup_steps)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps, weight_decay=config.weight_decay
        )
    )
    tx = optax.chain(*parts)
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum)
    return tx, schedule
