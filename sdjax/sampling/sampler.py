"""Text-to-image sampling: prompts -> CLIP -> one jitted denoising loop -> VAE decode.

The whole loop is one XLA program (a `lax.fori_loop` over the scheduler's steps), compiled once
per scheduler, step count, image size and batch size, with the batch split over every device of
every host. Image `i` of prompt `p` draws all its noise from `fold_in(fold_in(key(seed), p), i)`
alone, so it does not depend on the batch it was made in, the number of devices, or how many
images the call makes: validation grids stay comparable across steps and runs, and `compare`
shows the same images as validation did.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError
from sdjax.parallel import (batch_sharded, make_mesh, mesh_context, replicate, replicated,
                            shard_batch, to_replicated)
from sdjax.sampling import prompts as prompt_text
from sdjax.sampling.schedulers import default_scheduler_name, make_scheduler

log = logging.getLogger("sdjax")


def image_keys(seed, prompt_index, image_index):
    """The random key of each image: fold_in(fold_in(key(seed), prompt index), image index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, i: jax.random.fold_in(jax.random.fold_in(base, p), i))(
        prompt_index, image_index)


def initial_noise(keys, shape):
    """Each image's starting latents (NCHW, unit variance)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


def step_noise(keys, i, shape):
    """Fresh noise for evaluation `i` of an ancestral sampler."""
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, 1), i), shape))(keys)


def _prompt_indices(given, count: int) -> np.ndarray:
    """The prompts' indices for the noise keys: `given` checked, or 0..count-1."""
    if given is None:
        return np.arange(count, dtype=np.int32)
    indices = np.asarray(given)
    if indices.shape != (count,) or not np.issubdtype(indices.dtype, np.integer) \
            or (indices < 0).any() or (indices >= 2 ** 31).any():
        raise ConfigError(f"prompt_indices must hold one whole number from 0 to 2**31-1 per "
                          f"prompt ({count} prompts); got shape {indices.shape}, dtype "
                          f"{indices.dtype}")
    return indices.astype(np.int32)


@dataclasses.dataclass
class Samples:
    latents: np.ndarray                 # final latents (N, C, h, w), before VAE scaling is undone
    images: Optional[np.ndarray]        # (N, H, W, 3) float32 in [0, 1], or None when not decoded
    seconds: float                      # wall time of the call
    compiled: bool                      # whether this call compiled a new program


class Sampler:
    """Samples from a set of Flax models (`build_models`) with parameters given per call, so the
    same compiled program serves any weights of the same shapes (checkpoints, EMA, raw)."""

    def __init__(self, models: Mapping, configs: Mapping, scheduler_config: Mapping, tokenizer,
                 mesh=None):
        if tokenizer is None:
            raise ConfigError("sampling needs the model's tokenizer/ folder")
        self.unet, self.vae, self.text_encoder = models["unet"], models["vae"], models["text_encoder"]
        self.configs = configs
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None else make_mesh()
        self._programs = {}

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        """The model's native image side: the UNet's sample_size times the VAE's downsampling."""
        return int(self.configs["unet"].get("sample_size", 64)) * self.vae_factor

    def check_size(self, value, what: str) -> int:
        value = self.default_size() if value is None else value
        if not isinstance(value, (int, np.integer)) or value <= 0 or value % self.vae_factor:
            raise ConfigError(f"{what}={value!r} must be a positive multiple of {self.vae_factor} "
                              f"(the VAE downsamples by {self.vae_factor})")
        return int(value)

    def place(self, params):
        """Parameters replicated on every device: host arrays placed, device arrays already so
        kept as they are, the others (split over fsdp, maybe across hosts) gathered."""
        on_devices = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.Array) else replicate(x, self.mesh), params)
        return to_replicated(on_devices, self.mesh)

    def sample(self, params, prompt, negative_prompt=None, num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: Optional[int] = None,
               width: Optional[int] = None, num_images_per_prompt: int = 1, seed: int = 0,
               scheduler: Optional[str] = None, latents=None, decode: bool = True,
               prediction_type: Optional[str] = None,
               prompt_indices: Optional[Sequence[int]] = None) -> Samples:
        """`params`: {"unet", "vae", "text_encoder"} parameter trees (see `place`).

        `prompt_indices` (one per prompt, default 0, 1, ...) are the prompt indices the noise
        keys are made from: the same prompt given index j in different calls gets the same
        noise, whichever batch it is in (DreamBooth class image j, made in any call)."""
        start = time.perf_counter()
        prompts = prompt_text.prompt_list(prompt)
        noise_index = _prompt_indices(prompt_indices, len(prompts))
        negatives = prompt_text.negative_list(negative_prompt, len(prompts))
        height, width = self.check_size(height, "height"), self.check_size(width, "width")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt={num_images_per_prompt!r} must be at least 1")
        name = scheduler or default_scheduler_name(self.scheduler_config, prediction_type)
        sched = make_scheduler(name, self.scheduler_config, num_inference_steps, prediction_type)
        guided = guidance_scale > 1.0  # classifier-free guidance, as diffusers decides it

        count = len(prompts) * num_images_per_prompt
        latent_shape = (self.unet.config.in_channels, height // self.vae_factor,
                        width // self.vae_factor)
        per_image = [i for i in range(len(prompts)) for _ in range(num_images_per_prompt)]
        ids = prompt_text.encode(self.tokenizer, [prompts[i] for i in per_image])
        negative_ids = prompt_text.encode(self.tokenizer, [negatives[i] for i in per_image]) \
            if guided else ids
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (count,) + latent_shape:
                raise ConfigError(f"latents have shape {latents.shape}; this call needs "
                                  f"{(count,) + latent_shape} (images, channels, height/"
                                  f"{self.vae_factor}, width/{self.vae_factor})")

        # Pad the batch to a multiple of the device count; the extra images are dropped.
        devices = self.mesh.devices.size
        padded = math.ceil(count / devices) * devices
        rows = np.minimum(np.arange(padded), count - 1)  # padding repeats the last image
        inputs = dict(ids=ids[rows], negative_ids=negative_ids[rows],
                      prompt_index=noise_index[per_image][rows],
                      image_index=(np.arange(count, dtype=np.int32) % num_images_per_prompt)[rows],
                      init=(latents[rows] if latents is not None
                            else np.zeros((padded, 1), np.float32)))
        inputs = {k: shard_batch(v, self.mesh) for k, v in inputs.items()}

        key = (sched.name, sched.num_inference_steps, repr(sorted(sched.settings.items())),
               padded, height, width, guided, latents is not None, decode)
        compiled = key not in self._programs
        if compiled:
            self._programs[key] = self._program(sched, latent_shape, guided, latents is not None,
                                                decode)
        out = self._programs[key](self.place(params), inputs,
                                  np.uint32(seed % 2 ** 32), np.float32(guidance_scale))
        final = np.asarray(out["latents"].addressable_data(0))[:count]
        images = np.asarray(out["images"].addressable_data(0))[:count] if decode else None
        return Samples(final, images, time.perf_counter() - start, compiled)

    def _program(self, sched, latent_shape, guided: bool, given_latents: bool, decode: bool):
        unet, vae, text_encoder = self.unet, self.vae, self.text_encoder

        def run(params, inputs, seed, guidance_scale):
            context = text_encoder.apply({"params": params["text_encoder"]}, inputs["ids"])
            if guided:  # rows [uncond_0, cond_0, uncond_1, ...]: both halves stay on one device
                uncond = text_encoder.apply({"params": params["text_encoder"]},
                                            inputs["negative_ids"])
                context = jnp.stack([uncond, context], axis=1).reshape(
                    (-1,) + context.shape[1:])
            keys = image_keys(seed, inputs["prompt_index"], inputs["image_index"])
            x = inputs["init"] if given_latents else initial_noise(keys, latent_shape)
            x = x.astype(jnp.float32) * sched.init_noise_sigma

            def denoise(i, carry):
                x, state = carry
                model_input = x * sched.input_scale(i)
                if guided:
                    model_input = jnp.repeat(model_input, 2, axis=0)
                out = unet.apply({"params": params["unet"]}, model_input, sched.timestep(i),
                                 context).astype(jnp.float32)
                if guided:
                    out = out.reshape((-1, 2) + out.shape[1:])
                    out = out[:, 0] + guidance_scale * (out[:, 1] - out[:, 0])
                noise = step_noise(keys, i, latent_shape) if sched.stochastic else None
                return sched.step(state, i, out, x, noise)

            x, _ = jax.lax.fori_loop(0, sched.num_evaluations, denoise, (x, sched.init_state(x)))
            result = {"latents": x}
            if decode:
                pixels = vae.apply({"params": params["vae"]}, x / vae.scaling_factor, method="decode")
                result["images"] = jnp.transpose(
                    jnp.clip(pixels.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))
            return result

        def on_mesh(*args):
            with mesh_context(self.mesh):  # the flash attention kernel runs per batch shard
                return run(*args)

        repl, rows = replicated(self.mesh), batch_sharded(self.mesh)
        return jax.jit(on_mesh, in_shardings=(repl, rows, repl, repl), out_shardings=repl)
