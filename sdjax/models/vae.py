"""AutoencoderKL of Stable Diffusion in Flax linen (NCHW at the boundary, NHWC inside).

`encode(images)` returns the latent distribution (`.mean`, `.logvar`, `.sample(rng)`),
`decode(latents)` the images. `encode_nhwc` takes channels-last images, as the data loader
yields them (uint8, made [-1, 1] on the device by `normalize_pixels`), without a transpose.
Neither applies `scaling_factor`; callers multiply latents by `vae.scaling_factor` before the
UNet and divide before decoding, as diffusers' pipelines do.
Parameter names follow diffusers' former Flax VAE (mid-block attention as
`group_norm/query/key/value/proj_attn`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.attention import (AttentionChoice, AttentionSite, attention,
                                    check_attention_implementation)
from sdjax.models.config import VAEConfig
from sdjax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

VAE_EPS = 1e-6


def _split_16_bits(value: float) -> tuple:
    """value ~= hi + lo, each float32 with at most 16 significant bits."""
    def top(v):
        mantissa, exponent = np.frexp(v)
        return float(np.ldexp(np.round(mantissa * 2.0 ** 16), exponent - 16))
    hi = top(value)
    return np.float32(hi), np.float32(top(value - hi))


# 1 / 127.5 in two parts whose products with an integer of 8 bits are exact in float32.
_INV_HI, _INV_LO = _split_16_bits(1.0 / 127.5)


def normalize_pixels(pixels):
    """uint8 images (any layout) -> float32 in [-1, 1]: bit for bit numpy's
    `pixels.astype(np.float32) / 127.5 - 1.0`, the normalisation the loader did on the host
    before it moved into the step.

    Not written as a division: XLA turns a division by a constant into a multiplication by its
    rounded reciprocal, which differs from numpy in the last bit for most of the 256 values.
    x * hi and x * lo are exact (8 + 16 bits), so their sum is x / 127.5 rounded once, and that
    is the correctly rounded quotient for every x in 0..255: it needs only IEEE float32 multiply
    and add (an FMA changes nothing); tests/test_train_loop.py checks all 256 values under jit."""
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"pixels must be uint8 (as the data loader yields them), not {pixels.dtype}")
    x = pixels.astype(jnp.float32)
    return (x * _INV_HI + x * _INV_LO) - 1.0


def plan_attention(config: VAEConfig, requested: Optional[str], dtype,
                   platform: Optional[str] = None, latent_size: Optional[int] = None
                   ) -> Tuple[Optional[str], List[AttentionChoice]]:
    """Resolves an attention request for the VAE: (the module's `attention_implementation`, the
    choice made for each attention, in model order).

    The only attention is the encoder's and the decoder's mid-block self-attention: one head as
    wide as the last block (512 channels in SD's VAE, beyond cuDNN's head dims), over the latent's
    pixels (`latent_size` squared where known; used for the module's value only by "auto", as in
    the UNet's plan). A VAE without it (`mid_block_add_attention: false`) has no attention to run on a
    fused kernel: it gets "xla" for a cudnn/flash/auto request (so "cudnn" and "flash" are only
    ever set where the kernel takes the attention).
    """
    if not config.mid_block_add_attention:
        return ("xla" if requested in ("cudnn", "flash", "auto") else requested), []
    width = config.block_out_channels[-1]
    tokens = latent_size ** 2 if latent_size else None
    choices = [AttentionSite("vae", f"{part}/mid_block", 1, width, tokens, tokens).choose(
        requested, dtype, platform) for part in ("encoder", "decoder")]
    # As the UNet's: "auto" by the assumed size, an explicit kernel whatever the size.
    module = choices[0] if requested == "auto" else AttentionSite(
        "vae", "mid_block", 1, width).choose(requested, dtype, platform)
    return module.implementation, choices


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's latent distribution, NCHW. `logvar` is clipped to [-30, 20] as in diffusers."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng):
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a residual, as in the VAE's mid block."""

    channels: int
    groups: int
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        residual = x
        x = group_norm(self.groups, VAE_EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q = nn.Dense(c, dtype=self.dtype, name="query")(x)
        k = nn.Dense(c, dtype=self.dtype, name="key")(x)
        v = nn.Dense(c, dtype=self.dtype, name="value")(x)
        x = attention(q, k, v, 1, implementation=self.implementation)
        x = nn.Dense(c, dtype=self.dtype, name="proj_attn")(x)
        return x.reshape(b, h, w, c) + residual


class VAEMidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.channels, self.groups, self.implementation, dtype=self.dtype,
                             name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets_1")(x)


class EncoderBlock(nn.Module):
    out_channels: int
    groups: int
    num_layers: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class DecoderBlock(nn.Module):
    out_channels: int
    groups: int
    num_layers: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(channels[0], 3, self.dtype, "conv_in")(x)
        for i, c in enumerate(channels):
            x = EncoderBlock(c, groups, cfg.layers_per_block, i < len(channels) - 1,
                             dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(channels[-1], groups, cfg.mid_block_add_attention, self.implementation,
                        dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        x = conv(channels[0], 3, self.dtype, "conv_in")(z)
        x = VAEMidBlock(channels[0], groups, cfg.mid_block_add_attention, self.implementation,
                        dtype=self.dtype, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = DecoderBlock(c, groups, cfg.layers_per_block + 1, i < len(channels) - 1,
                             dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder. Use `apply(..., method="encode")` / `apply(..., method="decode")`."""

    config: VAEConfig
    dtype: Any = jnp.float32
    attention_implementation: Optional[str] = "xla"

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def setup(self):
        check_attention_implementation(self.attention_implementation)
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config, self.attention_implementation, dtype=self.dtype)
        self.quant_conv = nn.Conv(2 * latent, (1, 1), dtype=self.dtype)
        self.post_quant_conv = nn.Conv(latent, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(self.config, self.attention_implementation, dtype=self.dtype)

    def encode(self, images) -> DiagonalGaussian:
        """images: (B, 3, H, W) in [-1, 1] -> latent distribution over (B, latent, H/f, W/f)."""
        return self.encode_nhwc(jnp.transpose(images, (0, 2, 3, 1)))

    def encode_nhwc(self, images) -> DiagonalGaussian:
        """images: (B, H, W, 3) in [-1, 1] -> the same distribution as `encode` (NCHW latents)."""
        moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
        return DiagonalGaussian.from_moments(jnp.transpose(moments, (0, 3, 1, 2)))

    def decode(self, latents):
        """latents: (B, latent, h, w), unscaled -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype)
        x = self.decoder(self.post_quant_conv(z))
        return jnp.transpose(x, (0, 3, 1, 2))

    def __call__(self, images, rng=None):
        """Encode then decode (the posterior mean unless `rng` is given); used for init."""
        dist = self.encode(images)
        z = dist.mean if rng is None else dist.sample(rng)
        return self.decode(z)
