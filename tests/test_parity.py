"""Our Flax models against diffusers/transformers PyTorch on the same tiny random weights (float32)."""

import jax
import numpy as np
import pytest
import torch

TOL = 1e-4
STYLES = ["sd1", "sd2"]


@pytest.fixture(scope="module")
def reference():
    """diffusers pipelines loaded from the same folders our models load from."""
    from diffusers import StableDiffusionPipeline

    cache = {}

    def get(folder):
        if folder not in cache:
            cache[folder] = StableDiffusionPipeline.from_pretrained(str(folder))
        return cache[folder]

    return get


@pytest.fixture
def pair(request, reference):
    style = request.param
    folder = request.getfixturevalue(f"{style}_dir")
    return request.getfixturevalue(style), reference(folder)


def _max_diff(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("pair", STYLES, indirect=True)
def test_unet_matches_diffusers(pair):
    sd, pipe = pair
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    timesteps = np.array([3, 981])
    ours = sd.unet.apply({"params": sd.params["unet"]}, sample, timesteps, context)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(sample), torch.from_numpy(timesteps),
                        torch.from_numpy(context)).sample.numpy()
    assert np.abs(ref).max() > 0.1  # a real signal, not a degenerate all-zero output
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("pair", ["sd1"], indirect=True)
def test_unet_sides_not_a_multiple_of_its_downsampling(pair):
    """Latents 10x7 through a UNet that halves twice (an image size that is a multiple of 8 but
    not of 32): upsampling goes to each skip's size, as diffusers' forward_upsample_size."""
    sd, pipe = pair
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((1, 4, 10, 7)).astype(np.float32)
    context = rng.standard_normal((1, 5, 32)).astype(np.float32)
    ours = jax.jit(sd.unet.apply)({"params": sd.params["unet"]}, sample, np.array([500.0]), context)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(sample), torch.tensor([500.0]),
                        torch.from_numpy(context)).sample.numpy()
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("pair", STYLES, indirect=True)
def test_unet_scalar_timestep_broadcasts(pair):
    sd, pipe = pair
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 5, 32)).astype(np.float32)
    ours = sd.unet.apply({"params": sd.params["unet"]}, sample, 500, context)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(sample), 500, torch.from_numpy(context)).sample.numpy()
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("pair", STYLES, indirect=True)
def test_vae_encode_matches_diffusers(pair):
    sd, pipe = pair
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    dist = sd.vae.apply({"params": sd.params["vae"]}, images, method="encode")
    with torch.no_grad():
        ref = pipe.vae.encode(torch.from_numpy(images)).latent_dist
    assert _max_diff(dist.mean, ref.mean.numpy()) <= TOL
    assert _max_diff(dist.logvar, ref.logvar.numpy()) <= TOL
    sample = np.asarray(dist.sample(jax.random.key(0)))
    assert sample.shape == ref.mean.shape and not np.allclose(sample, ref.mean.numpy())


@pytest.mark.parametrize("pair", ["sd1"], indirect=True)
def test_vae_encode_of_the_loaders_uint8_images_matches_diffusers(pair):
    """The train step's path (uint8 NHWC, normalised on the device, `encode_nhwc`) against
    train_text_to_image.py's: ToTensor() and Normalize([0.5], [0.5]) of the same pixels, then
    the PyTorch VAE."""
    from sdjax.models.vae import normalize_pixels

    sd, pipe = pair
    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), np.uint8)
    dist = jax.jit(lambda p, x: sd.vae.apply({"params": p}, normalize_pixels(x),
                                             method="encode_nhwc"))(sd.params["vae"], pixels)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ref = pipe.vae.encode((images - 0.5) / 0.5).latent_dist
    assert _max_diff(dist.mean, ref.mean.numpy()) <= TOL
    assert _max_diff(dist.logvar, ref.logvar.numpy()) <= TOL


@pytest.mark.parametrize("pair", STYLES, indirect=True)
def test_vae_decode_matches_diffusers(pair):
    sd, pipe = pair
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    latents = np.random.default_rng(3).standard_normal((2, 4, 32 // factor, 32 // factor)).astype(np.float32)
    ours = sd.vae.apply({"params": sd.params["vae"]}, latents, method="decode")
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()
    assert _max_diff(ours, ref) <= TOL
    assert sd.vae.scaling_factor == pipe.vae.config.scaling_factor


@pytest.mark.parametrize("pair", STYLES, indirect=True)
@pytest.mark.parametrize("with_mask", [False, True])
def test_text_encoder_matches_transformers(pair, with_mask):
    sd, pipe = pair
    tokens = sd.tokenizer(["a red cat", "the blue sky and a green dog on the grass"],
                          padding="max_length", max_length=sd.tokenizer.model_max_length,
                          truncation=True, return_tensors="np")
    mask = tokens.attention_mask if with_mask else None
    assert mask is None or mask[0].sum() < mask[1].sum()  # the mask really masks something
    ours = sd.text_encoder.apply({"params": sd.params["text_encoder"]}, tokens.input_ids, mask)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(tokens.input_ids),
                                attention_mask=None if mask is None else torch.from_numpy(mask)
                                ).last_hidden_state.numpy()
    assert _max_diff(ours, ref) <= TOL
