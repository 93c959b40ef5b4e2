"""Flax NNX port of transformers' ``CLIPTextModel`` (the Stable Diffusion text encoder) and tokenizer helpers.

Parameter paths follow the ``text_model.``-prefixed keys of the Stable Diffusion checkpoints (written by
transformers 4). transformers 5 saves the same tensors without that prefix; the loader accepts both.
Only ``last_hidden_state`` is computed: the SD pipelines condition on it, not on the pooled output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jointnet_jax.models import functional
from jointnet_jax.models.config_check import check_fields
from jointnet_jax.models.layers import embed, layer_norm, linear

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
PREFIX = "text_model."
# transformers 4 checkpoints may carry this (non-parameter) buffer; it is always arange(max_positions).
POSITION_IDS = "text_model.embeddings.position_ids"


@dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers ``CLIPTextConfig``, with transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(
                f"text encoder config has model_type={d['model_type']!r}; "
                "expected 'clip_text_model' (a CLIPTextModel config)"
            )
        c = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        sizes = tuple(f.name for f in dataclasses.fields(cls) if type(f.default) is int)
        check_fields("text encoder", c, positive=sizes)
        if c.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text encoder config sets hidden_act={c.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(
                f"text encoder config hidden_size={c.hidden_size} is not divisible by "
                f"num_attention_heads={c.num_attention_heads}"
            )
        return c


def causal_attention(q, k, v):
    """Attention over (B, L, H, D) where position i sees positions <= i; float32 logits and softmax."""
    n = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    causal = jnp.tril(jnp.ones((n, n), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class CLIPAttention(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(causal_attention(q, k, v).reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = linear(c.hidden_size, c.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(c.intermediate_size, c.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        self.layer_norm1 = layer_norm(c.hidden_size, c.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = CLIPAttention(c, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(c.hidden_size, c.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(c, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_hidden_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        self.token_embedding = embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = embed(c.max_position_embeddings, c.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        n, limit = input_ids.shape[1], self.position_embedding.num_embeddings
        if n > limit:
            raise ValueError(f"sequence length {n} exceeds the text encoder's max_position_embeddings {limit}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs):
        self.embeddings = CLIPTextEmbeddings(c, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(c, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(c.hidden_size, c.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nnx.Module):
    """``last_hidden_state = model(input_ids)``: (B, L) int token ids -> (B, L, hidden_size)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        return self.text_model(jnp.asarray(input_ids, jnp.int32))


_forward = functional.jit(lambda model, ids: model(ids))


def tokenize(tokenizer, prompts) -> np.ndarray:
    """Token ids (B, model_max_length) as the SD pipelines make them: padded to the full length and truncated,
    with no attention mask (SD was trained on the padded sequence)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids


def encode_prompts(tokenizer, text_encoder: CLIPTextModel, prompts) -> jax.Array:
    """Prompt embeddings (B, model_max_length, D) of ``tokenize``'s ids."""
    return _forward(text_encoder, jnp.asarray(tokenize(tokenizer, prompts), jnp.int32))
