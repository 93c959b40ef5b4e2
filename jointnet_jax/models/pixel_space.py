"""``PixelSpace``: the identity stand-in for the VAE when diffusion runs on pixels (``vae: none``).

Pixel-space models (DeepFloyd-IF stage I, which the paper also extends, and the CPU demo) denoise images
directly. ``PixelSpace`` has the VAE's interface (``encode`` -> posterior, ``decode``, ``scaling_factor``,
``scale_factor``) so the objective and the pipelines treat both kinds of model alike. A branch keeps the
first ``channels`` channels of its [-1, 1] input: 3 for RGB and normals, 1 for depth (which arrives as a
gray image replicated to 3 channels); decoding replicates a 1-channel map back to gray RGB.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jointnet_jax.models.vae import DiagonalGaussian


class PixelSpace(nnx.Module):
    scaling_factor = 1.0
    scale_factor = 1  # no spatial downsampling

    def __init__(self, channels: int):
        if channels not in (1, 3):
            raise ValueError(f"a pixel-space branch has 1 (depth) or 3 (RGB, normals) channels, not {channels}")
        self.channels = channels

    def encode(self, x) -> DiagonalGaussian:
        """A point mass at the image: the posterior's std is exactly 0, so a "sample" is the image itself."""
        mean = jnp.asarray(x, jnp.float32)[..., : self.channels]
        return DiagonalGaussian(mean, jnp.full_like(mean, -jnp.inf))

    def decode(self, z):
        z = jnp.asarray(z, jnp.float32)
        return jnp.repeat(z, 3, axis=-1) if self.channels == 1 else z


def branch_codecs(vae, *channels: int) -> tuple:
    """One codec per branch of a model with these ``channels`` (RGB first): the shared VAE of a latent model,
    or one ``PixelSpace`` per branch."""
    return tuple(vae if vae is not None else PixelSpace(c) for c in channels)
