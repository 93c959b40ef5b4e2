"""Pixel-space models (``vae: none``) and the Direct Extend baseline: construction, output preservation,
partitioning, export and the sampling pipeline on a pixel-space twin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jointnet_jax as jj
from jointnet_jax.models.direct_extend import DirectExtend
from jointnet_jax.models.functional import compiled
from jointnet_jax.models.pixel_space import PixelSpace, branch_codecs
from jointnet_jax.models.tiny import UNET_2LEVEL, write_tiny_base
from jointnet_jax.training.partition import split_trainable

PIXEL_UNET = {**UNET_2LEVEL, "in_channels": 3, "out_channels": 3}
# A widened conv_in sums over one more (zero) input channel, so XLA's reduction order may differ from the
# base's: the base's outputs are kept up to float32 rounding (a CI run saw 1.2e-6 on values near 1).
WIDENED_ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("pixel") / "base", unet=PIXEL_UNET, vae=False)


@functools.cache
def _unet(folder):
    return jj.load_unet(folder / "unet")


def _inputs(seed=0, batch=2, size=8):
    k = jax.random.split(jax.random.key(seed), 3)
    rgb = jax.random.normal(k[0], (batch, size, size, 3))
    depth = jax.random.normal(k[1], (batch, size, size, 1))
    return rgb, depth, jnp.array([3, 700])[:batch], jax.random.normal(k[2], (batch, 5, 32))


def test_pixel_space_codec_is_exact():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    depth = PixelSpace(1)
    posterior = depth.encode(images)
    np.testing.assert_array_equal(posterior.sample(jax.random.key(0)), images[..., :1])
    np.testing.assert_array_equal(depth.decode(posterior.mean), np.repeat(images[..., :1], 3, -1))
    np.testing.assert_array_equal(PixelSpace(3).decode(images), images)
    rgb, dense = branch_codecs(None, 3, 1)
    assert (rgb.channels, dense.channels) == (3, 1)
    with pytest.raises(ValueError, match="1 \\(depth\\) or 3"):
        PixelSpace(4)


def test_base_without_vae_is_pixel_space(base):
    assert not (base / "vae").exists()
    unet = _unet(base)
    assert (unet.config.in_channels, unet.config.out_channels) == (3, 3)


def test_pixel_jointnet_preserves_base_and_round_trips(base, tmp_path):
    unet = _unet(base)
    jn = jj.JointNet.from_unet(unet, dense_channels=1)
    assert jn.channels == (3, 1)
    assert (jn.unet.joint_in_channels, jn.jointnet.joint_in_channels) == (1, 3)
    rgb, depth, t, text = _inputs()
    eps_rgb, eps_dense = compiled(jn)(rgb, depth, t, text)
    run_unet = compiled(unet)
    np.testing.assert_allclose(eps_rgb, run_unet(rgb, t, text), atol=WIDENED_ATOL, rtol=0)
    # The dense branch is the base with conv_in keeping its first input channel and conv_out its first output
    # channel: the base's first output channel on the depth padded with zero channels.
    padded = jnp.concatenate([depth, jnp.zeros_like(rgb[..., 1:])], axis=-1)
    np.testing.assert_allclose(eps_dense, run_unet(padded, t, text)[..., :1], atol=WIDENED_ATOL, rtol=0)
    jn.save(tmp_path / "jn")
    back = jj.load_jointnet(tmp_path / "jn")
    assert back.channels == (3, 1)
    np.testing.assert_array_equal(compiled(back)(rgb, depth, t, text)[1], eps_dense)


def test_direct_extend_starts_as_the_base(base, tmp_path):
    unet = _unet(base)
    de = DirectExtend.from_unet(unet, dense_channels=1)
    assert de.channels == (3, 1) and de.config.in_channels == 4
    rgb, depth, t, text = _inputs(1)
    run = compiled(de)
    eps_rgb, eps_dense = run(rgb, depth, t, text)
    np.testing.assert_allclose(eps_rgb, compiled(unet)(rgb, t, text), atol=WIDENED_ATOL, rtol=0)
    np.testing.assert_array_equal(eps_dense, 0.0)  # zero output rows
    np.testing.assert_allclose(run(rgb, 5 * depth, t, text)[0], eps_rgb, atol=1e-6, rtol=0)  # zero input columns
    # One shared UNet: everything trains, nothing is frozen (unlike JointNet stage 1).
    _, trainable, frozen = split_trainable(de, stage=1)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(de, nnx.Param)))
    assert sum(x.size for x in jax.tree.leaves(trainable)) == n_params and not jax.tree.leaves(frozen)
    de.save(tmp_path / "de")
    widened = jj.load_unet(tmp_path / "de" / "unet")
    assert (widened.config.in_channels, widened.config.out_channels) == (4, 4)
    with pytest.raises(ValueError, match="masked-latent"):
        de(rgb, depth, t, text, cond_rgb=jnp.zeros((2, 8, 8, 4)))


def test_pixel_pipeline_depth_keeps_the_image(base):
    jn = jj.JointNet.from_unet(_unet(base), dense_channels=1)
    pipe = jj.Pipeline.from_pretrained(base, jn)
    assert pipe.vae is None and pipe.vae_factor == 1 and pipe.size_multiple == 2
    image = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    out = pipe.depth(["a red sphere"], image, steps=2, cfg=2.0, progress=False)
    assert out["latents"].shape == (1, 8, 8, 4) and out["depth"].shape == (1, 8, 8)
    np.testing.assert_allclose(out["rgb"][0], image, atol=1e-6)  # known RGB pasted back exactly
    # Pixel space decodes the dense channel directly: depth = clip(x / 2 + 0.5, 0, 1) of the final latent.
    np.testing.assert_allclose(out["depth"], np.clip(out["latents"][..., 3] / 2 + 0.5, 0, 1), atol=1e-6)
    assert np.abs(out["latents"][..., 3]).max() > 1e-3  # the depth was generated, not left at zero
    gen = pipe.generate(["a red sphere"], steps=2, height=8, width=8, progress=False)
    assert gen["rgb"].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(gen["rgb"], np.clip(gen["latents"][..., :3] / 2 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(gen["depth"], np.clip(gen["latents"][..., 3] / 2 + 0.5, 0, 1), atol=1e-6)
