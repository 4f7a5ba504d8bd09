"""DDPM, LMS, Heun, KDPM2 and DPM-Solver++ SDE against their diffusers classes, beyond the
every-sampler checks of test_sampling.py and test_scheduler_configs.py: DDPM's variance types and
refusals, the noise-level options of the sigma samplers (with sigma bounds borrowed from an Euler
config where the class reads them), LMS's integrated coefficients, and dpmpp_sde's noise, which
is checked against diffusers' own torchsde Brownian tree."""

import jax
import numpy as np
import pytest
import torch

from sdjax.errors import ConfigError
from sdjax.sampling.schedulers import SAMPLERS, make_scheduler
from tests.diffusers_reference import diffusers_scheduler
from tests.diffusers_reference import (STEPS, assert_same_tables, assert_steps_match,
                                       euler_config, refusal, sd_config, with_values)

NEW = ("ddpm", "lms", "heun", "kdpm2", "dpmpp_sde")


def ddpm_config(**values):
    from diffusers import DDPMScheduler

    settings = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)
    settings.update(values)
    return dict(DDPMScheduler(**settings).config)


# --- DDPM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large", None])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_variance_types(variance, prediction, monkeypatch):
    """Each fixed variance type, with sdjax's noise handed to diffusers' randn_tensor. null (as a
    DPMSolverMultistepScheduler config holds it) runs as fixed_small in DDPMScheduler."""
    for spacing in ("leading", "trailing", "linspace"):
        config = ddpm_config(variance_type=variance, timestep_spacing=spacing)
        assert_steps_match("ddpm", config, monkeypatch, steps=STEPS, prediction_type=prediction)
    small = make_scheduler("ddpm", ddpm_config(), 10)
    ours = make_scheduler("ddpm", ddpm_config(variance_type=variance), 10)
    same = np.array_equal(ours._noise_coef, small._noise_coef)
    assert same == (variance in ("fixed_small", None))
    assert ours._noise_coef[-1] > 0 and make_scheduler(  # no noise at timestep 0
        "ddpm", ddpm_config(steps_offset=0), 10)._noise_coef[-1] == 0


@pytest.mark.parametrize("values", [
    dict(clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False),
], ids=str)
def test_ddpm_options(values, monkeypatch):
    config = with_values(ddpm_config(), **values)
    assert_steps_match("ddpm", config, monkeypatch, steps=STEPS, prediction_type="v_prediction")


def test_ddpm_refuses_variances_it_cannot_run():
    """learned / learned_range read a variance from extra output channels: with a 4-channel
    (noise only) model diffusers' DDPMScheduler fails; fixed_large_log takes the square root of
    log(beta), NaN. Both refused with one line naming the key and a fix."""
    from diffusers import DDPMScheduler

    x = torch.ones(1, 4, 2, 2)
    for variance in ("learned", "learned_range"):
        message = refusal("ddpm", ddpm_config(variance_type=variance))
        assert f"variance_type={variance!r}" in message and "fixed_small" in message
        assert "--scheduler" in message
        ref = DDPMScheduler(variance_type=variance)
        ref.set_timesteps(4)
        with pytest.raises(TypeError):
            ref.step(x, ref.timesteps[0], x)
    message = refusal("ddpm", ddpm_config(variance_type="fixed_large_log"))
    assert "variance_type='fixed_large_log'" in message and "fixed_large" in message
    ref = DDPMScheduler(variance_type="fixed_large_log")
    ref.set_timesteps(4)
    assert torch.isnan(ref.step(x, ref.timesteps[0], x).prev_sample).all()
    # Other samplers do not take variance_type: they ignore it, as their classes.
    for name in NEW[1:]:
        make_scheduler(name, ddpm_config(variance_type="learned_range"), 10)


# --- the sigma samplers' noise levels -----------------------------------------------------------

LEVELS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
          dict(use_beta_sigmas=True)]


@pytest.mark.parametrize("values", LEVELS, ids=str)
@pytest.mark.parametrize("name", ["lms", "heun", "kdpm2", "dpmpp_sde"])
def test_noise_level_options(name, values, monkeypatch):
    """Karras (KDPM2: to whole timesteps), exponential and beta levels, in a config of the
    class's own and in an Euler config with sigma_min / sigma_max, which from_config keeps on the
    scheduler and the class reads for exponential and beta levels (Heun and KDPM2 for Karras
    ones too)."""
    own = with_values(sd_config(timestep_spacing="linspace", steps_offset=0), **values)
    assert_steps_match(name, own, monkeypatch, steps=STEPS, prediction_type="epsilon")
    bounded = euler_config(sigma_min=0.1, sigma_max=9.0, **values)
    assert_steps_match(name, bounded, monkeypatch, steps=(4,), prediction_type="v_prediction")
    reads_bounds = "use_karras_sigmas" not in values or name in ("heun", "kdpm2")
    unbounded = make_scheduler(name, euler_config(**values), 10)
    assert np.array_equal(make_scheduler(name, bounded, 10).timesteps,
                          unbounded.timesteps) != reads_bounds


def test_heun_clips_its_clean_sample_estimates(monkeypatch):
    config = with_values(sd_config(), clip_sample=True, clip_sample_range=0.7)
    assert_steps_match("heun", config, monkeypatch, steps=STEPS)
    assert not np.array_equal(
        *(np.asarray(run_loop(make_scheduler("heun", c, 4), 0)) for c in (config, sd_config())))


def test_lms_coefficients_are_diffusers_integrals():
    """The exact integrals of the Lagrange basis polynomials equal diffusers' numerical ones."""
    for steps in (1, 3, 12):
        ours = make_scheduler("lms", sd_config(), steps)
        ref = diffusers_scheduler("lms", sd_config())
        ref.set_timesteps(steps)
        for i in range(steps):
            order = min(i + 1, 4)
            expected = [ref.get_lms_coefficient(order, i, j) for j in range(order)]
            np.testing.assert_allclose(ours._weights[i, :order], expected, rtol=1e-5, atol=1e-7)
            assert not ours._weights[i, order:].any()


# --- dpmpp_sde's noise --------------------------------------------------------------------------

# torchsde notes that diffusers' float32 smallest sigma lies below the tree's float64 start.
@pytest.mark.filterwarnings("ignore:Should have ta>=t0")
def test_dpmpp_sde_noise_matches_diffusers_brownian_tree():
    """diffusers (not patched) with its seeded torchsde Brownian tree, against sdjax given the
    standard-normal draws the tree's increments amount to: the first stage's normalised
    increment is draw 2k itself, the second stage's increment (over [sigma_{k+1}, sigma_k]) minus
    the first's (over [s, sigma_k]) is draw 2k+1 over [sigma_{k+1}, s]. Those draws come out
    standard normal, which holds only if the tree's second increment contains its first, as
    sdjax builds it."""
    from diffusers.schedulers import scheduling_dpmsolver_sde as sde

    steps, shape = 6, (1, 4, 16, 16)
    config = with_values(sd_config(), noise_sampler_seed=11)
    ref = diffusers_scheduler("dpmpp_sde", config)
    ref.set_timesteps(steps)
    ours = make_scheduler("dpmpp_sde", config, steps)
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(shape).astype(np.float32) * ours.init_noise_sigma
    outputs = rng.standard_normal((ours.num_evaluations,) + shape).astype(np.float32)

    handed = []  # (sigma, sigma_next, normalised increment) as diffusers' tree gives them
    original = sde.BrownianTreeNoiseSampler.__call__

    def record(self, sigma, sigma_next):
        value = original(self, sigma, sigma_next)
        handed.append((float(sigma), float(sigma_next), value.numpy().astype(np.float64)))
        return value

    x = torch.from_numpy(x0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sde.BrownianTreeNoiseSampler, "__call__", record)
        for i, t in enumerate(ref.timesteps):
            ref.scale_model_input(x, t)
            x = ref.step(torch.from_numpy(outputs[i]), t, x).prev_sample
    assert len(handed) == ours.num_evaluations - 1  # none at the final Euler step

    draws = np.zeros((ours.num_evaluations,) + shape)
    for k in range(0, len(handed), 2):
        (start, mid, first), (start2, end, second) = handed[k], handed[k + 1]
        assert start2 == start and end < mid < start
        a, b = start - mid, mid - end
        draws[k] = first
        draws[k + 1] = (second * np.sqrt(a + b) - first * np.sqrt(a)) / np.sqrt(b)
    assert abs(draws[1::2].std() - 1) < 0.1 and abs(draws[1::2].mean()) < 0.1
    assert abs(np.corrcoef(draws[0:-1:2].ravel(), draws[1::2].ravel())[0, 1]) < 0.1

    mine, state = jax.numpy.asarray(x0), ours.init_state(jax.numpy.asarray(x0))
    for i in range(ours.num_evaluations):
        mine, state = ours.step(state, i, outputs[i], mine, draws[i].astype(np.float32))
    np.testing.assert_allclose(np.asarray(mine), x.numpy(), rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(x.numpy()).max())))


def test_dpmpp_sde_ignores_its_noise_seed():
    """noise_sampler_seed seeds diffusers' Brownian tree; sdjax draws its own noise."""
    assert_same_tables(make_scheduler("dpmpp_sde", with_values(sd_config(), noise_sampler_seed=3),
                                      10), make_scheduler("dpmpp_sde", sd_config(), 10))


# --- in the jitted loop -------------------------------------------------------------------------

def run_loop(scheduler, seed, jitted=False):
    """A made-up model through the scheduler's steps: in Python, or in a jitted fori_loop with
    traced evaluation indices, as the sampler runs them."""
    rng = np.random.default_rng(seed)
    shape = (2, 4, 3, 3)
    x = jax.numpy.asarray(rng.standard_normal(shape).astype(np.float32)
                          * scheduler.init_noise_sigma)
    noise = jax.numpy.asarray(rng.standard_normal((scheduler.num_evaluations,) + shape),
                              jax.numpy.float32)

    def body(i, carry):
        x, state = carry
        out = jax.numpy.tanh(x * scheduler.input_scale(i)) * 0.9
        return scheduler.step(state, i, out, x, noise[i] if scheduler.stochastic else None)

    if jitted:
        return jax.jit(lambda x: jax.lax.fori_loop(0, scheduler.num_evaluations, body,
                                                   (x, scheduler.init_state(x)))[0])(x)
    carry = (x, scheduler.init_state(x))
    for i in range(scheduler.num_evaluations):
        carry = body(i, carry)
    return carry[0]


@pytest.mark.parametrize("name", NEW)
def test_jitted_loop_matches_python_steps(name):
    scheduler = make_scheduler(name, sd_config(), 5)
    assert scheduler.num_evaluations == (9 if name in ("heun", "kdpm2", "dpmpp_sde") else 5)
    np.testing.assert_allclose(np.asarray(run_loop(scheduler, 1, jitted=True)),
                               np.asarray(run_loop(scheduler, 1)), atol=1e-5, rtol=1e-5)


def test_unknown_sampler_values_stay_refused():
    """The checks every sampler shares apply to these too (one line, the key, the fix)."""
    config = with_values(sd_config(), use_karras_sigmas=True, use_exponential_sigmas=True)
    for name in ("lms", "heun", "kdpm2", "dpmpp_sde"):
        assert "use_karras_sigmas and use_exponential_sigmas" in refusal(name, config)
    with pytest.raises(ConfigError, match="^variance_type='learned'"):
        make_scheduler("ddpm", ddpm_config(variance_type="learned"), 3)
    assert set(NEW) <= set(SAMPLERS)
