"""Whole text-to-image calls against diffusers' StableDiffusionPipeline on the same tiny weights:
every scheduler, epsilon and v-prediction (the sd2-style model with its scheduler's prediction
type set either way; DDIM also on the sd1-style model), classifier-free guidance with negative
prompts, given initial latents."""

import numpy as np
import pytest
import torch

from sdjax.sampling.schedulers import SCHEDULERS
from tests.diffusers_reference import FixedNoise, diffusers_scheduler

PROMPTS = ["a red cube on a table", "two blue spheres"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def reference_pipelines(sd1_dir, sd2_dir):
    from diffusers import StableDiffusionPipeline

    pipes = {style: StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
             for style, path in (("sd1", sd1_dir), ("sd2", sd2_dir))}
    for pipe in pipes.values():  # each test sets its scheduler up from the saved config
        pipe.saved_scheduler_config = pipe.scheduler.config
    return pipes


def reference_call(pipe, name, prediction, latents, monkeypatch, seed, steps=8, guidance=6.0):
    from sdjax.sampling.sampler import image_keys, step_noise
    from sdjax.sampling.schedulers import SAMPLERS, make_scheduler

    import jax.numpy as jnp

    config = dict(pipe.saved_scheduler_config, prediction_type=prediction)
    pipe.scheduler = diffusers_scheduler(name, config)
    draws = []
    if SAMPLERS[name].cls.stochastic:
        # diffusers draws its noise from torch (dpmpp_sde: a Brownian tree): hand it sdjax's,
        # one draw per UNet evaluation, as the sampler makes them. diffusers takes them in the
        # same order, skipping only the last ones where it adds no noise (DDPM at timestep 0,
        # DPMSolverSDE's final Euler step).
        count = latents.shape[0]
        keys = image_keys(np.uint32(seed), jnp.arange(count), jnp.zeros(count, jnp.int32))
        evaluations = make_scheduler(name, config, steps).num_evaluations
        draws = [step_noise(keys, i, latents.shape[1:]) for i in range(evaluations)]
    results = {}
    for output in ("latent", "np"):
        FixedNoise(monkeypatch, draws)
        images = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps,
                      guidance_scale=guidance, latents=torch.from_numpy(latents),
                      output_type=output).images
        results[output] = images.numpy() if output == "latent" else images
    return results


def relative_error(ours, ref):
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


# Every sampler, alternating the prediction type (test_sampling.py checks every sampler's steps
# with both against diffusers' schedulers), and DDIM on the sd1-style model too.
CASES = ([("sd2", name, ("v_prediction", "epsilon")[k % 2]) for k, name in enumerate(SCHEDULERS)]
         + [("sd1", "ddim", "epsilon")])


@pytest.mark.parametrize("style, name, prediction", CASES)
def test_pipeline_matches_diffusers(style, name, prediction, request, reference_pipelines,
                                    monkeypatch):
    """Final latents and decoded images within 1e-4 (relative to the latents' scale when it is
    above 1) of diffusers' StableDiffusionPipeline, float32 on CPU, 2 prompts with negative
    prompts and guidance 6 over 8 steps."""
    sd = request.getfixturevalue(style)
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = reference_call(reference_pipelines[style], name, prediction, latents, monkeypatch, seed=5)
    out = sd.sampler().sample(sd._device_params(), PROMPTS, NEGATIVE, num_inference_steps=8,
                              guidance_scale=6.0, latents=latents, scheduler=name, seed=5,
                              prediction_type=prediction)
    assert relative_error(out.latents, ref["latent"]) < 1e-4
    assert np.abs(out.images - ref["np"]).max() < 1e-4


def test_call_output_types(sd1):
    """pil / np / latent outputs of one call agree (np and pil run the parity test's program)."""
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0,
                scheduler="ddim", seed=5, latents=latents)
    images = sd1(output_type="np", **args)
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    pil = sd1(**args)
    assert len(pil) == 2 and pil[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil[1]), (images[1] * 255).round().astype(np.uint8))
    latents = sd1(output_type="latent", **args)
    assert latents.shape == (2, 4, 8, 8)
