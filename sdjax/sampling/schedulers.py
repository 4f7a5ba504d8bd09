"""The samplers, chosen by name: ddim, pndm (PLMS), euler, euler_a, dpmpp_2m, dpmpp_2m_karras.

Each reads a diffusers scheduler config (the model's `scheduler/scheduler_config.json`: beta
schedule, timestep spacing, steps offset, set_alpha_to_one, clip_sample, prediction type, ...)
the way the matching diffusers class's `from_config` does: keys that class's __init__ does not
take are ignored, whatever their value (a DDPMScheduler config's variance_type, a PNDM config's
skip_prk_steps for euler, ...), and keys it takes but the config does not hold take that class's
defaults. Keys the class takes are honoured, and refused only at values whose result sdjax does
not reproduce (see `_refusal`). All bookkeeping that depends only on the step number (which
timesteps, which noise levels, which solver order, the multistep weights) is worked out on the
host in float64 when the scheduler is built, so the jitted loop only indexes small tables:

    scheduler = make_scheduler("dpmpp_2m", sd.scheduler_config, num_inference_steps=25)
    x = noise * scheduler.init_noise_sigma
    state = scheduler.init_state(x)
    for i in range(scheduler.num_evaluations):          # a lax.fori_loop in practice
        eps = unet(x * scheduler.input_scale(i), scheduler.timestep(i), context)
        x, state = scheduler.step(state, i, eps, x, noise_i)
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError
from sdjax.sampling.timesteps import (alphas_cumprod, beta_sigmas, check_spacing,
                                      exponential_sigmas, interpolate_sigmas, karras_sigmas,
                                      lu_sigmas, sigma_to_timestep, sigmas_of, spaced_timesteps)

SCHEDULERS = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The diffusers class a model's config names -> our sampler, for `scheduler=None`.
_BY_CLASS = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
             "EulerAncestralDiscreteScheduler": "euler_a",
             "DPMSolverMultistepScheduler": "dpmpp_2m"}
# The diffusers class each sampler reproduces.
DIFFUSERS_CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
                     "euler": "EulerDiscreteScheduler",
                     "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler",
                     "dpmpp_2m_karras": "DPMSolverMultistepScheduler"}

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", steps_offset=0)
_THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
# Each sampler's defaults: the __init__ arguments of its diffusers class that change its result
# (PNDM's skip_prk_steps excepted: sdjax only runs its PLMS steps, as every Stable Diffusion config
# asks). Only these keys are read from a config. DPMSolverMultistepScheduler's algorithm_type and
# solver_order are not: the sampler's name fixes them (DPM-Solver++, second order).
_DEFAULTS = {
    "ddim": dict(_COMMON, **_THRESHOLDING, clip_sample=True, clip_sample_range=1.0,
                 set_alpha_to_one=True, timestep_spacing="leading", rescale_betas_zero_snr=False),
    "pndm": dict(_COMMON, skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading"),
    "euler": dict(_COMMON, timestep_spacing="linspace", interpolation_type="linear",
                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                  sigma_min=None, sigma_max=None, timestep_type="discrete",
                  final_sigmas_type="zero", rescale_betas_zero_snr=False),
    "euler_a": dict(_COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "dpmpp_2m": dict(_COMMON, **_THRESHOLDING, timestep_spacing="linspace", solver_type="midpoint",
                     lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                     use_flow_sigmas=False, final_sigmas_type="zero",
                     lambda_min_clipped=-math.inf, variance_type=None,
                     rescale_betas_zero_snr=False),
}
# Keys a class does not take but still reads when from_config leaves them on its config (it keeps
# every key of the config): DPMSolverMultistepScheduler's Karras, exponential and beta noise
# levels use a config's sigma_min / sigma_max, as an EulerDiscreteScheduler config holds them.
_BORROWED = {"dpmpp_2m": dict(sigma_min=None, sigma_max=None)}
# Solver types DPMSolverMultistepScheduler takes from other solvers' configs and runs as midpoint.
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")
_OTHER_SAMPLERS = "pick another sampler (scheduler= or --scheduler)"


def default_scheduler_name(config: Mapping) -> str:
    """The sampler matching the class named in a model's scheduler config."""
    cls = config.get("_class_name")
    name = _BY_CLASS.get(cls)
    if name is None:
        raise ConfigError(f"the model's scheduler {cls} has no sdjax sampler; pass one of "
                          f"{', '.join(SCHEDULERS)} (scheduler= or --scheduler)")
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


def _settings(name: str, config: Mapping, prediction_type: Optional[str]) -> dict:
    base = "dpmpp_2m" if name.startswith("dpmpp_2m") else name
    settings = dict(_DEFAULTS[base], **_BORROWED.get(base, {}))
    # Keys diffusers filled in with its class defaults (not given by the config's author) give
    # way to this sampler's defaults, as diffusers' from_config does.
    defaulted = set(config.get("_use_default_values", ()))
    settings.update({k: v for k, v in config.items() if k in settings and k not in defaulted})
    if prediction_type is not None:
        settings["prediction_type"] = prediction_type
    if settings["prediction_type"] not in PREDICTION_TYPES:
        where = "" if prediction_type is not None else " in the scheduler config"
        raise ConfigError(f"prediction_type={settings['prediction_type']!r}{where} is not "
                          f"supported by the sdjax samplers, which run "
                          f"{' and '.join(PREDICTION_TYPES)} models only: give the prediction "
                          "type the model was trained with")
    if base == "dpmpp_2m":
        # The name picks Karras noise levels or not; the Karras ones come first in diffusers, so
        # they make the config's other noise-level choices irrelevant.
        karras = name == "dpmpp_2m_karras"
        settings["use_karras_sigmas"] = karras
        if karras:
            settings.update(use_lu_lambdas=False, use_exponential_sigmas=False,
                            use_beta_sigmas=False)
        if settings["solver_type"] in _MIDPOINT_ALIASES:
            settings["solver_type"] = "midpoint"
    problem = _refusal(name, settings)
    if problem is not None:
        raise ConfigError(problem)
    return settings


def _refusal(name: str, s: dict) -> Optional[str]:
    """Why sdjax cannot run the sampler `name` with these settings as diffusers would (one line),
    or None. Each case is a value diffusers itself rejects, or one whose result differs from every
    value sdjax implements (the prediction type is checked before)."""
    where = "in the scheduler config"
    check_spacing(s["timestep_spacing"])
    if name == "pndm" and not s["skip_prk_steps"]:
        return (f"skip_prk_steps={s['skip_prk_steps']!r} {where} asks PNDMScheduler for "
                "Runge-Kutta warm-up steps; sdjax's pndm runs the PLMS steps only: set "
                f"skip_prk_steps to true or {_OTHER_SAMPLERS}")
    if s.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        return (f"final_sigmas_type={s['final_sigmas_type']!r} {where} is not one diffusers "
                "knows: set it to zero or sigma_min")
    if s.get("interpolation_type", "linear") not in ("linear", "log_linear"):
        return (f"interpolation_type={s['interpolation_type']!r} {where} is not one diffusers "
                "knows: set it to linear or log_linear")
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
              if s.get(k)]
    if len(chosen) > 1:
        return (f"{' and '.join(chosen)} are all true {where}, but diffusers allows only one of "
                "use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas: keep the one the "
                "model should use")
    if name.startswith("dpmpp_2m"):
        if s["use_flow_sigmas"]:
            return (f"use_flow_sigmas=True {where} is for flow-matching models, which the sdjax "
                    "samplers do not run: use a config with use_flow_sigmas false")
        if s["solver_type"] not in ("midpoint", "heun"):
            return (f"solver_type={s['solver_type']!r} {where} is not one "
                    "DPMSolverMultistepScheduler knows: set it to midpoint or heun")
        if s["variance_type"] in ("learned", "learned_range") and s["prediction_type"] == "epsilon":
            return (f"variance_type={s['variance_type']!r} {where} makes "
                    "DPMSolverMultistepScheduler use only the first 3 channels of the model's "
                    f"output (a model that also predicts its variance), which sdjax's {name} does "
                    f"not: {_OTHER_SAMPLERS}, or set variance_type to null if the model predicts "
                    "no variance")
    return None


def make_scheduler(name: str, config: Mapping, num_inference_steps: int,
                   prediction_type: Optional[str] = None) -> "Scheduler":
    """The sampler `name` for `num_inference_steps` steps, set up from a scheduler config."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps={num_inference_steps!r} must be a whole number of "
                          "at least 1")
    settings = _settings(name, config, prediction_type)
    if num_inference_steps > settings["num_train_timesteps"]:
        raise ConfigError(f"num_inference_steps={num_inference_steps} is more than the model's "
                          f"{settings['num_train_timesteps']} training timesteps")
    cls = {"ddim": DDIM, "pndm": PLMS, "euler": Euler, "euler_a": EulerAncestral,
           "dpmpp_2m": DPMSolverPP2M, "dpmpp_2m_karras": DPMSolverPP2M}[name]
    return cls(name, settings, int(num_inference_steps))


def _table(values) -> jnp.ndarray:
    return jnp.asarray(np.asarray(values, np.float64), jnp.float32)


def _thresholding(settings) -> Optional[tuple]:
    """(quantile, largest threshold) of dynamic thresholding when the config asks for it."""
    if not settings.get("thresholding"):
        return None
    return float(settings["dynamic_thresholding_ratio"]), float(settings["sample_max_value"])


def _dynamic_threshold(x0, quantile: float, max_value: float):
    """Dynamic thresholding of predicted clean samples (Saharia et al. 2022, as diffusers does it):
    per image, s = the `quantile` of |x0| over all its values, kept within [1, max_value] (where
    max_value < 1, s = max_value); x0 is clipped to [-s, s] and divided by s."""
    s = jnp.quantile(jnp.abs(x0.reshape(x0.shape[0], -1)), quantile, axis=1)
    s = jnp.minimum(jnp.maximum(s, 1.0), max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


class Scheduler:
    """Common interface. Subclasses fill the tables in __init__ and define `step`."""

    stochastic = False  # whether `step` needs fresh noise

    def __init__(self, name: str, settings: dict, steps: int):
        self.name = name
        self.settings = settings
        self.num_inference_steps = steps
        self.prediction_type = settings["prediction_type"]
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0)       # the UNet's timestep at each evaluation
        self.input_scales = None           # latents are multiplied by these before the UNet

    @property
    def num_evaluations(self) -> int:
        """UNet evaluations per image (PLMS takes one more than its step count)."""
        return len(self.timesteps)

    def timestep(self, i):
        return _table(self.timesteps)[i]

    def input_scale(self, i):
        return 1.0 if self.input_scales is None else _table(self.input_scales)[i]

    def init_state(self, sample):
        return ()

    def step(self, state, i, model_output, sample, noise=None):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, {self.num_inference_steps} steps, {self.prediction_type})"


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
        self._threshold = _thresholding(settings)

    def step(self, state, i, model_output, sample, noise=None):
        sa, s1a = _table(self._sqrt_a)[i], _table(self._sqrt_1ma)[i]
        if self.prediction_type == "epsilon":
            x0, eps = (sample - s1a * model_output) / sa, model_output
        else:
            x0, eps = sa * sample - s1a * model_output, sa * model_output + s1a * sample
        if self._threshold is not None:
            x0 = _dynamic_threshold(x0, *self._threshold)
        elif self._clip is not None:
            x0 = jnp.clip(x0, -self._clip, self._clip)
        return _table(self._sqrt_a_prev)[i] * x0 + _table(self._sqrt_1ma_prev)[i] * eps, state


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
        w = _table(self._weights)[i]
        combined = jnp.tensordot(w[:4], outputs, axes=1) + w[4] * model_output
        start = jnp.where(jnp.asarray(self._from_saved)[i], state["saved_sample"], sample)
        saved = jnp.where(jnp.asarray(self._save)[i], sample, state["saved_sample"])
        if self.prediction_type == "v_prediction":  # to a noise prediction at the start point
            combined = _table(self._sqrt_a)[i] * combined + _table(self._sqrt_1ma)[i] * start
        prev = _table(self._sample_coef)[i] * start - _table(self._output_coef)[i] * combined
        return prev, {"outputs": outputs, "saved_sample": saved}


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
        ramp = _sigma_ramp(settings)
        if ramp is not None:
            sigmas = ramp(_or(settings.get("sigma_max"), sigmas[0]),
                          _or(settings.get("sigma_min"), sigmas[-1]), steps)
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
        sigma = _table(self._sigmas)[i]
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)

    def step(self, state, i, model_output, sample, noise=None):
        sigma, sigma_next = _table(self._sigmas)[i], _table(self._sigmas)[i + 1]
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
        sigma = _table(self._sigmas)[i]
        derivative = (sample - self.denoised(i, model_output, sample)) / sigma
        prev = sample + derivative * (_table(self._sigma_down)[i] - sigma)
        return prev + noise * _table(self._sigma_up)[i], state


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
        ramp = _sigma_ramp(settings)
        if settings["use_lu_lambdas"] and not settings["use_karras_sigmas"]:
            # Evenly spaced in log-SNR (Lu et al.) between the extreme training sigmas; this
            # comes before exponential and beta levels in diffusers.
            ramp = lu_sigmas
            sigmas = lu_sigmas(train_sigmas, steps)
        elif ramp is not None:  # between the config's sigma_max / sigma_min, or the training ones
            sigmas = ramp(_or(settings["sigma_max"], train_sigmas[-1]),
                          _or(settings["sigma_min"], train_sigmas[0]), steps)
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
        self._threshold = _thresholding(settings)

    def init_state(self, sample):
        return {"previous_x0": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x0 = _table(self._x0_sample)[i] * sample + _table(self._x0_output)[i] * model_output
        if self._threshold is not None:
            x0 = _dynamic_threshold(x0, *self._threshold)
        prev = (_table(self._a)[i] * sample + _table(self._b0)[i] * x0
                + _table(self._b1)[i] * state["previous_x0"])
        return prev, {"previous_x0": x0}


_RAMPS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
          "use_beta_sigmas": beta_sigmas}


def _sigma_ramp(settings):
    """The noise levels (sigma_max, sigma_min, steps) -> sigmas the config's use_karras_sigmas,
    use_exponential_sigmas or use_beta_sigmas asks for (at most one is set), or None."""
    for key, ramp in _RAMPS.items():
        if settings.get(key):
            return ramp
    return None


def _or(value, fallback):
    return fallback if value is None else value
