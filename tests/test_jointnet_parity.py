"""Parity with the official PyTorch JointNet on the vendored fixture tests/fixtures/official_tiny (fp32, max
|err| <= 1e-4; bf16 compute within 5e-2 with a float32 softmax)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jointnet_jax as jj
from jointnet_jax.models.functional import compiled
from tests.conftest import nhwc
from tests.test_attention import exp_dtypes

TOL = 1e-4


@functools.cache
def _model(folder, dtype=jnp.float32):
    return jj.load_jointnet(folder, dtype=dtype)


@functools.cache
def _twin(folder, dtype=jnp.float32):
    return compiled(_model(folder, dtype), "forward_with_residuals")


def _run(twin, io, prefix="", cond=False):
    args = [nhwc(io[prefix + "rgb_latent"]), nhwc(io[prefix + "depth_latent"])]
    args += [jnp.asarray(io[prefix + "timesteps"]), jnp.asarray(io[prefix + "encoder_hidden_states"])]
    kw = {}
    if cond:
        kw = dict(
            cond_rgb=nhwc(np.concatenate([io["mask_image"], io["masked_image_latents"]], 1)),
            cond_dense=nhwc(np.concatenate([io["mask_joint"], io["masked_joint_latents"]], 1)),
        )
    return twin(*args, **kw)


@pytest.mark.parametrize("prefix", ["", "scalar_t."])
def test_generation_denoiser_matches_official(official, prefix):
    io = load_file(official / "io_gen.safetensors")
    eps_rgb, eps_dense, _, _ = _run(_twin(official / "rgbd_finetune"), io, prefix)
    out = np.concatenate([eps_rgb, eps_dense], axis=-1)
    assert prefix == "" or io[prefix + "timesteps"].ndim == 0
    np.testing.assert_allclose(out, nhwc(io[prefix + "noise_pred"]), atol=TOL, rtol=0)


def test_exchanged_residuals_match_official(official):
    io = load_file(official / "io_gen.safetensors")
    _, _, (rgb_sent, rgb_mid), (dense_sent, dense_mid) = _run(_twin(official / "rgbd_finetune"), io)
    assert len(rgb_sent) == len(dense_sent) == 12
    for k in range(12):
        np.testing.assert_allclose(rgb_sent[k], nhwc(io[f"debug.rgb_to_joint.down.{k:02d}"]), atol=TOL, rtol=0)
        np.testing.assert_allclose(dense_sent[k], nhwc(io[f"debug.joint_to_rgb.down.{k:02d}"]), atol=TOL, rtol=0)
    np.testing.assert_allclose(rgb_mid, nhwc(io["debug.rgb_to_joint.mid"]), atol=TOL, rtol=0)
    np.testing.assert_allclose(dense_mid, nhwc(io["debug.joint_to_rgb.mid"]), atol=TOL, rtol=0)


def test_inpaint_denoiser_matches_official(official):
    io = load_file(official / "io_inpaint.safetensors")
    jn = _model(official / "rgbd_inpaint")
    assert jn.masked_input
    eps_rgb, eps_dense, _, _ = _run(_twin(official / "rgbd_inpaint"), io, cond=True)
    out = np.concatenate([eps_rgb, eps_dense], axis=-1)
    np.testing.assert_allclose(out, nhwc(io["noise_pred"]), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="cond_rgb and cond_dense"):
        _run(_twin(official / "rgbd_inpaint"), io)


def test_plain_unet_matches_official(official):
    io = load_file(official / "io_gen.safetensors")
    unet = compiled(jj.load_unet(official / "rgbd_finetune" / "unet"))
    out = unet(nhwc(io["rgb_latent"]), jnp.asarray(io["timesteps"]), jnp.asarray(io["encoder_hidden_states"]))
    np.testing.assert_allclose(out, nhwc(io["debug.plain_unet_rgb_noise_pred"]), atol=TOL, rtol=0)


def test_branches_are_not_swapped(official):
    """The fixture's depth branch was perturbed: swapping unet/ and jointnet/ must change the output."""
    jn = _model(official / "rgbd_finetune")
    rgb = jj.load_unet(official / "rgbd_finetune" / "unet")
    k = "conv_in.kernel"
    assert not np.array_equal(np.asarray(jn.unet.conv_in.kernel[...]), np.asarray(jn.jointnet.conv_in.kernel[...]))
    np.testing.assert_array_equal(np.asarray(jn.unet.conv_in.kernel[...]), np.asarray(rgb.conv_in.kernel[...]), k)


def test_bf16_compute_close_to_fp32(official):
    io = load_file(official / "io_gen.safetensors")
    eps_rgb, eps_dense, _, _ = _run(_twin(official / "rgbd_finetune", jnp.bfloat16), io)
    assert eps_rgb.dtype == jnp.bfloat16
    assert (
        _model(official / "rgbd_finetune", jnp.bfloat16).unet.conv_in.kernel[...].dtype == jnp.float32
    )  # parameters stay fp32
    out = np.concatenate([np.asarray(eps_rgb, np.float32), np.asarray(eps_dense, np.float32)], axis=-1)
    np.testing.assert_allclose(out, nhwc(io["noise_pred"]), atol=5e-2, rtol=0)
    # The loose tolerance is bf16 rounding (about 14% of the output's std); what must not be rounded is the
    # attention softmax: every exponential of the bf16 twin (softmax and timestep embedding) is float32.
    model = _model(official / "rgbd_finetune", jnp.bfloat16)
    graphdef, state = nnx.split(model)
    x, t, text = jnp.zeros((1, 16, 16, 4)), jnp.array([10]), jnp.zeros((1, 77, 32))
    dtypes = exp_dtypes(lambda s: nnx.merge(graphdef, s)(x, x, t, text), state)
    assert len(dtypes) >= 2 * 32 and all(d == jnp.float32 for d in dtypes), dtypes  # 32 attentions per branch
