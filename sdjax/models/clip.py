"""CLIP text encoder (transformers' CLIPTextModel) in Flax linen.

Parameter names follow transformers' former FlaxCLIPTextModel:
`text_model/encoder/layers/3/self_attn/q_proj/kernel`. The output is `last_hidden_state`
(after the final LayerNorm), which is what Stable Diffusion conditions on.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import (AttentionChoice, AttentionSite, attention,
                                    check_attention_implementation)
from sdjax.models.config import CLIPTextConfig
from sdjax.models.layers import maybe_remat

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def plan_attention(config: CLIPTextConfig, requested: Optional[str], dtype,
                   platform: Optional[str] = None) -> Tuple[Optional[str], List[AttentionChoice]]:
    """Resolves an attention request for the text encoder: (the module's
    `attention_implementation`, the choice made for its layers, which all look alike).

    The layers' self-attention is causal over max_position_embeddings tokens (77) with no mask
    array, as sdjax calls the encoder (no `attention_mask`); a call that passes one runs XLA,
    see `CLIPAttention`. `platform`: as `choose_attention_implementation`.
    """
    length = config.max_position_embeddings
    heads = config.num_attention_heads
    choice = AttentionSite("text_encoder", "layers", heads, config.hidden_size // heads, length,
                           length, is_causal=True).choose(requested, dtype, platform)
    return choice.implementation, [choice]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        d, heads = self.config.hidden_size, self.config.num_attention_heads
        q = nn.Dense(d, dtype=self.dtype, name="q_proj")(x)
        k = nn.Dense(d, dtype=self.dtype, name="k_proj")(x)
        v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
        implementation = self.implementation
        if mask is not None and implementation == "cudnn":
            # cuDNN needs a bias/mask of (B, N, T, S) exactly, and this key-padding mask is
            # (B, 1, 1, S): the one call-time case choose_attention_implementation's has_mask
            # rule covers, since build time cannot know whether callers pass attention_mask.
            implementation = "xla"
        out = attention(q, k, v, heads, mask=mask, is_causal=True, implementation=implementation)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


def _layer_norm(cfg: CLIPTextConfig, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: causal self-attention then MLP, each with a residual."""

    config: CLIPTextConfig
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        h = _layer_norm(cfg, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.implementation, dtype=self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(cfg, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(cfg, dtype=self.dtype, name="mlp")(h)


class CLIPLayerCollection(nn.Module):
    config: CLIPTextConfig
    implementation: Optional[str] = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        layer_cls = maybe_remat(CLIPEncoderLayer, self.gradient_checkpointing, self.remat_policy)
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, self.implementation, dtype=self.dtype, name=str(i))(x, mask)
        return x


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    implementation: Optional[str] = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        return CLIPLayerCollection(self.config, self.implementation, self.gradient_checkpointing,
                                   self.remat_policy, dtype=self.dtype, name="layers")(x, mask)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None, :])


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    implementation: Optional[str] = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        x = CLIPEmbeddings(self.config, dtype=self.dtype, name="embeddings")(input_ids)
        # Padding mask over keys (as transformers expands `attention_mask`); causality is added
        # by the attention call itself.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = CLIPEncoder(self.config, self.implementation, self.gradient_checkpointing,
                        self.remat_policy, dtype=self.dtype, name="encoder")(x, mask)
        return _layer_norm(self.config, self.dtype, "final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """`__call__(input_ids (B, T) int, attention_mask=None)` -> last_hidden_state (B, T, D)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_implementation: Optional[str] = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        check_attention_implementation(self.attention_implementation)
        return CLIPTextTransformer(self.config, self.attention_implementation,
                                   self.gradient_checkpointing, self.remat_policy,
                                   dtype=self.dtype, name="text_model")(input_ids, attention_mask)
