"""Stage-3 mask sampling (the inpainting fine-tune): per example one of four kinds, in latent space.

* rgb2j: RGB known, dense generated (image -> depth)
* j2rgb: dense known, RGB generated (depth -> image)
* box:   the same random rectangle repainted in both modalities (RGBD editing)
* none:  everything generated (plain joint generation; the paper's "pure white masks")

Masks use the pipelines' convention: 1 = generate, 0 = known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("rgb2j", "j2rgb", "box", "none")


def sample_masks(key, height: int, width: int, min_side: float = 0.25, max_side: float = 0.75):
    """One example's (mask_rgb, mask_dense), each (height, width, 1) float32."""
    k_kind, k_size, k_pos = jax.random.split(key, 3)
    kind = jax.random.randint(k_kind, (), 0, len(KINDS))
    frac = jax.random.uniform(k_size, (2,), minval=min_side, maxval=max_side)
    size = jnp.maximum(jnp.round(frac * jnp.array([height, width])), 1)
    start = jnp.floor(jax.random.uniform(k_pos, (2,)) * (jnp.array([height, width]) - size + 1))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= start[0]) & (rows < start[0] + size[0]) & (cols >= start[1]) & (cols < start[1] + size[1])
    box = box.astype(jnp.float32)[..., None]
    ones, zeros = jnp.ones_like(box), jnp.zeros_like(box)
    mask_rgb = jnp.stack([zeros, ones, box, ones])[kind]
    mask_dense = jnp.stack([ones, zeros, box, ones])[kind]
    return mask_rgb, mask_dense


def conditioning(mask, latent):
    """The masked-latent input of one branch: [mask | latent where known] (..., 5)."""
    return jnp.concatenate([mask, (mask < 0.5) * latent], axis=-1)
