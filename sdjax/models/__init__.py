"""Flax linen models of Stable Diffusion 1.x/2.x: UNet, VAE and CLIP text encoder."""

from sdjax.models.clip import CLIPTextModel
from sdjax.models.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "DiagonalGaussian",
           "UNet2DConditionModel", "UNetConfig", "VAEConfig"]
