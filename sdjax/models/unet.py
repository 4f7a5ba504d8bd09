"""UNet2DConditionModel of Stable Diffusion 1.x/2.x in Flax linen.

Parameter names follow diffusers' former Flax UNet (`down_blocks_0/attentions_1/...`), so the
PyTorch key `down_blocks.0.attentions.1.proj_in.weight` maps to the path
`down_blocks_0/attentions_1/proj_in/kernel`. Public inputs and outputs are NCHW like diffusers;
everything inside is NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import ConfigError
from sdjax.models.attention import (AttentionChoice, AttentionSite, Transformer2DModel,
                                    check_attention_implementation)
from sdjax.models.config import UNetConfig
from sdjax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm, maybe_remat


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
    """Sinusoidal timestep features, as diffusers' `get_timestep_embedding` (float32)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


def level_sides(config: UNetConfig, latent_size: int) -> List[int]:
    """The latent side at each block level (each down block but the last halves it, rounding up)."""
    sides = [latent_size]
    for _ in config.block_out_channels[1:]:
        sides.append(-(-sides[-1] // 2))
    return sides


def plan_attention(config: UNetConfig, requested: Optional[str], dtype,
                   platform: Optional[str] = None, latent_size: Optional[int] = None,
                   text_len: Optional[int] = None) -> Tuple[Any, List[AttentionChoice]]:
    """Resolves an attention request per block level: (the module's `attention_implementation`,
    the choice made for each attention block's self- and cross-attention, in model order).

    All attention of one level (self- and cross-attention of the down block, the up block, and
    at the last level the mid block) has the same heads and head dim, so one implementation per
    level. The value is a single implementation where all levels agree, else a tuple with one
    entry per level. The sites assume `latent_size` (a latent side, e.g. 64 for 512 px; None:
    unknown) and `text_len` text tokens. An explicit "flash" is kept for every level whose head dim
    and dtype fit, whatever the lengths: what the kernel cannot take at the lengths of a call (the
    text keys, small latents) is what `attention()` sends to XLA when traced. "auto" decides per
    level at the assumed size, by the level's self-attention (flash only where it pays). No mask
    is used and nothing is causal. `platform`: as `choose_attention_implementation`.
    """
    channels, heads = config.block_out_channels, config.heads_per_block
    last = len(channels) - 1
    per_level = [AttentionSite("unet", f"level {i}", heads[i], channels[i] // heads[i])
                 for i in range(len(channels))]
    names = [(f"down_blocks_{i}", i) for i, t in enumerate(config.down_block_types)
             if t == "CrossAttnDownBlock2D"]
    names.append(("mid_block", last))
    names += [(f"up_blocks_{i}", last - i) for i, t in enumerate(config.up_block_types)
              if t == "CrossAttnUpBlock2D"]
    sides = level_sides(config, latent_size) if latent_size else [None] * len(channels)
    choices = []
    for name, level in names:
        tokens = sides[level] ** 2 if sides[level] else None
        site = dataclasses.replace(per_level[level], name=name, q_len=tokens, kv_len=tokens)
        choices.append(site.choose(requested, dtype, platform))
        choices.append(dataclasses.replace(site, kv_len=text_len, cross=True).choose(
            requested, dtype, platform))
    if requested == "auto":
        per_level = [dataclasses.replace(site, q_len=side * side, kv_len=side * side) if side
                     else site for site, side in zip(per_level, sides)]
    levels = tuple(site.choose(requested, dtype, platform).implementation for site in per_level)
    return (levels[0] if len(set(levels)) == 1 else levels), choices


class _UNetPart(nn.Module):
    """Shared settings of the UNet's blocks; subclasses build the resnets and transformers.

    `attention_implementation` is one implementation for all attention, or a tuple with one per
    block level (`block_out_channels` order; the mid block uses the last), as `plan_attention`
    resolves a request. The UNet hands each block its level's entry.
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    attention_implementation: Any = "xla"
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"

    def resnet(self, out_channels, name, scale=1.0):
        cls = maybe_remat(ResnetBlock2D, self.gradient_checkpointing, self.remat_policy)
        cfg = self.config
        return cls(out_channels, cfg.norm_num_groups, cfg.norm_eps, output_scale_factor=scale,
                   dtype=self.dtype, name=name)

    def transformer(self, channels, heads, name):
        cfg = self.config
        return Transformer2DModel(
            channels, heads, cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
            implementation=self.attention_implementation,
            gradient_checkpointing=self.gradient_checkpointing, remat_policy=self.remat_policy,
            dtype=self.dtype, name=name)

    def settings(self, level: Optional[int] = None):
        """The fields a block shares with its parent; with `level`, that level's attention."""
        implementation = self.attention_implementation
        if level is not None and isinstance(implementation, tuple):
            implementation = implementation[level]
        return dict(config=self.config, dtype=self.dtype,
                    attention_implementation=implementation,
                    gradient_checkpointing=self.gradient_checkpointing,
                    remat_policy=self.remat_policy)

    def check_attention_implementation(self):
        implementation = self.attention_implementation
        if not isinstance(implementation, tuple):
            check_attention_implementation(implementation)
            return
        if len(implementation) != len(self.config.block_out_channels):
            raise ConfigError(f"attention_implementation has {len(implementation)} entries for "
                              f"{len(self.config.block_out_channels)} UNet block levels")
        for entry in implementation:
            check_attention_implementation(entry)


class DownBlock(_UNetPart):
    """CrossAttnDownBlock2D (heads set) or DownBlock2D (heads None); returns (x, skip tensors)."""

    out_channels: int = 0
    heads: Optional[int] = None
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.config.layers_per_block):
            x = self.resnet(self.out_channels, f"resnets_{j}")(x, temb)
            if self.heads is not None:
                x = self.transformer(self.out_channels, self.heads, f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 1, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_UNetPart):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        channels, heads = cfg.block_out_channels[-1], cfg.heads_per_block[-1]
        x = self.resnet(channels, "resnets_0", cfg.mid_block_scale_factor)(x, temb)
        x = self.transformer(channels, heads, "attentions_0")(x, context)
        return self.resnet(channels, "resnets_1", cfg.mid_block_scale_factor)(x, temb)


class UpBlock(_UNetPart):
    """CrossAttnUpBlock2D (heads set) or UpBlock2D (heads None); takes its skips last-first."""

    out_channels: int = 0
    heads: Optional[int] = None
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        for j in range(self.config.layers_per_block + 1):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(self.out_channels, f"resnets_{j}")(x, temb)
            if self.heads is not None:
                x = self.transformer(self.out_channels, self.heads, f"attentions_{j}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNet2DConditionModel(_UNetPart):
    """Noise/velocity predictor. `__call__(sample NCHW, timesteps, encoder_hidden_states)` -> NCHW."""

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        self.check_attention_implementation()
        cfg = self.config
        channels = cfg.block_out_channels
        heads = cfg.heads_per_block
        last = len(channels) - 1

        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, (sample.shape[0],))
        t = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(channels[0] * 4, dtype=self.dtype, name="time_embedding")(
            t.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(channels[0], 3, self.dtype, "conv_in")(x)

        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock(
                **self.settings(i), out_channels=channels[i],
                heads=heads[i] if block_type == "CrossAttnDownBlock2D" else None,
                add_downsample=i < last, name=f"down_blocks_{i}")(x, temb, context)
            skips += block_skips

        x = MidBlock(**self.settings(last), name="mid_block")(x, temb, context)

        per_up_block = cfg.layers_per_block + 1
        for i, block_type in enumerate(cfg.up_block_types):
            block_skips, skips = skips[-per_up_block:], skips[:-per_up_block]
            # Upsample to the next skip's size: 2x, except after an odd side was downsampled.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = UpBlock(
                **self.settings(last - i), out_channels=channels[last - i],
                heads=heads[last - i] if block_type == "CrossAttnUpBlock2D" else None,
                add_upsample=i < last, name=f"up_blocks_{i}")(x, block_skips, temb, context, size)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        x = conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))
