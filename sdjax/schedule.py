"""The DDPM noise schedule of a scheduler config, and the training targets built on it."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError


def betas_from_config(config: Mapping) -> np.ndarray:
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ConfigError(f"beta_schedule {kind!r} in the scheduler config is not supported "
                      "(linear, scaled_linear, squaredcos_cap_v2)")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) per training timestep (float32 tables)."""

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: Mapping, prediction_type=None) -> "NoiseSchedule":
        if config.get("rescale_betas_zero_snr"):
            raise ConfigError("rescale_betas_zero_snr in the scheduler config is not supported yet")
        betas = betas_from_config(config)
        prediction = prediction_type or config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
        return cls(np.cumprod(1.0 - betas).astype(np.float32), prediction)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficients(self, timesteps, ndim: int):
        a = jnp.asarray(self.alphas_cumprod)[timesteps]
        shape = (-1,) + (1,) * (ndim - 1)
        return jnp.sqrt(a).reshape(shape), jnp.sqrt(1.0 - a).reshape(shape)

    def add_noise(self, x0, noise, timesteps):
        sa, s1a = self._coefficients(timesteps, x0.ndim)
        return sa * x0 + s1a * noise

    def target(self, x0, noise, timesteps):
        """What the UNet learns to predict: the noise, or the velocity sqrt(a) eps - sqrt(1-a) x0."""
        if self.prediction_type == "epsilon":
            return noise
        sa, s1a = self._coefficients(timesteps, x0.ndim)
        return sa * noise - s1a * x0

    def snr(self, timesteps):
        a = jnp.asarray(self.alphas_cumprod)[timesteps]
        return a / (1.0 - a)

    def min_snr_weights(self, timesteps, gamma: float, v_floor: bool = False):
        """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' scripts apply them:
        min(SNR, gamma) / SNR for epsilon targets; for v-prediction, min(SNR, gamma) / (SNR + 1)
        (train_text_to_image*.py), or with `v_floor` min(SNR, gamma) / SNR + 1
        (train_dreambooth.py: "floored to an SNR weight of one")."""
        snr = self.snr(timesteps)
        clipped = jnp.minimum(snr, gamma)
        if self.prediction_type != "v_prediction":
            return clipped / snr
        return clipped / snr + 1.0 if v_floor else clipped / (snr + 1.0)
