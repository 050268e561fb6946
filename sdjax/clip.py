"""CLIP text encoder (the text tower of CLIP ViT-L/14 for SD 1.x; OpenCLIP ViT-H for SD 2.x)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax import configs
from sdjax.layers import AttentionConfig, attention, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # transformers' legacy configs say eos_token_id=2 and then pool at argmax(input_ids) (the highest id,
    # <|endoftext|>); newer ones give the real id and pool at its first occurrence. Both are kept as they are.
    eos_token_id: int = 2
    bos_token_id: int = 0
    pad_token_id: int = 1
    projection_dim: int = 768

    @classmethod
    def sd15(cls) -> CLIPConfig:
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> CLIPConfig:
        base = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, projection_dim=32)
        return cls(**{**base, **overrides})

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> CLIPConfig:
        """A transformers CLIPTextModel (or CLIPModel) config.json dict -> CLIPConfig; raises ValueError naming the
        field (transformers' name) and what is allowed."""
        d = configs.require_object(d, "text_encoder")
        if "text_config" in d:  # a full CLIPModel config: the text tower is what SD uses
            d = configs.require_object(d["text_config"], "text_encoder 'text_config'")
        act = d.get("hidden_act", "quick_gelu")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise configs.UnsupportedConfigError(
                f"text_encoder config field 'hidden_act' = {act!r} is not supported by sdjax "
                f"(supported: {', '.join(ACTIVATIONS)})")
        cfg = cls(
            vocab_size=configs.single_int(d, "vocab_size", 49408, "text_encoder"),
            hidden_size=configs.single_int(d, "hidden_size", 512, "text_encoder"),
            intermediate_size=configs.single_int(d, "intermediate_size", 2048, "text_encoder"),
            num_layers=configs.single_int(d, "num_hidden_layers", 12, "text_encoder"),
            num_heads=configs.single_int(d, "num_attention_heads", 8, "text_encoder"),
            max_positions=configs.single_int(d, "max_position_embeddings", 77, "text_encoder"),
            hidden_act=act,
            layer_norm_eps=configs.number(d, "layer_norm_eps", 1e-5, "text_encoder", positive=True),
            eos_token_id=configs.single_int(d, "eos_token_id", 2, "text_encoder", minimum=0),
            # bos and pad are not used by the model: kept as the file has them (null included)
            bos_token_id=_optional_id(d, "bos_token_id", 0),
            pad_token_id=_optional_id(d, "pad_token_id", 1),
            projection_dim=configs.single_int(d, "projection_dim", 512, "text_encoder"),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise configs.ConfigFieldError(
                f"text_encoder config field 'num_attention_heads' = {cfg.num_heads} must divide hidden_size = "
                f"{cfg.hidden_size} (each head gets hidden_size / heads dims)")
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_positions,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "projection_dim": self.projection_dim,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
        }


def _optional_id(d: dict[str, Any], field: str, default: int) -> Any:
    value = d.get(field, default)
    return value if value is None else configs.single_int(d, field, default, "text_encoder", minimum=0)


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after the final layer norm
    pooled: jax.Array  # [B, D], the final-normed state at the end-of-text token
    hidden_states: tuple[jax.Array, ...]  # num_layers + 1 entries: embeddings, then each layer (no final norm)


class SelfAttention(nn.Module):
    heads: int
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, l, c = x.shape  # [B, L, D]

        def proj(name):
            return nn.Dense(c, dtype=self.dtype, name=name)(x).reshape(b, l, self.heads, c // self.heads)

        out = attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), causal=True, config=self.attention,
                        layer="/".join(self.path)).reshape(b, l, c)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
    config: CLIPConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d = self.config, self.dtype
        attn = SelfAttention(cfg.num_heads, d, self.attention, name="self_attn")
        x = x + attn(layer_norm(cfg.layer_norm_eps, "layer_norm1", d)(x))
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", d)(x)
        h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=d, name="mlp_fc1")(h))
        return x + nn.Dense(cfg.hidden_size, dtype=d, name="mlp_fc2")(h)


class TextEncoder(nn.Module):
    """token ids [B, L] int -> TextOutput; `encode` gives the UNet's context (with clip skip, added embeddings)."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    def setup(self):
        cfg, d = self.config, self.dtype
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=d, name="token_embedding")
        self.position_embedding = nn.Embed(cfg.max_positions, cfg.hidden_size, dtype=d, name="position_embedding")
        self.layers = [EncoderLayer(cfg, d, self.attention, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_layer_norm = layer_norm(cfg.layer_norm_eps, "final_layer_norm", d)

    def __call__(self, ids: jax.Array) -> TextOutput:
        b, l = ids.shape
        x = self._embed(ids)  # [B, L, D]
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        last = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            eos_at = jnp.argmax(ids, axis=-1)
        else:
            eos_at = jnp.argmax(ids == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(b), eos_at]  # [B, D]
        return TextOutput(last, pooled, tuple(hidden))

    def apply_final_norm(self, h: jax.Array) -> jax.Array:
        return self.final_layer_norm(h)

    def encode(self, ids: jax.Array, added: jax.Array | None = None, clip_skip: int = 1) -> jax.Array:
        """token ids [N, L] -> the UNet's context [N, L, D]: the final layer norm of the hidden state after
        ``num_layers - (clip_skip - 1)`` layers. clip_skip counts as A1111's "Clip skip" does: 1 is the last
        layer (the reference's `last_hidden_state`), 2 the penultimate (diffusers' ``clip_skip=1``): A1111 takes
        ``hidden_states[-clip_skip]`` and applies the final layer norm, and so does diffusers with
        ``hidden_states[-(clip_skip + 1)]``. The skipped layers are not computed (clip_skip is static).

        added [E, D]: textual-inversion vectors, looked up by ids vocab_size .. vocab_size + E - 1 (`prompts.Trigger`).
        """
        n_layers = self.config.num_layers
        if not 1 <= clip_skip <= n_layers:
            raise ValueError(f"clip_skip must be in [1, {n_layers}] (this text encoder's layers), got {clip_skip}")
        x = self._embed(ids, added)
        for layer in self.layers[: n_layers - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)

    def _embed(self, ids: jax.Array, added: jax.Array | None = None) -> jax.Array:
        """Token + position embeddings [N, L, D]; ids >= vocab_size index the rows of `added` [E, D]."""
        l = ids.shape[1]
        pos = self.position_embedding(jnp.arange(l))[None]
        if added is None:
            return self.token_embedding(ids) + pos
        vocab = self.config.vocab_size
        is_added = ids >= vocab  # [N, L]
        base = self.token_embedding(jnp.where(is_added, 0, ids))
        extra = jnp.take(added, jnp.clip(ids - vocab, 0, added.shape[0] - 1), axis=0).astype(base.dtype)
        return jnp.where(is_added[..., None], extra, base) + pos
