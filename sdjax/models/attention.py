"""Attention: the shared kernel call and the UNet's spatial transformer.

All attention goes through `jax.nn.dot_product_attention`, whose implementation is selectable:
"xla" (default; runs everywhere, including CPU), "cudnn" (fused flash attention on NVIDIA GPUs,
fp16/bf16 only), or None to let JAX choose. Logits and softmax are computed in float32 by every
implementation, which is what diffusers' `upcast_attention` asks for, so that option needs no
separate code path here.

cuDNN takes only some attention shapes and dtypes, so a `cudnn` request is resolved per call site
when the models are built (`choose_attention_implementation`, applied by each model's
`plan_attention` and by `sdjax.pipeline.build_models`); the modules themselves call the kernel
they are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError
from sdjax.models.layers import group_norm, maybe_remat

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", None)


def check_attention_implementation(implementation):
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention implementation {implementation!r}; "
                          "choose 'xla', 'cudnn' or None (JAX picks)")


# --- which kernel each attention call site gets -------------------------------------------------
#
# What `jax.nn.dot_product_attention(..., implementation="cudnn")` accepts, read in jax 0.10.2
# (jax/_src/nn/functions.py `dot_product_attention`, which hands the "cudnn" case to
# jax/_src/cudnn/fused_attention_stablehlo.py `dot_product_attention` -> `combine_bias_and_mask`,
# `check_layout`, and `check_is_flash_attention` in `_dot_product_attention_fwd` / `_fwd_rule`):
#   - dtype: q, k, v float16 or bfloat16 (`check_layout` also lets float8_e4m3fn/e5m2 through,
#     but fp8 only works through the separate `use_fp8=True` path with scaling parameters, which
#     jax.nn never takes). float32 raises NotImplementedError; a boolean mask with a float32
#     query already raises ValueError in `get_large_negative_number`.
#   - head dim: a multiple of 8 and <= 128; <= 256 only on compute capability >= 9.0 (Hopper and
#     later). Different q/k and v head dims ("MLA") need cuDNN >= 9.10 and Hopper. Compute
#     capability 10.3 needs cuDNN >= 9.11.
#   - masks: `is_causal` becomes cuDNN's CAUSAL mask type (XLA builds `tril(ones(T, S))`);
#     query/key_value_seq_lengths become PADDING(_CAUSAL). A boolean `mask` is turned into an
#     additive bias, and any bias must be (B|1, N|1, T, S) exactly: no broadcasting over the two
#     sequence axes, so a (B, 1, 1, S) key-padding mask raises ValueError. With a bias, training
#     (the custom-VJP forward rule) needs even T and S. local_window_size: left windows only.
#   - sequence lengths: otherwise none (any T and S, T != S allowed for cross-attention).
#   - heads: none beyond the generic check that query heads are a multiple of key/value heads.
# All of these raise while tracing (eval_shape, jit), as does the very first step,
# `check_cudnn_version`, which raises RuntimeError("cuDNN is not detected.") on a jaxlib without
# CUDA (CPU). What JAX does not check is the GPU itself: cuDNN documents its fused flash attention
# for Ampere (sm80) and later, and an older GPU fails only when XLA compiles.
#
# The rules below keep the side that works on every cuDNN 9 GPU: head dim <= 128 (not Hopper's
# 256), fp16/bf16 only, no explicit mask or bias arrays, and causal masks only with equal query
# and key lengths (so how an implementation aligns a causal mask when T != S never matters).

CUDNN_DTYPES = ("float16", "bfloat16")
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8


def choose_attention_implementation(requested: Optional[str], dtype, head_dim: int, heads: int = 1,
                                    q_len: Optional[int] = None, kv_len: Optional[int] = None, *,
                                    is_causal: bool = False,
                                    has_mask: bool = False) -> Tuple[Optional[str], str]:
    """The implementation one attention call site should use, and why a `cudnn` request fell back.

    Returns `(implementation, reason)`. Only a `"cudnn"` request is ever changed: to `"xla"` when
    the call site has a shape or dtype that cuDNN's fused attention cannot take (see the rules
    above), with `reason` saying which; otherwise `reason` is "". `"xla"` and `None` (JAX picks)
    come back unchanged. Pure: it looks at its arguments only, never at the devices.

    requested: "xla", "cudnn" or None. dtype: the compute dtype of q, k and v. head_dim, heads:
    per-head width and head count. q_len, kv_len: query and key lengths where fixed (None when
    they depend on the input, as the UNet's image tokens do). is_causal: the call passes
    `is_causal=True`. has_mask: the call passes an explicit mask or bias array.
    """
    check_attention_implementation(requested)
    if head_dim < 1 or heads < 1:
        raise ValueError(f"attention needs at least one head of width >= 1, got {heads} x {head_dim}")
    if requested != "cudnn":
        return requested, ""
    name = np.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        return "xla", f"{name}; cuDNN takes float16/bfloat16"
    if head_dim > CUDNN_MAX_HEAD_DIM:
        return "xla", f"head dim {head_dim} > {CUDNN_MAX_HEAD_DIM}"
    if head_dim % CUDNN_HEAD_DIM_MULTIPLE:
        return "xla", f"head dim {head_dim} not a multiple of {CUDNN_HEAD_DIM_MULTIPLE}"
    if has_mask:
        return "xla", "explicit attention mask"
    if is_causal and q_len is not None and kv_len is not None and q_len != kv_len:
        return "xla", f"causal mask with {q_len} queries and {kv_len} keys"
    return "cudnn", ""


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention call site of a model, as the kernel sees it (see `choose_attention_implementation`)."""

    component: str  # "unet", "vae", "text_encoder"
    name: str  # where in the component, e.g. "down_blocks_0" or "encoder/mid_block"
    heads: int
    head_dim: int
    q_len: Optional[int] = None
    kv_len: Optional[int] = None
    is_causal: bool = False
    has_mask: bool = False

    def choose(self, requested: Optional[str], dtype) -> "AttentionChoice":
        implementation, reason = choose_attention_implementation(
            requested, dtype, self.head_dim, self.heads, self.q_len, self.kv_len,
            is_causal=self.is_causal, has_mask=self.has_mask)
        return AttentionChoice(self, implementation, reason)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    site: AttentionSite
    implementation: Optional[str]
    reason: str = ""  # why a cudnn request became xla; "" when the request was kept


def _join(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def attention_plan_message(requested: Optional[str], choices: Iterable[AttentionChoice]) -> Optional[str]:
    """One line saying which modules run cuDNN attention and which fall back to XLA, and why.

    None unless cudnn was requested. A component whose sites all got the same choice is named
    alone; otherwise its sites are listed.
    """
    if requested != "cudnn":
        return None
    by_component = {}
    for choice in choices:
        by_component.setdefault(choice.site.component, []).append(choice)
    groups = {}  # (implementation, reason) -> labels, in model order
    for component, component_choices in by_component.items():
        kinds = {}
        for choice in component_choices:
            kinds.setdefault((choice.implementation, choice.reason), []).append(choice.site.name)
        for kind, names in kinds.items():
            label = component if len(kinds) == 1 else f"{component}[{', '.join(names)}]"
            groups.setdefault(kind, []).append(label)
    on_cudnn: List[str] = []
    on_xla: List[str] = []
    for (implementation, reason), labels in groups.items():
        if implementation == "cudnn":
            on_cudnn += labels
        else:
            on_xla.append(f"{_join(labels)} ({reason})")
    parts = [f"cuDNN for {_join(on_cudnn) if on_cudnn else 'no module'}"]
    if on_xla:
        parts.append(f"XLA for {_join(on_xla)}")
    return "attention_implementation=cudnn: " + "; ".join(parts)


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
