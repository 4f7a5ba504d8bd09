"""JAX samplers against diffusers' schedulers step by step; seeds; bad input."""

import logging

import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.sampling.schedulers import SCHEDULERS, make_scheduler
from tests.diffusers_reference import assert_steps_match, sd_config


CONFIGS = {
    "leading": sd_config(),
    "trailing": sd_config(timestep_spacing="trailing", prediction_type="v_prediction"),
    "linspace": sd_config(timestep_spacing="linspace", steps_offset=0),
    "clip-alpha1-linear": sd_config(clip_sample=True, set_alpha_to_one=True, beta_schedule="linear",
                                    beta_start=0.0001, beta_end=0.02),
}


# Heun clips its clean-sample estimate (clip_sample) and then divides x - x0 by the next sigma
# (0.01 at the end of the linear schedule): diffusers' own float32 result then differs from the
# same steps in float64 by up to ~1e-5 of the largest sample, and so may sdjax's.
ILL_CONDITIONED = {("heun", "clip-alpha1-linear"): 2e-5}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_steps_match_diffusers(name, config_name, monkeypatch):
    """Timesteps, input scaling, initial sigma and every update, for 1, 3 and 25 steps."""
    assert_steps_match(name, CONFIGS[config_name], monkeypatch,
                       peak_rtol=ILL_CONDITIONED.get((name, config_name), 0.0))


def test_images_depend_only_on_seed_prompt_and_index(sd1):
    """An image is the same whether made alone or with others, and seeds change it."""
    sampler, params = sd1.sampler(), sd1._device_params()
    common = dict(num_inference_steps=3, guidance_scale=1.0, scheduler="euler_a", decode=False)
    # Every call pads to the 4 test devices: one compiled program serves them all.
    two = sampler.sample(params, ["a cat", "a dog"], num_images_per_prompt=2, seed=7, **common)
    one = sampler.sample(params, ["a cat", "a dog"], num_images_per_prompt=1, seed=7, **common)
    other_seed = sampler.sample(params, ["a cat"], num_images_per_prompt=1, seed=8, **common)
    # Same (seed, prompt index, image index): the same image, whatever else the call makes.
    np.testing.assert_allclose(two.latents[2], one.latents[1], atol=1e-5)
    np.testing.assert_allclose(two.latents[0], one.latents[0], atol=1e-5)
    assert np.abs(two.latents[2] - two.latents[3]).max() > 1e-2  # image 1 of a prompt differs
    assert np.abs(one.latents[0] - other_seed.latents[0]).max() > 1e-2  # so does another seed


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=98), "height=98 must be a positive multiple of 4"),
    (dict(width=0), "width=0 must be a positive multiple of 4"),
    (dict(num_inference_steps=0), "num_inference_steps=0 must be a whole number of at least 1"),
    (dict(scheduler="heunish"), "unknown scheduler 'heunish': choose one of ddim, pndm, ddpm, euler"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt has 3 entries for 2 prompts"),
    (dict(latents=np.zeros((1, 4, 8, 8))), "latents have shape (1, 4, 8, 8); this call needs (2, 4, 8, 8)"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt=0 must be at least 1"),
    (dict(output_type="tensor"), "output_type='tensor': choose pil, np or latent"),
])
def test_bad_sampling_input(sd1, kwargs, message):
    args = dict(prompt=["a", "b"], num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(Exception) as info:
        sd1(**args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_scheduler_classes_without_a_sampler_fall_back(caplog):
    """A custom scheduler class samples with pndm (epsilon) or ddim (v-prediction), said once
    per class; training never stops over the choice of sampler."""
    from sdjax.sampling.schedulers import default_scheduler_name

    with caplog.at_level(logging.WARNING, logger="sdjax"):
        assert default_scheduler_name({"_class_name": "MyOwnScheduler"}) == "pndm"
        assert default_scheduler_name({"_class_name": "MyOwnScheduler"}) == "pndm"
        assert default_scheduler_name({"_class_name": "OtherOwnScheduler",
                                       "prediction_type": "v_prediction"}) == "ddim"
        assert default_scheduler_name({"_class_name": "ThirdScheduler"}, "v_prediction") == "ddim"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 3 and "MyOwnScheduler has no sdjax sampler; sampling with pndm" in notes[0]
    assert "OtherOwnScheduler has no sdjax sampler; sampling with ddim" in notes[1]


def test_diffusers_class_names_are_sampler_names():
    from sdjax.sampling.schedulers import (DIFFUSERS_CLASSES, default_scheduler_name,
                                           sampler_name)

    for name, cls in DIFFUSERS_CLASSES.items():
        assert sampler_name(cls) == (name if name != "dpmpp_2m_karras" else "dpmpp_2m")
        assert default_scheduler_name({"_class_name": cls}) == sampler_name(cls)
        assert sampler_name(name) == name
    config = sd_config(timestep_spacing="trailing")
    by_class = make_scheduler("DPMSolverMultistepScheduler", config, 7)
    assert by_class.name == "dpmpp_2m" and list(by_class.timesteps) == list(
        make_scheduler("dpmpp_2m", config, 7).timesteps)


def test_scheduler_configs_sdjax_cannot_honour():
    """(More cases, each checked against diffusers, in test_scheduler_configs.py.)"""
    with pytest.raises(ConfigError, match="prediction_type='sample' in the scheduler config is not "
                                          "supported by the sdjax samplers"):
        make_scheduler("euler", {"prediction_type": "sample"}, 10)
    with pytest.raises(ConfigError, match="timestep_spacing='middle' in the scheduler config"):
        make_scheduler("euler", {"timestep_spacing": "middle"}, 10)


def test_long_prompts_are_truncated_with_a_warning(sd1, caplog):
    from sdjax.sampling.prompts import encode

    long = "a photo of " + " and ".join(f"cat number {i}" for i in range(40))
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        ids = encode(sd1.tokenizer, ["a dog", long])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and long in warnings[0] and "CLIP reads 77" in warnings[0]
    assert warnings[0].split("ignored:")[1].replace(" ", "").endswith("catnumber39'")  # the cut end
    expected = sd1.tokenizer([long], padding="max_length", max_length=77, truncation=True,
                             return_tensors="np").input_ids
    np.testing.assert_array_equal(ids[1], expected[0])
