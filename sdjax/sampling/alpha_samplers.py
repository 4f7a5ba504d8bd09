"""Samplers that step between training timesteps in terms of alpha_bar: DDIM, PLMS (PNDM) and
ancestral DDPM."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.solver import (COMMON, OTHER_SAMPLERS, THRESHOLDING, SamplerSpec, Scheduler,
                                   dynamic_threshold, table, thresholding_of)
from sdjax.sampling.timesteps import alphas_cumprod, spaced_timesteps


class DDIM(Scheduler):
    """Deterministic DDIM (Song et al. 2021, eta = 0); the predicted clean sample is clipped
    (clip_sample) or dynamically thresholded (thresholding, which takes precedence)."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        alpha_bar = alphas_cumprod(settings)
        n = settings["num_train_timesteps"]
        t = spaced_timesteps(settings["timestep_spacing"], n, steps, settings["steps_offset"],
                             integer=True).astype(np.int64)
        prev = t - n // steps
        final = 1.0 if settings["set_alpha_to_one"] else alpha_bar[0]
        a, a_prev = alpha_bar[t], np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], final)
        self.timesteps = t
        self._sqrt_a, self._sqrt_1ma = np.sqrt(a), np.sqrt(1 - a)
        self._sqrt_a_prev, self._sqrt_1ma_prev = np.sqrt(a_prev), np.sqrt(1 - a_prev)
        self._clip = settings["clip_sample_range"] if settings["clip_sample"] else None
        self._threshold = thresholding_of(settings)

    def step(self, state, i, model_output, sample, noise=None):
        sa, s1a = table(self._sqrt_a)[i], table(self._sqrt_1ma)[i]
        if self.prediction_type == "epsilon":
            x0, eps = (sample - s1a * model_output) / sa, model_output
        else:
            x0, eps = sa * sample - s1a * model_output, sa * model_output + s1a * sample
        if self._threshold is not None:
            x0 = dynamic_threshold(x0, *self._threshold)
        elif self._clip is not None:
            x0 = jnp.clip(x0, -self._clip, self._clip)
        return table(self._sqrt_a_prev)[i] * x0 + table(self._sqrt_1ma_prev)[i] * eps, state


class PLMS(Scheduler):
    """Pseudo linear multistep (Liu et al. 2022), diffusers' PNDMScheduler with skip_prk_steps:
    an Adams-Bashforth combination of up to four past noise predictions, warmed up by one
    second-order (Heun-like) step that re-evaluates the first timestep.

    The ragged history of the reference is a fixed buffer of four outputs (oldest first); the
    host precomputes, per evaluation, whether the new output enters it, the weights over
    [buffer..., new output], and which timesteps the update goes between."""

    _ADAMS_BASHFORTH = {1: [1.0], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12],
                        4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        alpha_bar = alphas_cumprod(settings)
        n = settings["num_train_timesteps"]
        spacing, ratio = settings["timestep_spacing"], n // steps
        if spacing == "linspace":
            base = np.linspace(0, n - 1, steps).round()
        elif spacing == "leading":
            base = (np.arange(steps) * ratio).round() + settings["steps_offset"]
        else:
            base = np.round(np.arange(n, 0, -n / steps))[::-1] - 1
        base = base.astype(np.int64)
        evals = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        final = 1.0 if settings["set_alpha_to_one"] else alpha_bar[0]

        push, weights, from_saved, save, t_from, t_to = [], [], [], [], [], []
        history = 0
        for counter, t in enumerate(evals):
            t, prev = int(t), int(t) - ratio
            pushed = counter != 1
            if pushed:
                history = min(history + 1, 4)
            else:  # the warm-up's second evaluation: redo the first step from its start
                prev, t = t, t + ratio
            w = np.zeros(5)
            if counter == 1:
                w[3] = w[4] = 0.5  # mean of the first output and this one
            else:
                w[4 - history:4] = self._ADAMS_BASHFORTH[history]
            push.append(pushed)
            weights.append(w)
            from_saved.append(counter == 1)
            save.append(counter == 0)
            t_from.append(alpha_bar[t])
            t_to.append(alpha_bar[prev] if prev >= 0 else final)
        self.timesteps = evals
        self._push, self._from_saved, self._save = (np.array(push), np.array(from_saved),
                                                    np.array(save))
        self._weights = np.stack(weights)
        a, a_prev = np.array(t_from), np.array(t_to)
        self._sqrt_a, self._sqrt_1ma = np.sqrt(a), np.sqrt(1 - a)
        self._sample_coef = np.sqrt(a_prev / a)
        self._output_coef = (a_prev - a) / (a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev))

    def init_state(self, sample):
        return {"outputs": jnp.zeros((4,) + sample.shape, jnp.float32),
                "saved_sample": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        outputs = state["outputs"]
        outputs = jnp.where(jnp.asarray(self._push)[i],
                            jnp.concatenate([outputs[1:], model_output[None]]), outputs)
        w = table(self._weights)[i]
        combined = jnp.tensordot(w[:4], outputs, axes=1) + w[4] * model_output
        start = jnp.where(jnp.asarray(self._from_saved)[i], state["saved_sample"], sample)
        saved = jnp.where(jnp.asarray(self._save)[i], sample, state["saved_sample"])
        if self.prediction_type == "v_prediction":  # to a noise prediction at the start point
            combined = table(self._sqrt_a)[i] * combined + table(self._sqrt_1ma)[i] * start
        prev = table(self._sample_coef)[i] * start - table(self._output_coef)[i] * combined
        return prev, {"outputs": outputs, "saved_sample": saved}


class DDPM(Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020), diffusers' DDPMScheduler: from the predicted
    clean sample (clipped with clip_sample, or dynamically thresholded) and the sample, the mean
    of q(x_prev | x_t, x0) between consecutive inference timesteps, plus fresh noise with the
    config's variance: fixed_small (the posterior variance), fixed_small_log (the same, taken
    through its log) or fixed_large (beta between the two timesteps); none at timestep 0."""

    stochastic = True

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        alpha_bar = alphas_cumprod(settings)
        t = spaced_timesteps(settings["timestep_spacing"], settings["num_train_timesteps"], steps,
                             settings["steps_offset"], integer=True).astype(np.int64)
        prev = np.append(t[1:], -1)
        a, a_prev = alpha_bar[t], np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], 1.0)
        beta = 1.0 - a / a_prev
        self.timesteps = t
        self._sqrt_a, self._sqrt_1ma = np.sqrt(a), np.sqrt(1 - a)
        self._x0_coef = np.sqrt(a_prev) * beta / (1 - a)
        self._sample_coef = np.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)
        variance = np.maximum((1 - a_prev) / (1 - a) * beta, 1e-20)
        std = {"fixed_small_log": np.exp(0.5 * np.log(variance)),
               "fixed_large": np.sqrt(beta)}.get(settings["variance_type"], np.sqrt(variance))
        self._noise_coef = np.where(t > 0, std, 0.0)
        self._clip = settings["clip_sample_range"] if settings["clip_sample"] else None
        self._threshold = thresholding_of(settings)

    def step(self, state, i, model_output, sample, noise=None):
        sa, s1a = table(self._sqrt_a)[i], table(self._sqrt_1ma)[i]
        if self.prediction_type == "epsilon":
            x0 = (sample - s1a * model_output) / sa
        else:
            x0 = sa * sample - s1a * model_output
        if self._threshold is not None:
            x0 = dynamic_threshold(x0, *self._threshold)
        elif self._clip is not None:
            x0 = jnp.clip(x0, -self._clip, self._clip)
        prev = table(self._x0_coef)[i] * x0 + table(self._sample_coef)[i] * sample
        return prev + table(self._noise_coef)[i] * noise, state


def _pndm_refusal(s):
    if not s["skip_prk_steps"]:
        return (f"skip_prk_steps={s['skip_prk_steps']!r} in the scheduler config asks "
                "PNDMScheduler for Runge-Kutta warm-up steps; sdjax's pndm runs the PLMS steps "
                f"only: set skip_prk_steps to true or {OTHER_SAMPLERS}")
    return None


def _ddpm_refusal(s):
    variance, where = s["variance_type"], "in the scheduler config"
    if variance in ("learned", "learned_range"):
        return (f"variance_type={variance!r} {where} makes DDPMScheduler read a variance from "
                "extra output channels of the model, which a noise-only UNet like sdjax's lacks "
                "(diffusers then fails): set variance_type to fixed_small or fixed_large, or "
                f"{OTHER_SAMPLERS}")
    if variance == "fixed_large_log":
        return (f"variance_type={variance!r} {where} makes DDPMScheduler scale its noise by the "
                "square root of log(beta), which is NaN: set variance_type to fixed_large")
    return None


SAMPLERS = {
    "ddim": SamplerSpec(DDIM, "DDIMScheduler", dict(
        COMMON, **THRESHOLDING, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
        timestep_spacing="leading", rescale_betas_zero_snr=False)),
    # PNDM's skip_prk_steps is read only to refuse false: sdjax runs its PLMS steps alone, as
    # every Stable Diffusion config asks.
    "pndm": SamplerSpec(PLMS, "PNDMScheduler", dict(
        COMMON, skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading"),
        diffusers_options=dict(skip_prk_steps=True), refusal=_pndm_refusal),
    # A variance_type DDPMScheduler does not know (null, from a DPMSolverMultistepScheduler
    # config) runs as fixed_small there, and so here.
    "ddpm": SamplerSpec(DDPM, "DDPMScheduler", dict(
        COMMON, **THRESHOLDING, variance_type="fixed_small", clip_sample=True,
        clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False),
        refusal=_ddpm_refusal),
}
