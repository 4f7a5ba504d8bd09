"""Attention: the shared kernel call and the UNet's spatial transformer.

All attention goes through `jax.nn.dot_product_attention`, whose implementation is selectable:
"xla" (default; runs everywhere, including CPU), "cudnn" (fused flash attention on NVIDIA GPUs,
fp16/bf16 only), or None to let JAX choose. Logits and softmax are computed in float32 by every
implementation, which is what diffusers' `upcast_attention` asks for, so that option needs no
separate code path here.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.errors import ConfigError
from sdjax.models.layers import group_norm, maybe_remat

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", None)


def check_attention_implementation(implementation):
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention implementation {implementation!r}; "
                          "choose 'xla', 'cudnn' or None (JAX picks)")


def attention(q, k, v, heads: int, *, mask=None, is_causal: bool = False,
              implementation: Optional[str] = "xla"):
    """Multi-head attention on (B, T, heads*head_dim) inputs; returns (B, T, heads*head_dim)."""
    b, t, inner = q.shape
    s = k.shape[1]
    head_dim = inner // heads
    q = q.reshape(b, t, heads, head_dim)
    k = k.reshape(b, s, heads, head_dim)
    v = v.reshape(b, s, heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=implementation)
    return out.reshape(b, t, inner)


class CrossAttention(nn.Module):
    """diffusers' Attention as the SD UNet uses it: bias-free q/k/v, biased output projection."""

    query_dim: int
    heads: int
    head_dim: int
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        out = attention(q, k, v, self.heads, implementation=self.implementation)
        return nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    inner_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.inner_dim * 2, dtype=self.dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    dim: int
    heads: int
    head_dim: int
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        attn = dict(query_dim=self.dim, heads=self.heads, head_dim=self.head_dim,
                    implementation=self.implementation, dtype=self.dtype)
        x = x + CrossAttention(**attn, name="attn1")(norm("norm1")(x))
        x = x + CrossAttention(**attn, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in (1x1 conv or linear), blocks, project out, residual."""

    channels: int
    heads: int
    groups: int
    use_linear_projection: bool = False
    implementation: Optional[str] = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.channels
        residual = x
        x = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, inner)
        block_cls = maybe_remat(BasicTransformerBlock, self.gradient_checkpointing, self.remat_policy)
        x = block_cls(inner, self.heads, inner // self.heads, implementation=self.implementation,
                      dtype=self.dtype, name="transformer_blocks_0")(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, inner))
        return x + residual
