"""What every sampler shares: the interface the denoising loop calls, the host tables it indexes,
the registry entry that says which diffusers class a sampler reproduces and which config keys it
reads, and the helpers several samplers use (dynamic thresholding, noise-level ramps).

A sampler module declares `SAMPLERS = {name: SamplerSpec(...)}`; `sdjax.sampling.schedulers`
collects them, so adding a sampler is a class and an entry in one module.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.timesteps import beta_sigmas, exponential_sigmas, karras_sigmas

PREDICTION_TYPES = ("epsilon", "v_prediction")

# __init__ arguments most diffusers schedulers take.
COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None, prediction_type="epsilon", steps_offset=0)
THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
OTHER_SAMPLERS = "pick another sampler (scheduler= or --scheduler)"


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler name.

    cls: the sdjax class, built as cls(name, settings, steps).
    diffusers_class: the diffusers scheduler class it reproduces (also accepted as its name).
    defaults: the __init__ arguments of that class that change its result, with the class's
      defaults: exactly these keys are read from a model's scheduler config.
    borrowed: keys the class does not take but reads when a config holds them (from_config
      keeps every key of a config on the scheduler).
    fixed: settings the name fixes whatever the config says (dpmpp_2m_karras: Karras levels).
    diffusers_options: what tests and benchmarks pass to diffusers' from_config to get the same
      sampler (PNDM: skip_prk_steps).
    prepare: settings -> settings, normalising values diffusers treats as others (optional).
    refusal: settings -> why sdjax cannot run them as diffusers would (one line), or None.
    """
    cls: type
    diffusers_class: str
    defaults: Mapping
    borrowed: Mapping = dataclasses.field(default_factory=dict)
    fixed: Mapping = dataclasses.field(default_factory=dict)
    diffusers_options: Mapping = dataclasses.field(default_factory=dict)
    prepare: Optional[Callable] = None
    refusal: Optional[Callable] = None


def table(values) -> jnp.ndarray:
    return jnp.asarray(np.asarray(values, np.float64), jnp.float32)


def thresholding_of(settings) -> Optional[tuple]:
    """(quantile, largest threshold) of dynamic thresholding when the config asks for it."""
    if not settings.get("thresholding"):
        return None
    return float(settings["dynamic_thresholding_ratio"]), float(settings["sample_max_value"])


def dynamic_threshold(x0, quantile: float, max_value: float):
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
        return table(self.timesteps)[i]

    def input_scale(self, i):
        return 1.0 if self.input_scales is None else table(self.input_scales)[i]

    def init_state(self, sample):
        return ()

    def step(self, state, i, model_output, sample, noise=None):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, {self.num_inference_steps} steps, {self.prediction_type})"


RAMPS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
         "use_beta_sigmas": beta_sigmas}


def sigma_ramp(settings):
    """The noise levels (sigma_max, sigma_min, steps) -> sigmas the config's use_karras_sigmas,
    use_exponential_sigmas or use_beta_sigmas asks for (at most one is set), or None."""
    for key, ramp in RAMPS.items():
        if settings.get(key):
            return ramp
    return None


def either(value, fallback):
    return fallback if value is None else value
