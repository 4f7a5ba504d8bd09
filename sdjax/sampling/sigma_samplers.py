"""Samplers that integrate in noise level sigma (Karras et al. 2022's formulation, as the
k-diffusion-style diffusers schedulers): Euler and Euler ancestral."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.solver import COMMON, SamplerSpec, Scheduler, either, sigma_ramp, table
from sdjax.sampling.timesteps import (alphas_cumprod, exponential_sigmas, interpolate_sigmas,
                                      sigma_to_timestep, sigmas_of, spaced_timesteps)


class Euler(Scheduler):
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

    def _set_sigmas(self, timesteps, sigmas, spacing):
        self.timesteps = np.asarray(timesteps, np.float32)
        self._sigmas = sigmas.astype(np.float32).astype(np.float64)
        top = self._sigmas.max()
        self.init_noise_sigma = float(top if spacing in ("linspace", "trailing") else np.sqrt(top ** 2 + 1))
        self.input_scales = 1.0 / np.sqrt(self._sigmas[:len(self.timesteps)] ** 2 + 1)

    def denoised(self, i, model_output, sample):
        """The model's estimate of the clean latents at step i."""
        sigma = table(self._sigmas)[i]
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)

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


SAMPLERS = {
    "euler": SamplerSpec(Euler, "EulerDiscreteScheduler", dict(
        COMMON, timestep_spacing="linspace", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_type="discrete", final_sigmas_type="zero", rescale_betas_zero_snr=False)),
    # Its config has no Karras or final-sigma options: the Euler set-up runs with their defaults.
    "euler_a": SamplerSpec(EulerAncestral, "EulerAncestralDiscreteScheduler", dict(
        COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False)),
}
