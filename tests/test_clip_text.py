"""CLIPTextModel port against transformers on tiny random models, and the offline tokenizer helpers."""

from __future__ import annotations

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jointnet_jax.models.clip_text import CLIPTextConfig, encode_prompts  # noqa: E402
from jointnet_jax.models.loading import load_text_encoder, load_tokenizer  # noqa: E402
from jointnet_jax.models.weights import WeightsError  # noqa: E402

VOCAB = 1000
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=VOCAB - 1,
)
_forward = jax.jit(lambda m, ids: m(ids))


def _torch_clip(hidden_act, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape))
    return model


def _torch_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def torch_clip(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    model = _torch_clip(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _ids(b=2, n=77, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, n)).astype(np.int64)


def test_matches_transformers(torch_clip):
    model, folder = torch_clip
    ours = load_text_encoder(folder)
    assert ours.config.hidden_act == model.config.hidden_act
    ids = _ids()
    np.testing.assert_allclose(_forward(ours, jnp.asarray(ids)), _torch_hidden(model, ids), atol=1e-4, rtol=0)


def test_short_sequence_is_causal(torch_clip):
    """Shorter inputs use the leading positions; a token never sees later ones."""
    model, folder = torch_clip
    ours = load_text_encoder(folder)
    ids = _ids(b=1, n=9)
    out = np.asarray(_forward(ours, jnp.asarray(ids)))
    np.testing.assert_allclose(out, _torch_hidden(model, ids), atol=1e-4, rtol=0)
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % VOCAB
    np.testing.assert_allclose(_forward(ours, jnp.asarray(changed))[:, :5], out[:, :5], atol=1e-6, rtol=0)


def test_legacy_prefixed_keys_and_position_ids(torch_clip, tmp_path):
    """SD checkpoints (transformers 4): ``text_model.``-prefixed keys plus the position_ids buffer."""
    model, folder = torch_clip
    tensors = {f"text_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids = _ids(seed=1)
    ours = load_text_encoder(tmp_path)
    np.testing.assert_allclose(_forward(ours, jnp.asarray(ids)), _torch_hidden(model, ids), atol=1e-4, rtol=0)


def test_pytorch_bin(torch_clip, tmp_path):
    model, folder = torch_clip
    torch.save({f"text_model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids = _ids(seed=2)
    ours = load_text_encoder(tmp_path)
    np.testing.assert_allclose(_forward(ours, jnp.asarray(ids)), _torch_hidden(model, ids), atol=1e-4, rtol=0)


def test_bf16_close_to_fp32(torch_clip):
    _, folder = torch_clip
    ids = jnp.asarray(_ids())
    ref = np.asarray(_forward(load_text_encoder(folder), ids))
    low = _forward(load_text_encoder(folder, dtype=jnp.bfloat16), ids)
    assert low.dtype == jnp.bfloat16
    low = np.asarray(low, np.float32)
    assert np.linalg.norm(low - ref) / np.linalg.norm(ref) < 5e-2


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A tiny CLIP BPE vocabulary (letters, end-of-word letters, a few merges) written as the hub does."""
    folder = tmp_path_factory.mktemp("tokenizer")
    letters = list(string.ascii_lowercase)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens = letters + [f"{c}</w>" for c in letters] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


def test_encode_prompts(torch_clip, tokenizer_folder):
    model, folder = torch_clip
    tokenizer = load_tokenizer(tokenizer_folder)
    prompts = ["a cat", "a dog and a cat " * 40]  # the second is longer than 77 tokens
    out = encode_prompts(tokenizer, load_text_encoder(folder), prompts)
    assert out.shape == (2, 77, TINY["hidden_size"])
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.shape == (2, 77) and ids[0, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id
    np.testing.assert_allclose(out, _torch_hidden(model, ids.astype(np.int64)), atol=1e-4, rtol=0)
    single = encode_prompts(tokenizer, load_text_encoder(folder), "a cat")
    np.testing.assert_allclose(single, out[:1], atol=1e-5, rtol=0)  # batch 1 vs 2: float rounding


def test_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_wrong_shape_is_weights_error(torch_clip, tmp_path):
    _, folder = torch_clip
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="mlp.fc1"):
        load_text_encoder(tmp_path)


def test_projection_checkpoint_is_rejected(torch_clip, tmp_path):
    """A CLIPTextModelWithProjection's extra tensor is reported, not silently dropped."""
    _, folder = torch_clip
    tensors = load_file(folder / "model.safetensors")
    tensors["text_projection.weight"] = np.zeros((32, 32), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="text_projection"):
        load_text_encoder(tmp_path)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("hidden_act", "relu", "hidden_act"),
        ("model_type", "clip", "model_type"),
        ("num_attention_heads", 5, "divisible"),
    ],
)
def test_unsupported_config(key, value, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.from_dict({**TINY, key: value})
