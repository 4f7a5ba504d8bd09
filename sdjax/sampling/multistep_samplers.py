"""Multistep exponential integrators in log-SNR: DPM-Solver++(2M)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.solver import (COMMON, OTHER_SAMPLERS, THRESHOLDING, SamplerSpec, Scheduler,
                                   dynamic_threshold, either, sigma_ramp, table, thresholding_of)
from sdjax.sampling.timesteps import (alphas_cumprod, interpolate_sigmas, lu_sigmas,
                                      sigma_to_timestep, sigmas_of)


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver on data predictions,
    first order at the first step and (with a zero final sigma) the last. `dpmpp_2m_karras` puts
    the steps at Karras noise levels; `dpmpp_2m` at the config's (spaced timesteps, or Lu,
    exponential or beta noise levels). Data predictions are dynamically thresholded when the
    config asks (thresholding).

    In sigma terms, with a = 1/sqrt(sigma^2+1) and lambda = log(1/sigma), each step is
    x_next = A x + B0 D_i + B1 D_{i-1}, where D are the data predictions; A, B0, B1 per step are
    host tables."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        alpha_bar = alphas_cumprod(settings, lift_terminal=True)
        train_sigmas = sigmas_of(alpha_bar)
        n, offset = settings["num_train_timesteps"], settings["steps_offset"]
        lambdas = 0.5 * (np.log(alpha_bar) - np.log(1 - alpha_bar))
        last = n - int(np.searchsorted(lambdas[::-1], settings["lambda_min_clipped"]))
        spacing = settings["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + offset
        else:
            timesteps = np.arange(last, 0, -n / steps).round() - 1
        ramp = sigma_ramp(settings)
        if settings["use_lu_lambdas"] and not settings["use_karras_sigmas"]:
            # Evenly spaced in log-SNR (Lu et al.) between the extreme training sigmas; this
            # comes before exponential and beta levels in diffusers.
            ramp = lu_sigmas
            sigmas = lu_sigmas(train_sigmas, steps)
        elif ramp is not None:  # between the config's sigma_max / sigma_min, or the training ones
            sigmas = ramp(either(settings["sigma_max"], train_sigmas[-1]),
                          either(settings["sigma_min"], train_sigmas[0]), steps)
        if ramp is not None:
            timesteps = sigma_to_timestep(sigmas, train_sigmas)
            # Karras and Lu levels go to the nearest timestep but for a cosine schedule; all are
            # then truncated to whole timesteps.
            rounded = settings["use_karras_sigmas"] or settings["use_lu_lambdas"]
            if rounded and settings["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        final_zero = settings["final_sigmas_type"] == "zero"
        sigmas = np.append(sigmas, 0.0 if final_zero else train_sigmas[0]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self._build_tables(sigmas.astype(np.float64), settings, final_zero)

    def _build_tables(self, sigmas, settings, final_zero):
        count = len(self.timesteps)
        alpha = 1.0 / np.sqrt(sigmas ** 2 + 1)
        sigma_t = sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)  # +inf at a zero final sigma
        if self.prediction_type == "epsilon":
            self._x0_sample, self._x0_output = 1.0 / alpha[:-1], -sigma_t[:-1] / alpha[:-1]
        else:
            self._x0_sample, self._x0_output = alpha[:-1], -sigma_t[:-1]
        first_order_last = settings["euler_at_final"] or final_zero or (
            settings["lower_order_final"] and count < 15)
        a_coef, b0, b1 = np.zeros(count), np.zeros(count), np.zeros(count)
        for i in range(count):
            h = lam[i + 1] - lam[i]
            a_coef[i] = sigma_t[i + 1] / sigma_t[i]
            phi = alpha[i + 1] * (np.exp(-h) - 1.0)  # exp(-inf) = 0 at the end
            if i == 0 or (i == count - 1 and first_order_last):
                b0[i] = -phi
                continue
            r = (lam[i] - lam[i - 1]) / h
            if settings["solver_type"] == "midpoint":
                b0[i], b1[i] = -phi - 0.5 * phi / r, 0.5 * phi / r
            else:  # heun
                c = alpha[i + 1] * ((np.exp(-h) - 1.0) / h + 1.0) / r
                b0[i], b1[i] = -phi + c, -c
        self._a, self._b0, self._b1 = a_coef, b0, b1
        self._threshold = thresholding_of(settings)

    def init_state(self, sample):
        return {"previous_x0": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x0 = table(self._x0_sample)[i] * sample + table(self._x0_output)[i] * model_output
        if self._threshold is not None:
            x0 = dynamic_threshold(x0, *self._threshold)
        prev = (table(self._a)[i] * sample + table(self._b0)[i] * x0
                + table(self._b1)[i] * state["previous_x0"])
        return prev, {"previous_x0": x0}


# Solver types DPMSolverMultistepScheduler takes from other solvers' configs and runs as midpoint.
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")


def _dpm_prepare(s):
    if s["use_karras_sigmas"]:  # the Karras levels come first in diffusers
        s.update(use_lu_lambdas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    if s["solver_type"] in _MIDPOINT_ALIASES:
        s["solver_type"] = "midpoint"
    return s


def _dpm_refusal(s):
    where = "in the scheduler config"
    if s["use_flow_sigmas"]:
        return (f"use_flow_sigmas=True {where} is for flow-matching models, which the sdjax "
                "samplers do not run: use a config with use_flow_sigmas false")
    if s["solver_type"] not in ("midpoint", "heun"):
        return (f"solver_type={s['solver_type']!r} {where} is not one "
                "DPMSolverMultistepScheduler knows: set it to midpoint or heun")
    if s["variance_type"] in ("learned", "learned_range") and s["prediction_type"] == "epsilon":
        return (f"variance_type={s['variance_type']!r} {where} makes "
                "DPMSolverMultistepScheduler use only the first 3 channels of the model's "
                "output (a model that also predicts its variance), which sdjax's DPM-Solver++ "
                f"does not: {OTHER_SAMPLERS}, or set variance_type to null if the model predicts "
                "no variance")
    return None


# The algorithm_type and solver_order are not read: the name fixes them (DPM-Solver++, second
# order). Karras, exponential and beta noise levels read a config's sigma_min / sigma_max, as an
# EulerDiscreteScheduler config holds them.
_DPM_DEFAULTS = dict(
    COMMON, **THRESHOLDING, timestep_spacing="linspace", solver_type="midpoint",
    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
    use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
    variance_type=None, rescale_betas_zero_snr=False)
_DPM_BORROWED = dict(sigma_min=None, sigma_max=None)

SAMPLERS = {
    # The config's use_karras_sigmas decides, as DPMSolverMultistepScheduler.from_config does.
    "dpmpp_2m": SamplerSpec(DPMSolverPP2M, "DPMSolverMultistepScheduler", _DPM_DEFAULTS,
                            borrowed=_DPM_BORROWED, prepare=_dpm_prepare, refusal=_dpm_refusal),
    "dpmpp_2m_karras": SamplerSpec(
        DPMSolverPP2M, "DPMSolverMultistepScheduler", _DPM_DEFAULTS, borrowed=_DPM_BORROWED,
        fixed=dict(use_karras_sigmas=True), diffusers_options=dict(use_karras_sigmas=True),
        prepare=_dpm_prepare, refusal=_dpm_refusal),
}
