"""Convolutional building blocks shared by the UNet and the VAE (NHWC inside)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError

# What a remat'd block keeps from its forward pass for the backward one (the rest is recomputed):
#   nothing_saveable                  only the block's inputs (least memory, most recompute)
#   dots_with_no_batch_dims_saveable  + the outputs of dense layers (q/k/v/out projections,
#                                     feed-forward, CLIP's MLP); not convolutions, not q.k / p.v
#   dots_saveable                     + every matmul and convolution output
#   everything_saveable               everything: as if there were no remat
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
# Short names for --gradient_checkpointing_policy.
REMAT_POLICY_ALIASES = {"nothing": "nothing_saveable", "dense": "dots_with_no_batch_dims_saveable",
                        "dots": "dots_saveable", "everything": "everything_saveable"}


def remat_policy_name(name: str) -> str:
    """JAX's name of a policy given by its own or its short name (REMAT_POLICY_ALIASES)."""
    name = REMAT_POLICY_ALIASES.get(name, name)
    if name not in REMAT_POLICIES:
        choices = ", ".join(f"{short} ({long})" for short, long in REMAT_POLICY_ALIASES.items())
        raise ConfigError(f"unknown gradient checkpointing policy {name!r}; choose one of "
                          f"{choices}")
    return name


def maybe_remat(module_cls, enabled: bool, policy: str = "nothing_saveable", static_argnums=()):
    """`module_cls` wrapped in `nn.remat` when `enabled` (parameter names do not change)."""
    if not enabled:
        return module_cls
    policy = REMAT_POLICIES[remat_policy_name(policy)]
    return nn.remat(module_cls, policy=policy, static_argnums=static_argnums)


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance, as PyTorch computes it: the one-pass form loses digits on large means.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False,
                        name=name)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = None):
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D: GroupNorm-SiLU-conv twice, optional time embedding, 1x1 shortcut."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb: Optional[jax.Array] = None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut", padding="VALID")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=1` pads all sides (UNet); `padding=0` pads right/bottom (VAE)."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


def nearest_resize(x, size: tuple):
    """NHWC nearest-neighbour resize with PyTorch's `interpolate(mode="nearest")` indexing:
    output i reads input floor(i * in / out)."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            index = np.minimum(np.floor(np.arange(out, dtype=np.float32)
                                        * np.float32(n / out)).astype(np.int32), n - 1)
            x = jnp.take(x, index, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `size`: the skip connection's size when the input
    side was not a multiple of the UNet's downsampling) followed by a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, size: Optional[tuple] = None):
        x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return conv(self.channels, 3, self.dtype, "conv")(x)
