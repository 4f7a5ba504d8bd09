"""UniPC, DEIS and singlestep DPM-Solver++ against their diffusers schedulers, option by option
(tests/test_sampling.py and tests/test_scheduler_configs.py run every sampler on the shared
configs); the Karras levels a config asks of euler and dpmpp_2m; and each refusal, checked to be
one diffusers rejects or whose result differs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.errors import ConfigError
from sdjax.sampling.multistep_samplers import singlestep_orders
from sdjax.sampling.schedulers import make_scheduler
from tests.diffusers_reference import diffusers_scheduler
from tests.diffusers_reference import (assert_same_tables, assert_steps_match, dpm_config,
                                       euler_config, sd_config, tables, with_values)

# Around the step counts where the orders change: 1, 2, 3 (warm-up, lower_order_final), 14 and
# 15 (DEIS's lower_order_final stops at 15), and an odd count (singlestep groups).
STEPS = (1, 2, 3, 7, 14, 15)
SD = sd_config(timestep_spacing="trailing")
LINEAR = sd_config(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def differ(name, a, b, steps=10):
    ta, tb = tables(make_scheduler(name, a, steps)), tables(make_scheduler(name, b, steps))
    return any(not np.array_equal(np.asarray(ta[k], float), np.asarray(tb[k], float))
               for k in ta if k in tb) or ta.keys() != tb.keys()


# --- UniPC ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    dict(),  # bh2, order 2, data predictions, corrector on
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 2, 5]),
    dict(disable_corrector=list(range(20)), solver_order=3),  # predictor only
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),  # ends at the last Karras level
    dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=9.0),
    dict(use_beta_sigmas=True),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(solver_type="midpoint"),  # a DPM-Solver config's solver: bh2 in diffusers
], ids=str)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_unipc_options(values, prediction, monkeypatch):
    assert_steps_match("unipc", with_values(SD, **values), monkeypatch, steps=STEPS,
                       prediction_type=prediction)


def test_unipc_options_change_the_result():
    """Each option tested above acts (so matching diffusers with it says something)."""
    base = with_values(SD, final_sigmas_type="sigma_min")
    for values in (dict(solver_type="bh1"), dict(solver_order=3), dict(solver_order=1),
                   dict(predict_x0=False), dict(disable_corrector=[2]),
                   dict(lower_order_final=False)):
        assert differ("unipc", base, with_values(base, **values)), values


# --- DEIS -----------------------------------------------------------------------------------

# DEIS steps on noise predictions: x_next = (alpha'/alpha) x - sigma' (e^h - 1) eps. Long steps
# from a large sigma (2 Karras steps: 14.6 to 0.03; exponential and beta ramps) take differences
# of terms up to ~15 times the sample, whose float32 rounding (a few 1e-6 of the largest sample)
# diffusers' result carries too (it differs from its own float64 run by as much as from sdjax's).
LONG_STEPS = 3e-6


@pytest.mark.parametrize("values, peak_rtol", [
    (dict(), 0.0),
    (dict(solver_order=1), 0.0),
    (dict(lower_order_final=False), 0.0),
    (dict(use_karras_sigmas=True), LONG_STEPS),  # the last step stays: its level repeats
    (dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=9.0), LONG_STEPS),
    (dict(use_beta_sigmas=True), LONG_STEPS),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 0.0),
    (dict(algorithm_type="dpmsolver++", solver_type="bh2"), 0.0),  # other solvers' values
], ids=str)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_deis_options(values, peak_rtol, prediction, monkeypatch):
    assert_steps_match("deis", with_values(SD, **values), monkeypatch, steps=STEPS + (16,),
                       prediction_type=prediction, peak_rtol=peak_rtol)


def run_both(name, config, steps, seed=0):
    """sdjax's `name`, and diffusers' in float32 and in float64 (its noise levels and samples
    cast up), with a made-up model fed the float64 trajectory: the three final samples."""
    rng = np.random.default_rng(seed)
    ref32, ref64 = diffusers_scheduler(name, config), diffusers_scheduler(name, config)
    ref32.set_timesteps(steps)
    ref64.set_timesteps(steps)
    ref64.sigmas = ref64.sigmas.double()
    ours = make_scheduler(name, config, steps)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    x32, x64, x_ours = torch.from_numpy(x), torch.from_numpy(x).double(), jnp.asarray(x)
    state = ours.init_state(x_ours)
    for i, t in enumerate(ref32.timesteps):
        out = np.tanh(x64.numpy()) + 0.1 * rng.standard_normal(x.shape)
        x32 = ref32.step(torch.from_numpy(out.astype(np.float32)), t, x32).prev_sample
        x64 = ref64.step(torch.from_numpy(out), t, x64).prev_sample
        x_ours, state = ours.step(state, i, jnp.asarray(out, jnp.float32), x_ours)
    return np.asarray(x_ours), x32.numpy(), x64.numpy()


@pytest.mark.parametrize("values, steps", [
    (dict(solver_order=3), (3, 4, 14, 16, 25)),
    (dict(solver_order=3, lower_order_final=False, use_karras_sigmas=True), (4, 16)),
    (dict(solver_order=5), (16,)),  # runs as order 3 in diffusers
])
def test_deis_third_order(values, steps):
    """diffusers works DEIS's third-order weights out in float32, where their terms cancel: its
    float32 result is up to ~4e-5 off its own float64 one (trailing, 16 steps). sdjax's float64
    weights land within 1e-5 (of the samples' scale) of diffusers' float64 result."""
    config = with_values(SD, **values)
    for count in steps:
        ours, ref32, ref64 = run_both("deis", config, count)
        scale = max(1.0, float(np.abs(ref64).max()))
        np.testing.assert_allclose(ours, ref64, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(ours, ref32, atol=1e-4 * scale, rtol=0)
    ours, ref32, ref64 = run_both("deis", with_values(SD, solver_order=3), 16)
    assert np.abs(ref32 - ref64).max() > 2e-5  # why the float64 reference


def test_deis_orders_above_three_run_as_three():
    assert_same_tables(make_scheduler("deis", with_values(SD, solver_order=5), 12),
                       make_scheduler("deis", with_values(SD, solver_order=3), 12))
    assert differ("deis", with_values(SD, solver_order=3), SD)


# --- singlestep DPM-Solver++ ----------------------------------------------------------------

def test_singlestep_order_plan_is_diffusers():
    """The order of every step for 1..20 steps, each order, lower_order_final and final sigma
    (set_timesteps forces lower_order_final where the groups do not fit, or the end is zero)."""
    from diffusers import DPMSolverSinglestepScheduler

    for order in (1, 2, 3):
        for lower in (False, True):
            for final in ("zero", "sigma_min"):
                for steps in range(1, 21):
                    ref = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower,
                                                       final_sigmas_type=final)
                    ref.set_timesteps(steps)
                    assert singlestep_orders(order, steps, lower, final == "zero") == list(
                        ref.order_list), (order, lower, final, steps)


@pytest.mark.parametrize("values", [
    dict(),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),  # [1, 2] groups when even
    dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
    dict(solver_type="heun"),
    dict(use_karras_sigmas=True, solver_order=3),
    dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=9.0),
    dict(use_beta_sigmas=True),
    dict(lambda_min_clipped=-5.1),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    # Other solvers' values: DPM-Solver++ (deis only with sigma_min: see the refusals).
    dict(algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min"),
], ids=str)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_singlestep_options(values, prediction, monkeypatch):
    config = with_values(dpm_config(), **values)
    assert_steps_match("dpmpp_single", config, monkeypatch, steps=STEPS + (6, 12),
                       prediction_type=prediction)


# --- all three ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unipc", "deis", "dpmpp_single"])
def test_linear_schedule_and_fori_loop(name, monkeypatch):
    """The linear schedule (larger noise levels), and the state as a fixed-shape loop carry: a
    jitted lax.fori_loop gives the Python loop's result."""
    assert_steps_match(name, with_values(LINEAR, solver_order=3), monkeypatch, steps=(2, 9))
    scheduler = make_scheduler(name, with_values(LINEAR, solver_order=3), 9)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 2, 2)), jnp.float32)

    def body(i, carry):
        x, state = carry
        return scheduler.step(state, i, jnp.tanh(x), x)

    looped, _ = jax.jit(lambda x: jax.lax.fori_loop(0, 9, body, (x, scheduler.init_state(x))))(x0)
    x, state = x0, scheduler.init_state(x0)
    for i in range(9):
        x, state = body(i, (x, state))
    np.testing.assert_allclose(np.asarray(looped), np.asarray(x), rtol=1e-5, atol=1e-5)


# --- Karras levels a config asks for ----------------------------------------------------------

def test_config_karras_levels_for_euler_and_dpmpp_2m(monkeypatch):
    """With use_karras_sigmas=True in the config, euler and dpmpp_2m run Karras levels as their
    diffusers classes' from_config(config) do, and dpmpp_2m is then dpmpp_2m_karras."""
    for config in (euler_config(use_karras_sigmas=True), dpm_config(use_karras_sigmas=True),
                   with_values(sd_config(), use_karras_sigmas=True)):
        for name in ("euler", "dpmpp_2m"):
            assert_steps_match(name, config, monkeypatch, steps=(4, 20))
            assert differ(name, config, with_values(config, use_karras_sigmas=False))
        assert_same_tables(make_scheduler("dpmpp_2m", config, 20),
                           make_scheduler("dpmpp_2m_karras", config, 20))


# --- refusals -------------------------------------------------------------------------------

def diffusers_outcome(name, config, steps=10, channels=4):
    """diffusers' final samples for a fixed made-up model, or the exception it raises."""
    rng = np.random.default_rng(3)
    try:
        ref = diffusers_scheduler(name, config)
        ref.set_timesteps(steps)
        x = torch.from_numpy(rng.standard_normal((1, channels, 4, 4)).astype(np.float32))
        for t in ref.timesteps:
            out = torch.from_numpy(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
            x = ref.step(out, t, x).prev_sample
        return x.numpy()
    except Exception as error:  # noqa: BLE001 (any way diffusers rejects it)
        return error


def refused(name, config, *expected):
    with pytest.raises(ConfigError) as info:
        make_scheduler(name, config, 4)
    message = str(info.value)
    assert "\n" not in message and "in the scheduler config" in message
    for text in expected:
        assert text in message
    return message


def rejected_or_changed(name, config, plain):
    """diffusers rejects `config`, or its result is not finite or differs from `plain`'s."""
    result = diffusers_outcome(name, config)
    if isinstance(result, Exception):
        return True
    other = diffusers_outcome(name, plain)
    return not np.isfinite(result).all() or np.abs(result - other).max() > 1e-3


@pytest.mark.parametrize("name, values, expected", [
    ("unipc", dict(solver_order=4), ("solver_order=4", "from 1 to 3")),
    ("unipc", dict(solver_order=0), ("solver_order=0", "from 1 to 3")),
    ("unipc", dict(solver_type="rk4"), ("solver_type='rk4'", "bh1 or bh2")),
    ("unipc", dict(solver_type="bh1"), ("solver_type='bh1' with final_sigmas_type='zero'",
                                        "NaN", "sigma_min")),
    ("unipc", dict(predict_x0=False), ("predict_x0=False with final_sigmas_type='zero'",
                                       "sigma_min")),
    ("unipc", dict(lower_order_final=False), ("lower_order_final=False with final_sigmas_type",
                                              "set lower_order_final true")),
    ("unipc", dict(shift_terminal=0.5), ("shift_terminal=0.5", "set shift_terminal to null")),
    ("unipc", dict(use_flow_sigmas=True), ("use_flow_sigmas=True", "use_flow_sigmas false")),
    ("deis", dict(use_flow_sigmas=True), ("use_flow_sigmas=True",)),
    ("deis", dict(solver_order=0), ("solver_order=0", "from 1 to 3")),
    ("deis", dict(algorithm_type="heun"), ("algorithm_type='heun'", "set it to deis")),
    ("deis", dict(solver_type="rk4"), ("solver_type='rk4'", "set it to logrho")),
    ("dpmpp_single", dict(use_flow_sigmas=True), ("use_flow_sigmas=True",)),
    ("dpmpp_single", dict(solver_order=4), ("solver_order=4", "from 1 to 3")),
    ("dpmpp_single", dict(solver_type="rk4"), ("solver_type='rk4'", "midpoint or heun")),
    ("dpmpp_single", dict(algorithm_type="sde-dpmsolver++"),
     ("algorithm_type='sde-dpmsolver++'", "set it to dpmsolver++")),
    ("dpmpp_single", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     ("algorithm_type='dpmsolver'", "set it to dpmsolver++")),
    ("dpmpp_single", dict(algorithm_type="dpmsolver"), ("algorithm_type='dpmsolver'",)),
    ("dpmpp_single", dict(algorithm_type="deis"), ("algorithm_type='deis' with final_sigmas_type",
                                                   "set final_sigmas_type to sigma_min")),
    ("dpmpp_single", dict(variance_type="learned_range"), ("variance_type='learned_range'",
                                                           "set variance_type to null")),
], ids=str)
def test_refusals(name, values, expected):
    config = with_values(SD, **values)
    refused(name, config, *expected)
    plain = with_values(SD, **{k: v for k, v in values.items() if k == "final_sigmas_type"})
    assert rejected_or_changed(name, config, plain)


def test_unipc_refuses_another_predictor():
    """solver_p: diffusers takes UniPC's predictor steps with the given scheduler."""
    from diffusers import DDIMScheduler

    config = dict(SD, solver_p=DDIMScheduler())
    refused("unipc", config, "solver_p", "set solver_p to null")
    assert rejected_or_changed("unipc", config, SD)


def test_refused_finals_run_with_sigma_min():
    """The UniPC values refused with a zero final sigma run (and match) with sigma_min."""
    for values in (dict(solver_type="bh1"), dict(predict_x0=False),
                   dict(lower_order_final=False)):
        make_scheduler("unipc", with_values(SD, final_sigmas_type="sigma_min", **values), 4)
    make_scheduler("unipc", with_values(SD, lower_order_final=False, solver_order=1), 4)
