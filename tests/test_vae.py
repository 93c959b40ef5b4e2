"""AutoencoderKL port against diffusers on tiny random models (CPU, float32)."""

from __future__ import annotations

import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from jointnet_jax.models.loading import load_vae  # noqa: E402
from jointnet_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig  # noqa: E402
from jointnet_jax.models.weights import WeightsError, abstract  # noqa: E402

TINY = dict(
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)
# Three levels, two resnets per level, no quant convs and no mid attention: the optional paths.
TINY_BARE = dict(
    TINY,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 8, 16],
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def _randomize(model, seed=0):
    """Random weights everywhere, norms included, so that no parameter can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm else 0.2 * noise)
    return model.eval()


def _save_vae(config, folder):
    vae = _randomize(diffusers.AutoencoderKL(**config))
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return _save_vae(TINY, folder), folder


@pytest.fixture(scope="module")
def bare_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_bare")
    return _save_vae(TINY_BARE, folder), folder


@pytest.fixture(params=["sd_vae", "bare_vae"])
def torch_vae(request):
    return request.getfixturevalue(request.param)


def _image(b=2, h=16, w=16, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (b, 3, h, w)).astype(np.float32)


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def _torch_reference(vae, x):
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        return _nhwc(dist.mean), _nhwc(dist.logvar), _nhwc(vae.decode(dist.mean).sample)


# One compiled call is much faster on CPU than eager op-by-op dispatch.
_encode = jax.jit(lambda m, x: m.encode(x))
_decode = jax.jit(lambda m, z: m.decode(z))


def _assert_matches_torch(model, vae, x, atol=1e-4):
    mean, logvar, recon = _torch_reference(vae, x)
    post = _encode(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(post.mean, mean, atol=atol, rtol=0)
    np.testing.assert_allclose(post.logvar, logvar, atol=atol, rtol=0)
    np.testing.assert_allclose(_decode(model, jnp.asarray(mean)), recon, atol=atol, rtol=0)


def test_matches_diffusers(torch_vae):
    vae, folder = torch_vae
    model = load_vae(folder)
    assert model.scaling_factor == vae.config.scaling_factor
    assert model.scale_factor == 2 ** (len(vae.config.block_out_channels) - 1)
    _assert_matches_torch(model, vae, _image())


def test_odd_size_matches_diffusers(torch_vae):
    """Non-multiple sizes exercise the asymmetric downsampling pad."""
    vae, folder = torch_vae
    _assert_matches_torch(load_vae(folder), vae, _image(b=1, h=13, w=10))


def test_legacy_attention_names(sd_vae, tmp_path):
    """Old checkpoints: query/key/value/proj_attn names and 1x1-conv-shaped (out, in, 1, 1) weights."""
    vae, folder = sd_vae
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in tensors.items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    _assert_matches_torch(load_vae(tmp_path), vae, _image(b=1))


def test_sample_is_mean_plus_std_noise():
    rng = np.random.default_rng(0)
    mean = jnp.asarray(rng.normal(size=(2, 64, 64, 4)), jnp.float32)
    logvar = jnp.asarray(rng.normal(size=(2, 64, 64, 4)), jnp.float32)
    post = DiagonalGaussian(mean, logvar)
    key = jax.random.key(3)
    noise = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(post.sample(key), mean + jnp.exp(0.5 * logvar) * noise, rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), mean)
    z = (post.sample(jax.random.key(4)) - mean) / post.std
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_posterior_jits_and_logvar_is_clamped(sd_vae):
    _, folder = sd_vae
    model = load_vae(folder)
    x = jnp.asarray(_image(b=1).transpose(0, 2, 3, 1))
    post = _encode(model, x)
    assert isinstance(post, DiagonalGaussian)
    np.testing.assert_allclose(post.mean, model.encode(x).mean, atol=1e-5)
    bias = model.quant_conv.bias  # the last layer before the mean/logvar split
    original = bias[...]
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
        bias[...] = original.at[4:].add(shift)
        np.testing.assert_array_equal(_encode(model, x).logvar, bound)
    bias[...] = original


def test_bf16_close_to_fp32(sd_vae):
    _, folder = sd_vae
    x = jnp.asarray(_image().transpose(0, 2, 3, 1))
    ref, low = load_vae(folder), load_vae(folder, dtype=jnp.bfloat16)
    mean = _encode(ref, x).mean
    for a, b in ((mean, _encode(low, x).mean), (_decode(ref, mean), _decode(low, mean))):
        a, b = np.asarray(a), np.asarray(b, np.float32)
        assert np.isfinite(b).all()
        assert np.linalg.norm(b - a) / np.linalg.norm(a) < 5e-2


def test_scale_factor_follows_levels():
    config = VAEConfig(block_out_channels=(8, 8, 8, 16), norm_num_groups=4)
    assert abstract(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))).scale_factor == 8


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nope")


def test_wrong_shape_is_weights_error(tmp_path):
    _save_vae(TINY, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="wrong shape"):
        load_vae(tmp_path)


def test_missing_tensor_is_weights_error(tmp_path):
    _save_vae(TINY, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="decoder.conv_out.bias"):
        load_vae(tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [("act_fn", "relu"), ("shift_factor", 0.1), ("down_block_types", ["DownBlock2D", "DownEncoderBlock2D"])],
)
def test_unsupported_config(key, value):
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_dict({**TINY, key: value})
