"""Inference-time schedules: which training timesteps a sampler visits, and their noise levels.

Everything here runs once per call on the host, in float64 numpy; the jitted denoising loop only
indexes the resulting tables. The conventions (spacing names, offsets, Karras sigmas, sigma to
timestep interpolation) are those of the diffusers schedulers, so the same scheduler config
gives the same steps.
"""

from __future__ import annotations

import numpy as np

from sdjax.errors import ConfigError
from sdjax.schedule import betas_from_config

SPACINGS = ("leading", "trailing", "linspace")


def alphas_cumprod(config) -> np.ndarray:
    """alpha_bar_t for t = 0 .. num_train_timesteps - 1, computed in float32 as diffusers does
    (so that, e.g., the small sigmas near t = 0 carry the same rounding), returned as float64."""
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError("rescale_betas_zero_snr in the scheduler config is not supported yet")
    betas = betas_from_config(config).astype(np.float32)
    return np.cumprod(np.float32(1.0) - betas, dtype=np.float32).astype(np.float64)


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep_spacing {spacing!r} in the scheduler config is not supported "
                          f"(choose {', '.join(SPACINGS)})")
    return spacing


def spaced_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int,
                     integer: bool) -> np.ndarray:
    """`steps` timesteps, highest first, as DDIM (`integer`) and the Euler samplers (fractional
    with linspace spacing) place them (Table 2 of Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed")."""
    if spacing == "linspace":
        if integer:
            return np.linspace(0, num_train - 1, steps).round()[::-1]
        return np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(steps) * (num_train // steps)).round()[::-1] + steps_offset
    return np.arange(num_train, 0, -num_train / steps).round() - 1.0  # trailing


def sigmas_of(alphas_bar: np.ndarray) -> np.ndarray:
    """The noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of each training timestep
    (float32 arithmetic, as diffusers)."""
    a = alphas_bar.astype(np.float32)
    return np.sqrt((np.float32(1.0) - a) / a).astype(np.float64)


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linear in t between training timesteps."""
    return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """The noise levels of Karras et al. 2022 (eq. 5): evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0.0, 1.0, steps)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, interpolating linearly in log sigma
    between the two neighbouring training timesteps."""
    log_train = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    # Index of the last training log-sigma at or below each target (log sigma grows with t).
    low = np.clip(np.sum(log_sigma[None, :] >= log_train[:, None], axis=0) - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)
