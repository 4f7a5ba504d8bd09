"""Scheduler configs against diffusers: sdjax accepts every config diffusers' class for a sampler
accepts, unless the result would differ, in which case it refuses it with a one-line message.

Keys the class does not take (a DDPMScheduler config's variance_type for dpmpp_2m, say) are
ignored as `from_config` ignores them; values sdjax implements are checked step by step against
`<Class>.from_config(config)` (tests/test_sampling.py's `assert_steps_match`); each refusal that
stays is checked to be one diffusers rejects too, or one that changes diffusers' result."""

import inspect

import numpy as np
import pytest
import torch

from sdjax.errors import ConfigError
from sdjax.sampling.schedulers import DIFFUSERS_CLASSES, SAMPLERS, SCHEDULERS, make_scheduler
from tests.diffusers_reference import (STEPS, assert_same_tables, assert_steps_match, diffusers_scheduler,
                                       dpm_config, euler_config, refusal, sd_config, tables,
                                       with_values)



def diffusers_class(name):
    import diffusers

    return getattr(diffusers, DIFFUSERS_CLASSES[name])


def init_keys(cls):
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def hub_ddpm_config(**values):
    """A DDPMScheduler config shaped like those of SD 1.x-style hub repos: written by an old
    diffusers (no _use_default_values, no timestep_spacing), with keys of the PNDM config it was
    made from."""
    config = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": True,
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
              "variance_type": "fixed_small"}
    config.update(values)
    return config


def ddpm_class_config():
    """The same schedule as a current DDPMScheduler writes it (its defaults listed as such)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              variance_type="fixed_small", clip_sample=True, steps_offset=1).config)


# --- which keys sdjax reads ----------------------------------------------------------------------

# __init__ arguments of a diffusers class that sdjax does not read: the sampler's name fixes them
# (DPM-Solver++ of order 2), or they only act with options sdjax refuses (flow matching) or with
# arguments sdjax never passes (set_timesteps' mu), or they seed a noise source sdjax replaces
# with its own draws (DPMSolverSDEScheduler's Brownian tree).
NAME_FIXED = {"DPMSolverMultistepScheduler": {"solver_order", "algorithm_type", "flow_shift",
                                              "use_dynamic_shifting", "time_shift_type"},
              "DPMSolverSDEScheduler": {"noise_sampler_seed"},
              # Flow matching and set_timesteps' mu only (UniPC's shift_terminal is read, and
              # refused: diffusers rejects it without flow sigmas).
              "UniPCMultistepScheduler": {"flow_shift", "use_dynamic_shifting",
                                          "time_shift_type"},
              "DEISMultistepScheduler": {"flow_shift", "use_dynamic_shifting", "time_shift_type"},
              "DPMSolverSinglestepScheduler": {"flow_shift", "use_dynamic_shifting",
                                               "time_shift_type"}}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sdjax_reads_exactly_the_keys_its_diffusers_class_takes(name):
    """A key the class's __init__ does not take never reaches it through from_config, so sdjax
    must not read it (nor refuse it); a key it takes and sdjax does not read must be one the
    sampler's name fixes. (DPMSolverMultistepScheduler also reads sigma_min / sigma_max left on
    its config by another class's: see test_dpmpp_borrows_sigma_bounds_like_diffusers.)"""
    cls = diffusers_class(name)
    read = set(SAMPLERS[name].defaults)
    assert read <= init_keys(cls), read - init_keys(cls)
    unread = init_keys(cls) - read - NAME_FIXED.get(cls.__name__, set())
    assert not unread, f"{cls.__name__} takes {sorted(unread)}: read them in its SamplerSpec defaults or explain"
    assert set(SAMPLERS[name].borrowed).isdisjoint(init_keys(cls))


# Values other than the defaults for the keys of the schedulers' configs (the one a key takes
# here is one that changes the result of every class that takes the key).
ODD = dict(variance_type="learned_range", clip_sample=True, clip_sample_range=0.3,
           set_alpha_to_one=True, thresholding=True, dynamic_thresholding_ratio=0.6,
           sample_max_value=1.3, skip_prk_steps=False, interpolation_type="log_linear",
           use_karras_sigmas=True, use_exponential_sigmas=True, use_beta_sigmas=True,
           sigma_min=0.3, sigma_max=3.0, timestep_type="continuous", final_sigmas_type="sigma_min",
           rescale_betas_zero_snr=True, solver_order=3, algorithm_type="sde-dpmsolver++",
           solver_type="heun", lower_order_final=False, euler_at_final=True, use_lu_lambdas=True,
           use_flow_sigmas=True, flow_shift=3.0, lambda_min_clipped=-5.1,
           use_dynamic_shifting=True, time_shift_type="linear")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_keys_the_class_does_not_take_are_ignored(name, monkeypatch):
    """A config with every other scheduler's keys at odd values runs as the config without them,
    in sdjax and in diffusers (whose from_config drops them). The old code refused
    rescale_betas_zero_snr for pndm, which PNDMScheduler does not take."""
    import diffusers

    classes = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
    every = set().union(*(init_keys(getattr(diffusers, c)) for c in classes))
    foreign = every - init_keys(diffusers_class(name)) - set(SAMPLERS[name].borrowed)
    odd = {k: ODD[k] for k in foreign if k in ODD}
    assert odd
    config = sd_config(timestep_spacing="trailing")
    odd_config = with_values(config, **odd)
    for steps in (4, 20):
        assert_same_tables(make_scheduler(name, odd_config, steps),
                           make_scheduler(name, config, steps))
    assert_steps_match(name, odd_config, monkeypatch, steps=(4,), prediction_type="v_prediction")


# --- DDPMScheduler configs (the issue) -------------------------------------------------------

@pytest.mark.parametrize("config_name", ["hub", "class"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_ddpm_configs_run_every_sampler_as_diffusers(name, config_name, monkeypatch):
    """variance_type=fixed_small and clip_sample=true, as DDPMScheduler configs hold them: DDIM
    clips (it takes clip_sample); the others ignore both, DPMSolverMultistepScheduler because it
    only acts on a learned variance. The old code refused every one of these for dpmpp_2m."""
    config = hub_ddpm_config() if config_name == "hub" else ddpm_class_config()
    assert_steps_match(name, config, monkeypatch, steps=STEPS)
    if name.startswith("dpmpp_2m"):
        plain = {k: v for k, v in config.items() if k not in ("variance_type", "clip_sample")}
        assert_same_tables(make_scheduler(name, config, 20), make_scheduler(name, plain, 20))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_prediction_ddpm_config(name, monkeypatch):
    """The same with a v-prediction model."""
    assert_steps_match(name, hub_ddpm_config(prediction_type="v_prediction"), monkeypatch,
                       steps=(4,))


# --- values sdjax now implements ----------------------------------------------------------------

ZERO_SNR = sd_config(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                     prediction_type="v_prediction")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_zero_terminal_snr(name, monkeypatch):
    """rescale_betas_zero_snr (Lin et al. 2023) as each class does it: DDIM and DDPM with
    alpha_bar 0 at the last timestep, the Euler and DPM-Solver classes and UniPC with 2**-24,
    the classes that do not take the key (PNDM, LMS, Heun, KDPM2, DPMSolverSDE, DEIS,
    DPMSolverSinglestep) not at all. The Euler samplers start from samples of size ~4096 * 3, whose float32
    rounding (~1e-3) diffusers' result carries too: they are compared within 3e-7 of that."""
    assert_steps_match(name, ZERO_SNR, monkeypatch, steps=STEPS, peak_rtol=3e-7)
    plain = with_values(ZERO_SNR, rescale_betas_zero_snr=False)
    differs = any(not np.array_equal(a, b) for a, b in zip(
        tables(make_scheduler(name, ZERO_SNR, 20)).values(),
        tables(make_scheduler(name, plain, 20)).values()))
    assert differs == ("rescale_betas_zero_snr" in SAMPLERS[name].defaults)


@pytest.mark.parametrize("name, values, steps", [
    ("ddim", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), STEPS),
    # s is then sample_max_value itself; dividing by it each step grows float32 rounding, so
    # fewer steps
    ("ddim", dict(thresholding=True, sample_max_value=0.8), (1, 4, 10)),
    ("ddim", dict(thresholding=True, clip_sample=True, dynamic_thresholding_ratio=0.95,
                  sample_max_value=2.0), STEPS),  # thresholding takes precedence over clipping
    ("dpmpp_2m", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
     STEPS),
    ("dpmpp_2m_karras", dict(thresholding=True, dynamic_thresholding_ratio=0.8,
                             sample_max_value=3.0), STEPS),
])
def test_dynamic_thresholding(name, values, steps, monkeypatch):
    assert_steps_match(name, with_values(sd_config(), **values), monkeypatch, steps=steps)


@pytest.mark.parametrize("config, prediction", [
    (euler_config(interpolation_type="log_linear"), "epsilon"),
    (euler_config(interpolation_type="log_linear", use_karras_sigmas=True), "epsilon"),
    (euler_config(timestep_type="continuous"), "v_prediction"),
    (euler_config(timestep_type="continuous"), "epsilon"),  # continuous only acts with v
    (euler_config(timestep_type="continuous", interpolation_type="log_linear"), "v_prediction"),
    (euler_config(use_exponential_sigmas=True), "epsilon"),
    (euler_config(use_beta_sigmas=True), "v_prediction"),
    (euler_config(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=9.0), "epsilon"),
    (euler_config(use_beta_sigmas=True, sigma_min=0.1, sigma_max=9.0), "epsilon"),
    (euler_config(use_karras_sigmas=True, sigma_min=0.1, sigma_max=9.0,
                  final_sigmas_type="sigma_min"), "epsilon"),
    (euler_config(rescale_betas_zero_snr=True, timestep_type="continuous",
                  timestep_spacing="trailing"), "v_prediction"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_euler_noise_level_options(config, prediction, monkeypatch):
    peak_rtol = 3e-7 if config["rescale_betas_zero_snr"] else 0.0  # see test_zero_terminal_snr
    for name in ("euler", "euler_a"):  # EulerAncestral takes none of these keys but zero SNR's
        assert_steps_match(name, config, monkeypatch, steps=STEPS, prediction_type=prediction,
                           peak_rtol=peak_rtol)


@pytest.mark.parametrize("values, prediction", [
    (dict(use_exponential_sigmas=True), "epsilon"),
    (dict(use_beta_sigmas=True), "v_prediction"),
    (dict(use_lu_lambdas=True), "epsilon"),
    (dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2"), "v_prediction"),
    (dict(use_lu_lambdas=True, use_exponential_sigmas=True), "epsilon"),  # Lu levels come first
    (dict(variance_type="learned_range"), "v_prediction"),  # only read for epsilon models
    (dict(solver_type="bh2"), "epsilon"),  # a UniPC config's solver: midpoint in diffusers
    (dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False),
     "epsilon"),
    (dict(timestep_spacing="leading", steps_offset=1, lambda_min_clipped=-5.1), "v_prediction"),
], ids=str)
def test_dpmpp_options(values, prediction, monkeypatch):
    config = dpm_config(**{k: v for k, v in values.items() if k != "beta_schedule"})
    config = with_values(config, **values)
    assert_steps_match("dpmpp_2m", config, monkeypatch, steps=STEPS, prediction_type=prediction)


def test_dpmpp_borrows_sigma_bounds_like_diffusers(monkeypatch):
    """from_config keeps every key of the config on the scheduler's config, and
    DPMSolverMultistepScheduler's Karras, exponential and beta levels read sigma_min / sigma_max
    from it when present: an EulerDiscreteScheduler config's bounds apply. (The old code ignored
    them: its dpmpp_2m_karras differed from diffusers'.)"""
    config = euler_config(sigma_min=0.1, sigma_max=9.0)
    assert_steps_match("dpmpp_2m_karras", config, monkeypatch, steps=STEPS)
    assert_steps_match("dpmpp_2m", with_values(config, use_exponential_sigmas=True), monkeypatch,
                       steps=(4,))
    unbounded = make_scheduler("dpmpp_2m_karras", euler_config(), 10)
    assert not np.array_equal(make_scheduler("dpmpp_2m_karras", config, 10).timesteps,
                              unbounded.timesteps)


# --- refusals that stay ---------------------------------------------------------------------

def ref_result(name, config, steps=4, channels=4, prediction_type=None):
    """diffusers' samples after `steps` updates with a fixed made-up model, or the error it
    raises."""
    rng = np.random.default_rng(3)
    try:
        ref = diffusers_scheduler(name, config)
        ref.set_timesteps(steps)
        x = torch.from_numpy(rng.standard_normal((1, channels, 4, 4)).astype(np.float32))
        for t in ref.timesteps[:steps]:
            out = torch.from_numpy(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
            x = ref.step(out, t, ref.scale_model_input(x, t)).prev_sample
        return x.numpy()
    except (ValueError, NotImplementedError, RuntimeError) as error:
        return error


def test_prediction_types_other_than_epsilon_and_v_are_refused():
    """diffusers' DDIM, Euler and DPM-Solver run models that predict the clean sample, with a
    result unlike both supported types'; PNDM and Euler ancestral reject them."""
    for name in SCHEDULERS:
        message = refusal(name, with_values(sd_config(), prediction_type="sample"))
        assert "prediction_type='sample'" in message and "epsilon and v_prediction" in message
        assert "prediction_type='flow_prediction' in the scheduler config" in refusal(
            name, with_values(sd_config(), prediction_type="flow_prediction"))
        with pytest.raises(ConfigError, match="^prediction_type='sample' is not supported by the "
                                              "sdjax samplers"):
            make_scheduler(name, sd_config(), 10, prediction_type="sample")
    for name in ("ddim", "euler", "dpmpp_2m"):
        sample = ref_result(name, with_values(sd_config(), prediction_type="sample"))
        for other in ("epsilon", "v_prediction"):
            assert np.abs(sample - ref_result(name, with_values(sd_config(), prediction_type=other))
                          ).max() > 1e-3
    for name in ("pndm", "euler_a"):
        assert isinstance(ref_result(name, with_values(sd_config(), prediction_type="sample")),
                          Exception)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_unknown_timestep_spacing_is_refused_as_diffusers_does(name):
    """(A class that takes no timestep_spacing, DPMSolverSinglestepScheduler, ignores it: so does
    its sampler.)"""
    config = with_values(sd_config(), timestep_spacing="middle")
    if "timestep_spacing" not in init_keys(diffusers_class(name)):
        assert_same_tables(make_scheduler(name, config, 10), make_scheduler(name, sd_config(), 10))
        assert isinstance(ref_result(name, config), np.ndarray)
        return
    message = refusal(name, config)
    assert message.startswith("timestep_spacing='middle' in the scheduler config")
    assert "leading, trailing, linspace" in message
    assert isinstance(ref_result(name, config), ValueError)


def test_pndm_refuses_runge_kutta_steps():
    """skip_prk_steps=false makes PNDMScheduler run Runge-Kutta warm-up steps (other timesteps,
    other updates); sdjax's pndm is PLMS only. Other samplers ignore the key, as their classes."""
    config = with_values(sd_config(), skip_prk_steps=False)
    message = refusal("pndm", config)
    assert "skip_prk_steps=False" in message and "--scheduler" in message
    from diffusers import PNDMScheduler

    prk, plms = PNDMScheduler.from_config(config), PNDMScheduler.from_config(config,
                                                                             skip_prk_steps=True)
    prk.set_timesteps(10)
    plms.set_timesteps(10)
    assert len(prk.timesteps) != len(plms.timesteps)
    for name in ("ddim", "euler", "euler_a", "dpmpp_2m"):
        make_scheduler(name, config, 10)


def test_dpmpp_refuses_flow_sigmas():
    """use_flow_sigmas gives flow-matching noise levels and alphas (alpha = 1 - sigma)."""
    config = dpm_config(use_flow_sigmas=True)
    for name in ("dpmpp_2m", "dpmpp_2m_karras"):
        assert "use_flow_sigmas=True" in refusal(name, config)
    flow, plain = ref_result("dpmpp_2m", config), ref_result("dpmpp_2m", dpm_config())
    assert np.abs(flow - plain).max() > 1e-3


def test_dpmpp_refuses_a_learned_variance_for_epsilon_models():
    """With variance_type learned or learned_range, DPMSolverMultistepScheduler keeps only the
    first 3 channels of an epsilon model's output: on a 4-channel latent model it fails, where
    fixed_small (ignored, as None) runs; with v_prediction the key is not read (accepted, see
    test_dpmpp_options)."""
    for variance in ("learned", "learned_range"):
        config = hub_ddpm_config(variance_type=variance)
        message = refusal("dpmpp_2m", config)
        assert f"variance_type={variance!r}" in message and "--scheduler" in message
        assert "variance_type" in refusal("dpmpp_2m_karras", config)
        assert isinstance(ref_result("dpmpp_2m", config), RuntimeError)
        make_scheduler("dpmpp_2m", config, 10, prediction_type="v_prediction")
        make_scheduler("ddim", config, 10)  # DDIMScheduler does not take variance_type
    assert isinstance(ref_result("dpmpp_2m", hub_ddpm_config()), np.ndarray)


@pytest.mark.parametrize("name, values, expected", [
    ("dpmpp_2m", dict(solver_type="rk4"), "solver_type='rk4' in the scheduler config"),
    ("euler", dict(final_sigmas_type="last"), "final_sigmas_type='last' in the scheduler config"),
    ("dpmpp_2m", dict(final_sigmas_type="last"), "final_sigmas_type='last'"),
    ("euler", dict(interpolation_type="cubic"), "interpolation_type='cubic' in the scheduler"),
    ("euler", dict(use_karras_sigmas=True, use_beta_sigmas=True),
     "use_karras_sigmas and use_beta_sigmas are all true in the scheduler config"),
    ("dpmpp_2m", dict(use_exponential_sigmas=True, use_beta_sigmas=True),
     "use_exponential_sigmas and use_beta_sigmas"),
])
def test_values_diffusers_rejects_are_refused(name, values, expected):
    config = with_values(sd_config(), **values)
    assert expected in refusal(name, config)
    assert isinstance(ref_result(name, config), (ValueError, NotImplementedError))


def test_dpmpp_2m_karras_name_picks_the_noise_levels():
    """dpmpp_2m_karras means Karras levels (the config's exponential or beta choice does not
    apply, as diffusers' Karras branch comes first); dpmpp_2m means the config's other levels."""
    config = dpm_config(use_exponential_sigmas=True)
    assert_same_tables(make_scheduler("dpmpp_2m_karras", config, 10),
                       make_scheduler("dpmpp_2m_karras", dpm_config(), 10))
    assert not np.array_equal(make_scheduler("dpmpp_2m", config, 10).timesteps,
                              make_scheduler("dpmpp_2m", dpm_config(), 10).timesteps)
