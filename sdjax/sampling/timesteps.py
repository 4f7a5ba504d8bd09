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


def alphas_cumprod(config, lift_terminal: bool = False) -> np.ndarray:
    """alpha_bar_t for t = 0 .. num_train_timesteps - 1, rounded as diffusers' float32 ones (so
    that, e.g., the small sigmas near t = 0 carry the same rounding), returned as float64.

    With `rescale_betas_zero_snr` the betas are first rescaled to a zero terminal SNR (Lin et al.
    2023), so alpha_bar is exactly 0 at the last timestep; `lift_terminal` then sets it to 2**-24
    instead, as diffusers' Euler and DPM-Solver schedulers do to keep their largest sigma finite
    (DDIM keeps the 0)."""
    betas = betas_from_config(config).astype(np.float32)
    zero_snr = bool(config.get("rescale_betas_zero_snr"))
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alpha_bar = _cumprod32(np.float32(1.0) - betas)
    if zero_snr and lift_terminal:
        alpha_bar[-1] = np.float32(2.0 ** -24)
    return alpha_bar.astype(np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose sqrt(alpha_bar) is shifted to reach 0 at the last timestep and rescaled to keep
    its value at the first (Lin et al. 2023, Algorithm 1), in float32 like diffusers."""
    one = np.float32(1.0)
    root = np.sqrt(_cumprod32(one - betas.astype(np.float32)))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (one - alphas).astype(np.float32)


def _cumprod32(values: np.ndarray) -> np.ndarray:
    """Cumulative product of float32 values as torch computes it on the CPU: accumulated in
    float64, rounded to float32."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep_spacing={spacing!r} in the scheduler config is not a spacing "
                          f"diffusers' schedulers know: set it to one of {', '.join(SPACINGS)}")
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


def exponential_sigmas(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """`steps` noise levels evenly spaced in log sigma, from sigma_max down to sigma_min (the
    "exponential" schedule; also the Lu et al. 2022 schedule, evenly spaced in log-SNR)."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))


def lu_sigmas(train_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """`steps` noise levels evenly spaced in log-SNR (Lu et al. 2022, DPM-Solver++), from the
    largest training sigma down to the smallest: the exponential schedule, with the end points'
    logs taken in float32 as diffusers does."""
    logs = np.log(np.asarray(train_sigmas, np.float32)).astype(np.float64)
    return np.exp(np.linspace(logs[-1], logs[0], steps))


def beta_sigmas(sigma_max: float, sigma_min: float, steps: int, a: float = 0.6,
                b: float = 0.6) -> np.ndarray:
    """The noise levels of Lee et al. 2024 ("Beta Sampling is All You Need"): sigma_min plus the
    range times the Beta(a, b) quantiles of evenly spaced levels from 1 down to 0."""
    from scipy.special import betaincinv

    levels = betaincinv(a, b, 1.0 - np.linspace(0.0, 1.0, steps))
    return sigma_min + levels * (sigma_max - sigma_min)


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, interpolating linearly in log sigma
    between the two neighbouring training timesteps (the training log sigmas and their
    differences in float32, as diffusers has them, which decides on which side of a whole
    timestep a sigma at a training one falls)."""
    log_train = np.log(np.asarray(train_sigmas, np.float32))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    # Index of the last training log-sigma at or below each target (log sigma grows with t).
    low = np.clip(np.sum(log_sigma[None, :] >= log_train[:, None], axis=0) - 1, 0, len(log_train) - 2)
    gap = (log_train[low] - log_train[low + 1]).astype(np.float64)
    w = np.clip((log_train[low].astype(np.float64) - log_sigma) / gap, 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)
