"""diffusers' schedulers by sdjax sampler name, a way to hand them sdjax's random draws, and the
checks the sampler tests share: step-by-step agreement with diffusers, configs as the classes write
them, the tables a built sampler runs on, one-line refusals."""

import sys

import numpy as np
import pytest
import torch

from sdjax.errors import ConfigError
from sdjax.sampling.schedulers import make_scheduler


def diffusers_scheduler(name, config):
    """The diffusers scheduler that sdjax's sampler `name` reproduces, set up by its class's
    from_config(config) (with the options the name fixes)."""
    import diffusers

    from sdjax.sampling.schedulers import SAMPLERS

    spec = SAMPLERS[name]
    return getattr(diffusers, spec.diffusers_class).from_config(config, **spec.diffusers_options)


class FixedNoise:
    """Stands in for diffusers' randn_tensor in every scheduler module that draws noise with it
    (the ancestral and DDPM samplers), and for DPMSolverSDEScheduler's Brownian-tree noise
    sampler (see BrownianDraws): hands out the given draws, in order."""

    def __init__(self, monkeypatch, draws):
        import diffusers.schedulers  # noqa: F401 (loads the scheduler modules)
        import diffusers.schedulers.scheduling_dpmsolver_sde as sde  # needs torchsde

        self.draws = iter(draws)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("diffusers.schedulers.scheduling_") and hasattr(
                    module, "randn_tensor"):
                monkeypatch.setattr(module, "randn_tensor", self._draw)
        monkeypatch.setattr(sde, "BrownianTreeNoiseSampler",
                            lambda x, *args, **kwargs: BrownianDraws(self.draws, x.shape))

    def _draw(self, shape, **kwargs):
        return torch.from_numpy(np.array(next(self.draws), np.float32).reshape(shape))


class BrownianDraws:
    """A Brownian path in sigma made of the given standard-normal draws, called as diffusers
    calls its noise sampler: (sigma, sigma_next) -> the path's increment over that interval
    divided by the square root of its length. Each call takes one draw, for the part of its
    interval no earlier call covered: a call whose interval extends the previous one's (same
    start, further end), as DPMSolverSDEScheduler's second stage extends its first, adds the
    draw's increment over the extension to the previous increment."""

    def __init__(self, draws, shape):
        self.draws, self.shape = draws, shape
        self.previous = None  # (start, end, increment)

    def __call__(self, sigma, sigma_next):
        start, end = float(sigma), float(sigma_next)
        draw = np.array(next(self.draws), np.float64).reshape(self.shape)
        if self.previous is not None and self.previous[0] == start \
                and abs(end - start) > abs(self.previous[1] - start):
            increment = self.previous[2] + draw * np.sqrt(abs(end - self.previous[1]))
        else:
            increment = draw * np.sqrt(abs(end - start))
        self.previous = (start, end, increment)
        return torch.from_numpy((increment / np.sqrt(abs(end - start))).astype(np.float32))


# --- checks the sampler tests share -------------------------------------------------------------

STEPS = (1, 4, 20)  # one step; under and over the 15 steps where DPM-Solver++ changes its ending


def sd_config(**overrides):
    from diffusers import DDIMScheduler

    settings = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    settings.update(overrides)
    return dict(DDIMScheduler(**settings).config)


def assert_steps_match(name, config, monkeypatch, steps=(1, 3, 25), prediction_type=None,
                       seed=0, peak_rtol=0.0):
    """sdjax's sampler `name` against diffusers' class for it set up by `from_config(config)`:
    timesteps, input scaling, initial sigma and every update, for each step count, with a
    made-up model whose output depends on its input. `prediction_type` overrides the config's in
    both (diffusers gets it as a config value the author gave). The final samples agree within
    1e-5 of their scale (at least 1), plus `peak_rtol` times the largest sample on the way, for
    schedules whose float32 arithmetic on huge first samples (zero terminal SNR: sigma 4096)
    leaves rounding noise of that size in diffusers' result itself."""
    import jax.numpy as jnp

    ref_config = dict(config)
    if prediction_type is not None:
        ref_config["prediction_type"] = prediction_type
        ref_config["_use_default_values"] = [k for k in config.get("_use_default_values", ())
                                             if k != "prediction_type"]
    rng = np.random.default_rng(seed)
    for count in steps:
        ref = diffusers_scheduler(name, ref_config)
        ref.set_timesteps(count)
        ours = make_scheduler(name, config, count, prediction_type)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
        x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32) * ours.init_noise_sigma
        x_ref, x_ours, state = torch.from_numpy(x), jnp.asarray(x), ours.init_state(jnp.asarray(x))
        noises = rng.standard_normal((len(ours.timesteps),) + x.shape).astype(np.float32)
        FixedNoise(monkeypatch, noises)
        peak = float(np.abs(x).max())
        for i, t in enumerate(ref.timesteps):
            model_in = ref.scale_model_input(x_ref, t)
            np.testing.assert_allclose(np.asarray(x_ours * ours.input_scale(i)), model_in.numpy(),
                                       atol=1e-5 * max(1.0, float(np.abs(x_ref.numpy()).max()))
                                       + peak_rtol * peak)
            out = np.tanh(model_in.numpy()) + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
            x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
            x_ours, state = ours.step(state, i, jnp.asarray(out), x_ours, jnp.asarray(noises[i]))
            peak = max(peak, float(np.abs(x_ref.numpy()).max()))
        scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
        np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy(),
                                   atol=1e-5 * scale + peak_rtol * peak, rtol=0)


def with_values(config, **values):
    """`config` with `values` given by its author (so diffusers' from_config does not drop them as
    defaults it filled in)."""
    out = dict(config, **values)
    if "_use_default_values" in config:
        out["_use_default_values"] = [k for k in config["_use_default_values"] if k not in values]
    return out


def euler_config(**values):
    from diffusers import EulerDiscreteScheduler

    return dict(EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       **values).config)


def dpm_config(**values):
    from diffusers import DPMSolverMultistepScheduler

    return dict(DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", **values).config)


def refusal(name, config, steps=10, prediction_type=None):
    with pytest.raises(ConfigError) as info:
        make_scheduler(name, config, steps, prediction_type)
    message = str(info.value)
    assert "\n" not in message and "in the scheduler config" in message
    return message


def tables(scheduler):
    """Everything a built sampler runs on: its timesteps, scales and step tables."""
    out = {"timesteps": np.asarray(scheduler.timesteps), "init": scheduler.init_noise_sigma}
    out.update({k: v for k, v in vars(scheduler).items()
                if k.startswith("_") and isinstance(v, (np.ndarray, float, tuple, type(None)))})
    if scheduler.input_scales is not None:
        out["scales"] = scheduler.input_scales
    return out


def assert_same_tables(a, b):
    ta, tb = tables(a), tables(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
