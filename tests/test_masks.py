"""Stage-3 mask sampling (the four kinds, the box geometry), the masked-latent conditioning, and that the
stage-3 objective feeds both to the model; tiny arrays and a stand-in model, nothing compile-heavy."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jointnet_jax.diffusion.schedule import NoiseSchedule
from jointnet_jax.models.vae import DiagonalGaussian
from jointnet_jax.training.masks import KINDS, conditioning, sample_masks
from jointnet_jax.training.objective import LossSettings, joint_loss

H, W = 12, 20  # not square, so swapped axes show
N = 4000


def _kinds(m_rgb, m_dense) -> np.ndarray:
    """Each example's kind from its masks (N, h, w, 1), by definition (1 = generate, 0 = known); -1 if none fits.
    A box is never empty nor the whole image (its sides are at most max_side < 1 of the size)."""
    r, d = m_rgb.reshape(len(m_rgb), -1), m_dense.reshape(len(m_dense), -1)
    zeros_r, ones_r, zeros_d, ones_d = (r == 0).all(1), (r == 1).all(1), (d == 0).all(1), (d == 1).all(1)
    same_partial = (r == d).all(1) & ~zeros_r & ~ones_r
    kind = np.full(len(r), -1)
    for i, fits in enumerate((zeros_r & ones_d, ones_r & zeros_d, same_partial, ones_r & ones_d)):
        kind[fits] = i
    return kind


def _boxes(masks) -> np.ndarray:
    """(top, bottom, left, right) of each mask (n, h, w, 1), asserting it is exactly one filled rectangle."""
    out = []
    for m in masks[..., 0].astype(bool):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        rectangle = np.zeros_like(m)
        rectangle[top:bottom, left:right] = True
        assert np.array_equal(m, rectangle)
        out.append((top, bottom, left, right))
    return np.array(out)


@pytest.fixture(scope="module")
def sampled():
    keys = jax.random.split(jax.random.key(0), N)
    m_rgb, m_dense = jax.jit(jax.vmap(lambda k: sample_masks(k, H, W)))(keys)
    return np.asarray(m_rgb), np.asarray(m_dense)


def test_the_four_kinds_come_equally_often(sampled):
    m_rgb, m_dense = sampled
    assert m_rgb.shape == m_dense.shape == (N, H, W, 1) and m_rgb.dtype == m_dense.dtype == np.float32
    assert set(np.unique(m_rgb)) == set(np.unique(m_dense)) == {0.0, 1.0}
    kind = _kinds(m_rgb, m_dense)
    assert (kind >= 0).all()
    share = np.bincount(kind, minlength=len(KINDS)) / N
    np.testing.assert_allclose(share, 0.25, atol=0.03)  # binomial std is 0.007 at N = 4000
    # The named kinds are the documented ones: RGB known / dense generated for rgb2j, and so on.
    assert KINDS == ("rgb2j", "j2rgb", "box", "none")


def test_box_is_one_rectangle_in_both_with_sides_in_range(sampled):
    m_rgb, m_dense = sampled
    box = _kinds(m_rgb, m_dense) == KINDS.index("box")
    top, bottom, left, right = _boxes(m_rgb[box]).T
    np.testing.assert_array_equal(m_dense[box], m_rgb[box])
    # Sides are round(fraction x size) for fractions in [0.25, 0.75): the whole range occurs, nothing beyond.
    heights, widths = bottom - top, right - left
    assert (heights.min(), heights.max()) == (round(0.25 * H), round(0.75 * H))
    assert (widths.min(), widths.max()) == (round(0.25 * W), round(0.75 * W))
    # Placed anywhere it fits: boxes touch every edge, none is cut off by one (the side checks above).
    assert top.min() == 0 and bottom.max() == H and left.min() == 0 and right.max() == W


def test_box_sides_follow_min_and_max_side():
    keys = jax.random.split(jax.random.key(1), 400)
    m_rgb, m_dense = jax.jit(jax.vmap(lambda k: sample_masks(k, H, W, min_side=0.5, max_side=0.5)))(keys)
    m_rgb, m_dense = np.asarray(m_rgb), np.asarray(m_dense)
    box = _kinds(m_rgb, m_dense) == KINDS.index("box")
    assert box.sum() > 50
    top, bottom, left, right = _boxes(m_rgb[box]).T
    assert set(bottom - top) == {H // 2} and set(right - left) == {W // 2}


def test_conditioning_is_the_mask_and_the_known_latent():
    """[mask | latent where the mask is below 0.5 (known), else 0], on soft mask values too."""
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0.0, 1.0, 0.3, 0.7, 0.5], np.float32), size=(2, 3, 4, 1))
    latent = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    expected = np.concatenate([mask, np.where(mask < 0.5, latent, 0.0)], axis=-1)
    np.testing.assert_array_equal(np.asarray(conditioning(jnp.asarray(mask), jnp.asarray(latent))), expected)


# The stage-3 objective with stand-ins: the VAE's latent is the image's first channel repeated 4 times
# with a negligible std (log-variance -60), so the clean latents are known exactly.
B, HL, L, D = 64, 8, 5, 3
SCHEDULE = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
VAE = SimpleNamespace(
    encode=lambda x: DiagonalGaussian(x[..., :1].repeat(4, -1), jnp.full(x.shape[:3] + (4,), -60.0)), scaling_factor=1.0
)
TEXT = lambda ids: jnp.ones((ids.shape[0], L, D))  # noqa: E731


@partial(jax.jit, static_argnames="stage")
def _seen_by_model(batch, stage, key=0):
    """What the model is called with: the noisy RGB latent and both conditionings (None when not given)."""
    seen = {}

    def model(x, y, t, text, cond_x, cond_y):
        seen.update(x=x, cond_x=cond_x, cond_y=cond_y)
        return x * 0, y * 0

    uncond = jnp.zeros((1, L, D))
    joint_loss(model, VAE, TEXT, SCHEDULE, uncond, batch, jax.random.key(key), LossSettings(masks=stage == 3))
    return seen


def test_stage3_objective_conditions_the_model_on_sampled_masks():
    """Stage 3 gives each branch [its mask | its clean latent where known], one mask kind per example drawn
    from its record index (all four kinds occur in a batch, independent of the batch order); stage 1 none."""
    k_image, k_depth = jax.random.split(jax.random.key(3))
    batch = {
        "image": jax.random.uniform(k_image, (B, HL, HL, 3), minval=-1, maxval=1),
        "depth": jax.random.uniform(k_depth, (B, HL, HL, 3), minval=-1, maxval=1),
        "input_ids": jnp.zeros((B, L), jnp.int32),
        "index": jnp.arange(B),
    }
    seen = _seen_by_model(batch, stage=3)
    cond_x, cond_y = np.asarray(seen["cond_x"]), np.asarray(seen["cond_y"])
    assert cond_x.shape == cond_y.shape == (B, HL, HL, 5)
    m_x, m_y = cond_x[..., :1], cond_y[..., :1]
    assert set(np.unique(m_x)) | set(np.unique(m_y)) == {0.0, 1.0}
    kind = _kinds(m_x, m_y)
    assert (kind >= 0).all() and set(kind) == set(range(len(KINDS)))
    _boxes(m_x[kind == KINDS.index("box")])
    x0 = np.asarray(batch["image"])[..., :1].repeat(4, -1)  # the clean latents, not the noisy x_t
    y0 = np.asarray(batch["depth"])[..., :1].repeat(4, -1)
    np.testing.assert_allclose(cond_x[..., 1:], (m_x == 0) * x0, atol=1e-6)
    np.testing.assert_allclose(cond_y[..., 1:], (m_y == 0) * y0, atol=1e-6)
    assert not np.allclose(np.asarray(seen["x"]), x0, atol=0.1)  # the model's input is noised; cond is not

    reverse = {k: v[::-1] for k, v in batch.items()}
    again = _seen_by_model(reverse, stage=3)
    np.testing.assert_array_equal(np.asarray(again["cond_x"])[::-1, ..., :1], m_x)
    np.testing.assert_array_equal(np.asarray(again["cond_y"])[::-1, ..., :1], m_y)
    other_step = _seen_by_model(batch, stage=3, key=1)
    assert not np.array_equal(np.asarray(other_step["cond_x"])[..., :1], m_x)

    stage1 = _seen_by_model(batch, stage=1)
    assert stage1["cond_x"] is None and stage1["cond_y"] is None
