"""JointNet construction, the output-preserving principle, export round trips and bad input."""

from __future__ import annotations

import functools
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jointnet_jax as jj
from jointnet_jax.models.functional import compiled


@functools.cache
def _base(folder):
    return jj.load_unet(folder)


def _inputs(seed=0, batch=2, size=16, text_dim=32):
    keys = jax.random.split(jax.random.key(seed), 3)
    x_rgb = jax.random.normal(keys[0], (batch, size, size, 4))
    x_dense = jax.random.normal(keys[1], (batch, size, size, 4))
    text = jax.random.normal(keys[2], (batch, 7, text_dim))
    return x_rgb, x_dense, jnp.array([5, 640])[:batch], text


def _tensors(model):
    from jointnet_jax.models.weights import state_tensors

    return dict(state_tensors(model))


def test_from_unet_preserves_base_outputs(official):
    base = _base(official / "rgbd_finetune" / "unet")
    jn = jj.JointNet.from_unet(base)
    x_rgb, x_dense, t, text = _inputs()
    eps_rgb, eps_dense = compiled(jn)(x_rgb, x_dense, t, text)
    run_base = compiled(base)
    np.testing.assert_allclose(eps_rgb, run_base(x_rgb, t, text), atol=1e-6, rtol=0)
    np.testing.assert_allclose(eps_dense, run_base(x_dense, t, text), atol=1e-6, rtol=0)
    extras = {k: v for k, v in _tensors(jn).items() if ".jointnet_" in k}
    assert len(extras) == 2 * 2 * 14  # per branch: rgb_in_trans + 12 skip convs + mid, weight and bias
    assert all(not v.any() for v in extras.values())


def test_from_unet_channel_slicing_and_limits(official):
    base = _base(official / "rgbd_finetune" / "unet")
    jn = jj.JointNet.from_unet(base, in_channels=3, out_channels=2)
    w = _tensors(base)
    mine = _tensors(jn)
    np.testing.assert_array_equal(mine["unet.conv_in.weight"], w["conv_in.weight"][:, :3])
    np.testing.assert_array_equal(mine["jointnet.conv_out.weight"], w["conv_out.weight"][:2])
    np.testing.assert_array_equal(mine["jointnet.conv_out.bias"], w["conv_out.bias"][:2])
    with pytest.raises(ValueError, match="only keep or shrink"):
        jj.JointNet.from_unet(base, in_channels=5)


def test_masked_latent_conv_starts_at_zero_and_persists(official, tmp_path):
    base = _base(official / "rgbd_finetune" / "unet")
    jn = jj.JointNet.from_unet(base)
    x_rgb, x_dense, t, text = _inputs(1)
    before = compiled(jn)(x_rgb, x_dense, t, text)
    jn.add_masked_latent_conv()
    assert jn.masked_input
    cond = jax.random.uniform(jax.random.key(3), (*x_rgb.shape[:3], 5))
    after = compiled(jn)(x_rgb, x_dense, t, text, cond, cond[..., ::-1])
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    jn.save(tmp_path)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["has_masked_latent_input"] is True
    stored = load_file(tmp_path / "jointnet" / "diffusion_pytorch_model.safetensors")
    assert stored["jointnet_masked_latent_conv.weight"].shape == (8, 10, 3, 3)
    assert jj.load_jointnet(tmp_path).masked_input


@pytest.mark.parametrize("name", ["rgbd_finetune", "rgbd_inpaint"])
def test_export_round_trip_is_bit_identical(official, tmp_path, name):
    jn = jj.load_jointnet(official / name)
    jn.save(tmp_path / "a")
    for branch in ("unet", "jointnet"):
        original = load_file(official / name / branch / "diffusion_pytorch_model.safetensors")
        exported = load_file(tmp_path / "a" / branch / "diffusion_pytorch_model.safetensors")
        assert sorted(exported) == sorted(original)  # official key names
        for k, v in original.items():
            assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
            np.testing.assert_array_equal(exported[k], v, err_msg=k)
        cfg_in = json.loads((official / name / branch / "config.json").read_text())
        cfg_out = json.loads((tmp_path / "a" / branch / "config.json").read_text())
        assert cfg_out == cfg_in
    jj.load_jointnet(tmp_path / "a").save(tmp_path / "b")
    for branch in ("unet", "jointnet"):
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            assert (tmp_path / "a" / branch / f).read_bytes() == (tmp_path / "b" / branch / f).read_bytes()


def test_export_loads_in_diffusers(official, tmp_path):
    """diffusers' own UNet2DConditionModel reads our export (exchange layers are extra keys it ignores)."""
    from diffusers import UNet2DConditionModel

    jj.load_jointnet(official / "rgbd_finetune").save(tmp_path)
    io = load_file(official / "io_gen.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        out = model(*(torch.from_numpy(io[k]) for k in ("rgb_latent", "timesteps", "encoder_hidden_states")))
    np.testing.assert_allclose(out.sample.numpy(), io["debug.plain_unet_rgb_noise_pred"], atol=1e-4, rtol=0)


def test_torch_bin_checkpoint_loads(official, tmp_path):
    shutil.copytree(official / "rgbd_finetune", tmp_path / "m")
    for branch in ("unet", "jointnet"):
        f = tmp_path / "m" / branch / "diffusion_pytorch_model.safetensors"
        torch.save({k: torch.from_numpy(v) for k, v in load_file(f).items()}, f.with_suffix(".bin"))
        f.unlink()
    a, b = _tensors(jj.load_jointnet(tmp_path / "m")), _tensors(jj.load_jointnet(official / "rgbd_finetune"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each


@pytest.fixture
def copy(official, tmp_path):
    shutil.copytree(official / "rgbd_finetune", tmp_path / "m")
    return tmp_path / "m"


def _edit(folder, fn):
    f = folder / "jointnet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jj.load_jointnet(tmp_path / "nope")


def test_missing_weights_file(copy):
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        jj.load_jointnet(copy)


def test_wrong_shape(copy):
    _edit(copy, lambda t: t.update({"conv_in.weight": t["conv_in.weight"][:, :3]}))
    with pytest.raises(jj.WeightsError, match=r"wrong shape: jointnet.conv_in.weight \(stored \(8, 3, 3, 3\)"):
        jj.load_jointnet(copy)


def test_unknown_key(copy):
    _edit(copy, lambda t: t.update({"extra_layer.weight": np.zeros(3, np.float32)}))
    with pytest.raises(jj.WeightsError, match="not used by the model: jointnet.extra_layer.weight"):
        jj.load_jointnet(copy)


def test_missing_key(copy):
    _edit(copy, lambda t: t.pop("mid_block.resnets.0.conv1.bias"))
    with pytest.raises(jj.WeightsError, match="missing from the .*jointnet.mid_block.resnets.0.conv1.bias"):
        jj.load_jointnet(copy)


def test_truncated_safetensors(copy):
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(jj.WeightsError, match="not a valid safetensors file"):
        jj.load_jointnet(copy)


def test_bad_config(copy):
    (copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        jj.load_jointnet(copy)


def test_masked_flag_versus_weights(official, tmp_path):
    """Flag false + masked-conv weights: warn and follow the flag. Flag true + no weights: strict error."""
    shutil.copytree(official / "rgbd_inpaint", tmp_path / "m")
    for branch in ("unet", "jointnet"):
        cfg = tmp_path / "m" / branch / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "has_masked_latent_input": False}))
    with pytest.warns(UserWarning, match="jointnet_masked_latent_conv.*NOT loaded"):
        assert not jj.load_jointnet(tmp_path / "m").masked_input
    shutil.copytree(official / "rgbd_finetune", tmp_path / "f")
    for branch in ("unet", "jointnet"):
        cfg = tmp_path / "f" / branch / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "has_masked_latent_input": True}))
    with pytest.raises(jj.WeightsError, match="missing from .*jointnet_masked_latent_conv"):
        jj.load_jointnet(tmp_path / "f")
