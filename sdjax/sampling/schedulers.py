"""The samplers by name, and how a model's scheduler config sets one up.

Each sampler reads a diffusers scheduler config (the model's `scheduler/scheduler_config.json`:
beta schedule, timestep spacing, steps offset, set_alpha_to_one, clip_sample, prediction type, ...)
the way the matching diffusers class's `from_config` does: keys that class's __init__ does not
take are ignored, whatever their value (a DDPMScheduler config's variance_type for euler, ...),
and keys it takes but the config does not hold take that class's defaults. Keys the class takes
are honoured, and refused only at values whose result sdjax does not reproduce. All bookkeeping
that depends only on the step number (which timesteps, which noise levels, which solver order, the
multistep weights) is worked out on the host in float64 when the scheduler is built, so the jitted
loop only indexes small tables:

    scheduler = make_scheduler("dpmpp_2m", sd.scheduler_config, num_inference_steps=25)
    x = noise * scheduler.init_noise_sigma
    state = scheduler.init_state(x)
    for i in range(scheduler.num_evaluations):          # a lax.fori_loop in practice
        eps = unet(x * scheduler.input_scale(i), scheduler.timestep(i), context)
        x, state = scheduler.step(state, i, eps, x, noise_i)

Every sampler is also named by its diffusers class (`UniPCMultistepScheduler`), and a model whose
scheduler class has no sampler samples with pndm (epsilon) or ddim (v-prediction).
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import numpy as np

from sdjax.errors import ConfigError
from sdjax.sampling import alpha_samplers, multistep_samplers, sigma_samplers
from sdjax.sampling.solver import PREDICTION_TYPES, SamplerSpec, Scheduler
from sdjax.sampling.timesteps import check_spacing

log = logging.getLogger("sdjax")

SAMPLERS: Mapping[str, SamplerSpec] = {**alpha_samplers.SAMPLERS, **sigma_samplers.SAMPLERS,
                                       **multistep_samplers.SAMPLERS}
SCHEDULERS = tuple(SAMPLERS)
# The diffusers class each sampler reproduces.
DIFFUSERS_CLASSES = {name: spec.diffusers_class for name, spec in SAMPLERS.items()}
# A diffusers class name -> the sampler that runs it as its from_config would (the first name
# declared for the class: dpmpp_2m, not dpmpp_2m_karras, reads use_karras_sigmas from the config).
BY_CLASS = {}
for _name, _spec in SAMPLERS.items():
    BY_CLASS.setdefault(_spec.diffusers_class, _name)
# What a model whose scheduler class has no sampler samples with, by prediction type.
FALLBACK = {"epsilon": "pndm", "v_prediction": "ddim"}
_noted_fallbacks: set = set()


def sampler_name(name: str, what: str = "scheduler") -> str:
    """A sampler name or a diffusers scheduler class name -> the sampler name."""
    if name in SAMPLERS:
        return name
    if name in BY_CLASS:
        return BY_CLASS[name]
    raise ConfigError(f"unknown {what} {name!r}: choose one of {', '.join(SCHEDULERS)} (or the "
                      "diffusers class of one, e.g. UniPCMultistepScheduler)")


def default_scheduler_name(config: Mapping, prediction_type: Optional[str] = None) -> str:
    """The sampler matching the class named in a model's scheduler config; for a class no sampler
    reproduces, pndm (epsilon models) or ddim (v-prediction), said once per class."""
    cls = config.get("_class_name")
    if cls in BY_CLASS:
        return BY_CLASS[cls]
    prediction = prediction_type or config.get("prediction_type") or "epsilon"
    name = FALLBACK.get(prediction, "pndm")
    if cls not in _noted_fallbacks:
        _noted_fallbacks.add(cls)
        log.warning("note: the model's scheduler %s has no sdjax sampler; sampling with %s (%s "
                    "model); pick another with --scheduler / --validation_scheduler", cls, name,
                    prediction)
    return name


def _settings(name: str, config: Mapping, prediction_type: Optional[str]) -> dict:
    spec = SAMPLERS[name]
    settings = dict(spec.defaults, **spec.borrowed)
    # Keys diffusers filled in with its class defaults (not given by the config's author) give
    # way to this sampler's defaults, as diffusers' from_config does.
    defaulted = set(config.get("_use_default_values", ()))
    settings.update({k: v for k, v in config.items() if k in settings and k not in defaulted})
    settings.update(spec.fixed)
    if prediction_type is not None:
        settings["prediction_type"] = prediction_type
    if settings["prediction_type"] not in PREDICTION_TYPES:
        where = "" if prediction_type is not None else " in the scheduler config"
        raise ConfigError(f"prediction_type={settings['prediction_type']!r}{where} is not "
                          f"supported by the sdjax samplers, which run "
                          f"{' and '.join(PREDICTION_TYPES)} models only: give the prediction "
                          "type the model was trained with")
    if spec.prepare is not None:
        settings = spec.prepare(settings)
    problem = _refusal(settings) or (spec.refusal(settings) if spec.refusal else None)
    if problem is not None:
        raise ConfigError(problem)
    return settings


def _refusal(s: dict) -> Optional[str]:
    """Why no sampler can run these settings as diffusers would (one line), or None: values
    diffusers itself rejects (the prediction type is checked before; each sampler's own cases
    are its spec's `refusal`)."""
    where = "in the scheduler config"
    check_spacing(s["timestep_spacing"])
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
    return None


def make_scheduler(name: str, config: Mapping, num_inference_steps: int,
                   prediction_type: Optional[str] = None) -> Scheduler:
    """The sampler `name` (or a diffusers class name) for `num_inference_steps` steps, set up
    from a scheduler config."""
    name = sampler_name(name)
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps={num_inference_steps!r} must be a whole number of "
                          "at least 1")
    settings = _settings(name, config, prediction_type)
    if num_inference_steps > settings["num_train_timesteps"]:
        raise ConfigError(f"num_inference_steps={num_inference_steps} is more than the model's "
                          f"{settings['num_train_timesteps']} training timesteps")
    return SAMPLERS[name].cls(name, settings, int(num_inference_steps))
