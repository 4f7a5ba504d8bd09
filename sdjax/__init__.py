"""sdjax: fine-tune Stable Diffusion in JAX/Flax and hand the result back to diffusers."""

from sdjax.errors import ConfigError, SdjaxError, WeightsError
from sdjax.pipeline import StableDiffusion

__all__ = ["ConfigError", "SdjaxError", "StableDiffusion", "WeightsError"]
__version__ = "0.1.0"
