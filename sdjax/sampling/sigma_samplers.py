"""Samplers that integrate in noise level sigma (Karras et al. 2022's formulation, as the
k-diffusion-style diffusers schedulers): Euler, Euler ancestral, linear multistep (LMS), Heun,
DPM-Solver-2 (KDPM2) and the stochastic DPM-Solver++ (dpmpp_sde).

The two-evaluation samplers (Heun, KDPM2, dpmpp_sde) take one `step` per UNet evaluation, as
diffusers' `timesteps` interleave them: the host tables say, per evaluation, whether it starts a
step or finishes one, and the state carries what the second evaluation needs from the first."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.solver import COMMON, SamplerSpec, Scheduler, either, sigma_ramp, table
from sdjax.sampling.timesteps import (alphas_cumprod, exponential_sigmas, interpolate_sigmas,
                                      karras_sigmas, sigma_to_timestep, sigmas_of,
                                      spaced_timesteps)


class SigmaScheduler(Scheduler):
    """What the sigma samplers share: the noise level of each evaluation sets its input scale
    (1 / sqrt(sigma^2 + 1)) and the clean-sample estimate."""

    def _set_sigmas(self, timesteps, sigmas, spacing):
        """`sigmas`: the noise level of each evaluation (possibly followed by the final one)."""
        self.timesteps = np.asarray(timesteps, np.float32)
        self._sigmas = np.asarray(sigmas).astype(np.float32).astype(np.float64)
        top = self._sigmas.max()
        self.init_noise_sigma = float(top if spacing in ("linspace", "trailing")
                                      else np.sqrt(top ** 2 + 1))
        self.input_scales = 1.0 / np.sqrt(self._sigmas[:len(self.timesteps)] ** 2 + 1)

    def denoised(self, i, model_output, sample):
        """The model's estimate of the clean latents at evaluation i."""
        sigma = table(self._sigmas)[i]
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)


def discrete_sigmas(settings, steps, karras_bounds=True, float32_linspace=True):
    """The noise levels of the k-diffusion-style classes other than Euler: sigma interpolated at
    the spaced timesteps, or Karras, exponential or beta levels (use_*_sigmas) with their
    fractional timesteps, between the ends of those, or the config's sigma_max / sigma_min where
    the class reads them (LMS and DPMSolverSDE read them for exponential and beta levels only:
    `karras_bounds` False). DPMSolverSDE spaces linspace timesteps in float64
    (`float32_linspace` False). Returns (timesteps, sigmas, training sigmas), float64, with no
    final sigma."""
    train_sigmas = sigmas_of(alphas_cumprod(settings))
    n, spacing = settings["num_train_timesteps"], settings["timestep_spacing"]
    if spacing == "linspace" and not float32_linspace:
        timesteps = np.linspace(0, n - 1, steps)[::-1]
    else:
        timesteps = spaced_timesteps(spacing, n, steps, settings["steps_offset"], integer=False)
    sigmas = interpolate_sigmas(timesteps, train_sigmas)
    ramp = sigma_ramp(settings)
    if ramp is not None:
        bounded = karras_bounds or ramp is not karras_sigmas
        sigmas = ramp(either(settings.get("sigma_max") if bounded else None, sigmas[0]),
                      either(settings.get("sigma_min") if bounded else None, sigmas[-1]), steps)
        timesteps = sigma_to_timestep(sigmas, train_sigmas)
    return np.asarray(timesteps, np.float64), sigmas, train_sigmas


class Euler(SigmaScheduler):
    """Euler steps of the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 2 with
    no churn). The noise levels follow the config: interpolated at the spaced timesteps (or
    log-linear between the extreme training sigmas, interpolation_type="log_linear"), optionally
    replaced by Karras, exponential or beta ones (use_*_sigmas, between sigma_min and sigma_max);
    timestep_type="continuous" gives a v-prediction model 0.25 log(sigma) as its timestep."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        train_sigmas = sigmas_of(alphas_cumprod(settings, lift_terminal=True))
        timesteps = spaced_timesteps(settings["timestep_spacing"], settings["num_train_timesteps"],
                                     steps, settings["steps_offset"], integer=False)
        if settings.get("interpolation_type", "linear") == "log_linear":
            # One more level than steps, as diffusers makes them: the last step ends at the
            # smallest training sigma (the appended final sigma is never reached).
            sigmas = exponential_sigmas(train_sigmas[-1], train_sigmas[0], steps + 1)
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        ramp = sigma_ramp(settings)
        if ramp is not None:
            sigmas = ramp(either(settings.get("sigma_max"), sigmas[0]),
                          either(settings.get("sigma_min"), sigmas[-1]), steps)
            timesteps = sigma_to_timestep(sigmas, train_sigmas)
        last = train_sigmas[0] if settings.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        sigmas = np.append(sigmas, last).astype(np.float32)
        if (settings.get("timestep_type", "discrete") == "continuous"
                and self.prediction_type == "v_prediction"):
            timesteps = 0.25 * np.log(sigmas[:-1])  # float32, one per sigma but the last
        self._set_sigmas(timesteps, sigmas, settings["timestep_spacing"])

    def step(self, state, i, model_output, sample, noise=None):
        sigma, sigma_next = table(self._sigmas)[i], table(self._sigmas)[i + 1]
        derivative = (sample - self.denoised(i, model_output, sample)) / sigma
        return sample + derivative * (sigma_next - sigma), state


class EulerAncestral(Euler):
    """Euler steps that go down past the next noise level and add fresh noise back up to it
    (its config has no Karras or final-sigma options: the Euler set-up runs with their defaults)."""

    stochastic = True

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        s_from, s_to = self._sigmas[:-1], self._sigmas[1:]
        self._sigma_up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
        self._sigma_down = np.sqrt(s_to ** 2 - self._sigma_up ** 2)

    def step(self, state, i, model_output, sample, noise=None):
        sigma = table(self._sigmas)[i]
        derivative = (sample - self.denoised(i, model_output, sample)) / sigma
        prev = sample + derivative * (table(self._sigma_down)[i] - sigma)
        return prev + noise * table(self._sigma_up)[i], state


class LMS(SigmaScheduler):
    """Linear multistep in sigma (Karras et al. 2022's LMS, diffusers' LMSDiscreteScheduler with
    its default order 4): each step integrates the Lagrange polynomial through the derivatives
    (x - D) / sigma of the last four evaluations (fewer at the start) from sigma_i to
    sigma_{i+1}. diffusers integrates each coefficient numerically (scipy's quad); the
    polynomials have degree at most 3, so the host integrates them exactly in float64 instead.
    The state holds the last three derivatives, newest first."""

    ORDER = 4

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        timesteps, sigmas, _ = discrete_sigmas(settings, steps, karras_bounds=False)
        self._set_sigmas(timesteps, np.append(sigmas, 0.0), settings["timestep_spacing"])
        s = self._sigmas
        weights = np.zeros((steps, self.ORDER))
        for i in range(steps):
            nodes = s[i - np.arange(min(i + 1, self.ORDER))]  # newest first
            for j, node in enumerate(nodes):
                others = np.delete(nodes, j)
                basis = np.polyint(np.atleast_1d(np.poly(others)) / np.prod(node - others))
                weights[i, j] = np.polyval(basis, s[i + 1]) - np.polyval(basis, s[i])
        self._weights = weights

    def init_state(self, sample):
        return {"derivatives": jnp.zeros((self.ORDER - 1,) + sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        derivative = (sample - self.denoised(i, model_output, sample)) / table(self._sigmas)[i]
        history = state["derivatives"]
        w = table(self._weights)[i]
        change = w[0] * derivative
        for j in range(self.ORDER - 1):
            change = change + w[j + 1] * history[j]
        history = jnp.concatenate([derivative[None], history[:-1]])
        return sample + change, {"derivatives": history}


class Heun(SigmaScheduler):
    """Heun's second-order method in sigma (Karras et al. 2022, Algorithm 1 with no churn): an
    Euler step to the next noise level, then the step redone with the mean of the derivatives at
    both ends; the last step, to sigma 0, is a plain Euler step. Evaluation 2k starts step k
    (sigma_k), evaluation 2k+1 finishes it (at sigma_{k+1}); clip_sample clips the clean-sample
    estimates."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        timesteps, sigmas, _ = discrete_sigmas(settings, steps)
        s = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
        evals = []  # (timestep, sigma, starts a step, step size)
        for k in range(steps):
            evals.append((timesteps[k], s[k], True, s[k + 1] - s[k]))
            if k < steps - 1:
                evals.append((timesteps[k + 1], s[k + 1], False, s[k + 1] - s[k]))
        t, sig, first, dt = zip(*evals)
        self._set_sigmas(t, np.array(sig), settings["timestep_spacing"])
        self._first, self._dt = np.array(first), np.array(dt)
        self._clip = settings["clip_sample_range"] if settings["clip_sample"] else None

    def init_state(self, sample):
        return {"derivative": jnp.zeros(sample.shape, jnp.float32),
                "sample": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x0 = self.denoised(i, model_output, sample)
        if self._clip is not None:
            x0 = jnp.clip(x0, -self._clip, self._clip)
        derivative = (sample - x0) / table(self._sigmas)[i]
        first = jnp.asarray(self._first)[i]
        mean = jnp.where(first, derivative, (state["derivative"] + derivative) / 2)
        start = jnp.where(first, sample, state["sample"])
        return start + mean * table(self._dt)[i], {"derivative": derivative, "sample": sample}


class KDPM2(SigmaScheduler):
    """DPM-Solver-2 (Lu et al. 2022, as Karras et al.'s k-diffusion has it): each step evaluates
    the model at sigma_k, takes an Euler step to the log-midpoint sqrt(sigma_k sigma_{k+1}),
    evaluates there and takes the whole step from sigma_k with that derivative; the last step,
    to sigma 0, ends after its first evaluation. Karras levels go to whole timesteps, as in
    diffusers."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        timesteps, sigmas, train_sigmas = discrete_sigmas(settings, steps)
        if settings["use_karras_sigmas"]:
            timesteps = timesteps.round()
        s32 = np.append(sigmas, 0.0).astype(np.float32)
        # Log-midpoints in float32 as diffusers makes them (a torch lerp at weight 0.5); the
        # one below sigma_{n-1} is 0.
        logs = np.log(s32[:-1])
        mid = np.append(np.exp(logs[:-1] - (logs[:-1] - logs[1:]) * np.float32(0.5)), 0.0)
        mid = mid.astype(np.float32).astype(np.float64)
        mid_timesteps = sigma_to_timestep(mid[:-1], train_sigmas)
        s = s32.astype(np.float64)
        evals = []  # (timestep, sigma, starts a step, step size)
        for k in range(steps):
            evals.append((timesteps[k], s[k], True, mid[k] - s[k]))
            if k < steps - 1:
                evals.append((mid_timesteps[k], mid[k], False, s[k + 1] - s[k]))
        t, sig, first, dt = zip(*evals)
        self._set_sigmas(t, np.array(sig), settings["timestep_spacing"])
        self._first, self._dt = np.array(first), np.array(dt)

    def init_state(self, sample):
        return {"sample": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        derivative = (sample - self.denoised(i, model_output, sample)) / table(self._sigmas)[i]
        start = jnp.where(jnp.asarray(self._first)[i], sample, state["sample"])
        return start + derivative * table(self._dt)[i], {"sample": sample}


def _ancestral(sigma_from, sigma_to):
    """(sigma_up, sigma_down) of an ancestral step from sigma_from to sigma_to."""
    up = np.minimum(sigma_to, np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                      / sigma_from ** 2))
    return up, np.sqrt(sigma_to ** 2 - up ** 2)


class DPMSolverSDE(SigmaScheduler):
    """Stochastic DPM-Solver++ (Lu et al. 2022), diffusers' DPMSolverSDEScheduler: each step
    evaluates the model at sigma_k, takes a noisy first-order data-prediction step to the
    log-midpoint s = sqrt(sigma_k sigma_{k+1}) (down to sigma_down, noise up to s), evaluates
    there, and takes the whole step from sigma_k with that estimate, again down past sigma_{k+1}
    and noise back up to it. The last step, to sigma 0, is a plain Euler step after one
    evaluation.

    Noise: diffusers draws it from a Brownian tree over sigma (torchsde), seeded by
    noise_sampler_seed; each stage adds the tree's increment over its interval divided by the
    square root of the interval's length. sdjax draws its own noise instead: one standard-normal
    z per evaluation (the `noise` argument). The first stage's normalised increment, over
    [s, sigma_k], is z_1 itself; the second stage's interval [sigma_{k+1}, sigma_k] contains the
    first's, so, as on a Brownian path, its increment is the first's plus an independent one over
    [sigma_{k+1}, s]: its normalised noise is sqrt(a / (a + b)) z_1 + sqrt(b / (a + b)) z_2 with
    a = sigma_k - s and b = s - sigma_{k+1} (host tables; the state keeps z_1). Given those
    normalised draws, every update is diffusers' own."""

    stochastic = True

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        timesteps, sigmas, train_sigmas = discrete_sigmas(settings, steps, karras_bounds=False,
                                                          float32_linspace=False)
        # The midpoints' timesteps come from the float64 levels, before they are rounded.
        log_levels = np.log(sigmas)
        mid_timesteps = sigma_to_timestep(np.exp((log_levels[:-1] + log_levels[1:]) / 2),
                                          train_sigmas)
        s = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
        evals = []
        # (timestep, sigma, starts a step, sigma_from, sigma_to, share of the kept draw)
        for k in range(steps - 1):
            mid = np.float64(np.float32(np.sqrt(s[k] * s[k + 1])))
            a, b = s[k] - mid, mid - s[k + 1]
            kept = np.sqrt(a / (a + b)) if a + b > 0 else 1.0
            evals.append((timesteps[k], s[k], True, s[k], mid, 0.0))
            evals.append((mid_timesteps[k], mid, False, s[k], s[k + 1], kept))
        evals.append((timesteps[steps - 1], s[steps - 1], True, s[steps - 1], 0.0, 0.0))
        t, sig, first, s_from, s_to, kept = (np.array(v) for v in zip(*evals))
        self._set_sigmas(t, sig, settings["timestep_spacing"])
        self._first = first
        self._euler = s_to == 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            up, down = _ancestral(s_from, s_to)
            self._sample_coef = np.where(self._euler, 1.0, down / s_from)
            self._x0_coef = np.where(self._euler, 0.0, -np.expm1(np.log(down) - np.log(s_from)))
        self._noise_coef = np.where(self._euler, 0.0, up)
        self._dt = s_to - s_from  # the final Euler step's
        self._kept, self._fresh = kept, np.sqrt(1.0 - kept ** 2)

    def init_state(self, sample):
        return {"sample": jnp.zeros(sample.shape, jnp.float32),
                "noise": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x0 = self.denoised(i, model_output, sample)
        first = jnp.asarray(self._first)[i]
        start = jnp.where(first, sample, state["sample"])
        mixed = table(self._kept)[i] * state["noise"] + table(self._fresh)[i] * noise
        step_noise = jnp.where(first, noise, mixed)
        prev = (table(self._sample_coef)[i] * start + table(self._x0_coef)[i] * x0
                + step_noise * table(self._noise_coef)[i])
        euler = sample + (sample - x0) / table(self._sigmas)[i] * table(self._dt)[i]
        return (jnp.where(jnp.asarray(self._euler)[i], euler, prev),
                {"sample": sample, "noise": noise})


# The noise-level options of the LMS, Heun, KDPM2 and DPMSolverSDE classes; the last three also
# default to Stable Diffusion's beta range. All four read a config's sigma_min / sigma_max (an
# EulerDiscreteScheduler config holds them) for exponential and beta levels, Heun and KDPM2 for
# Karras levels too.
_LEVELS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
               timestep_spacing="linspace")
_K_DIFFUSION = dict(_LEVELS, beta_start=0.00085, beta_end=0.012)
_BOUNDS = dict(sigma_min=None, sigma_max=None)

SAMPLERS = {
    "euler": SamplerSpec(Euler, "EulerDiscreteScheduler", dict(
        COMMON, timestep_spacing="linspace", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_type="discrete", final_sigmas_type="zero", rescale_betas_zero_snr=False)),
    # Its config has no Karras or final-sigma options: the Euler set-up runs with their defaults.
    "euler_a": SamplerSpec(EulerAncestral, "EulerAncestralDiscreteScheduler", dict(
        COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False)),
    "lms": SamplerSpec(LMS, "LMSDiscreteScheduler", dict(COMMON, **_LEVELS),
                       borrowed=_BOUNDS),
    "heun": SamplerSpec(Heun, "HeunDiscreteScheduler", dict(
        COMMON, **_K_DIFFUSION, clip_sample=False, clip_sample_range=1.0), borrowed=_BOUNDS),
    "kdpm2": SamplerSpec(KDPM2, "KDPM2DiscreteScheduler", dict(COMMON, **_K_DIFFUSION),
                         borrowed=_BOUNDS),
    # noise_sampler_seed is not read: it seeds diffusers' Brownian tree, and sdjax draws its
    # own noise (see DPMSolverSDE).
    "dpmpp_sde": SamplerSpec(DPMSolverSDE, "DPMSolverSDEScheduler", dict(COMMON, **_K_DIFFUSION),
                             borrowed=_BOUNDS),
}
