"""The pure, jitted update step.

`train_step(state, frozen, batch, numbers) -> (state, metrics)`: `state` is a `TrainState` whose
params are the trainable set (a dict keyed by component); `frozen` holds the other components
(never donated; the VAE is absent when training from the latent cache, the text encoder when its
embeddings come with the batch). The loss sees the models' variables made from both
(`merged_variables`: `{**frozen, **trainable}`; LoRA: the adapters beside the frozen base) and
differentiates the trainable part only. `numbers` are the run's seed and optimizer settings
(`sdjax.train.trainer.step_numbers`): arguments, not constants, so that changing them does not
change the program.

Batch arrays are shaped (k micro-batches, global rows, ...): pixel_values (uint8 (H, W, 3) as
decoded: made [-1, 1] here, on the device, and encoded channels-last) or the cached
latent_mean / latent_std; input_ids or text_embeddings; with DreamBooth prior preservation a
prior_mask (1.0 on class-image rows). Gradients are averaged over the k micro-batches in a
`lax.scan`, so one call is one optimizer step whatever the accumulation.

Every random draw of a sample (latent sample, noise, timestep, offset noise, perturbation) comes
from `fold_in(fold_in(key, step), sample_position)`: the same sample gets the same noise whether
it arrives in one batch of B or in k micro-batches of B/k, on one host or on many.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sdjax.models.vae import normalize_pixels
from sdjax.schedule import NoiseSchedule
from sdjax.train.optimizer import ema_decay
from sdjax.train.state import TrainState, merged_variables


@dataclasses.dataclass(frozen=True)
class LossConfig:
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: Optional[float] = None
    prior_loss_weight: float = 1.0
    # The min-SNR weights of train_dreambooth.py (v-prediction floored at one) rather than of
    # train_text_to_image.py (see NoiseSchedule.min_snr_weights): the command decides.
    snr_v_floor: bool = False


def _per_sample_draws(key, positions, latent_shape, num_timesteps):
    def draw(position):
        k = jax.random.split(jax.random.fold_in(key, position), 5)
        return (jax.random.normal(k[0], latent_shape),           # latent sample
                jax.random.normal(k[1], latent_shape),           # noise
                jax.random.randint(k[2], (), 0, num_timesteps),  # timestep
                jax.random.normal(k[3], latent_shape[:1] + (1, 1)),  # offset noise
                jax.random.normal(k[4], latent_shape))           # input perturbation
    return jax.vmap(draw)(positions)


def weighted_loss(per_sample, prior_mask, snr_weights, prior_loss_weight: float):
    """diffusers' DreamBooth loss, which is the plain mean when there are no class rows:
    mean over instance rows of (min-SNR weight x MSE) + prior_loss_weight x mean over class
    rows of MSE (min-SNR applies to instance rows only, as in train_dreambooth.py)."""
    instance = 1.0 - prior_mask
    if snr_weights is not None:
        per_sample = per_sample * jnp.where(prior_mask > 0, 1.0, snr_weights)
    instance_loss = jnp.sum(per_sample * instance) / jnp.maximum(jnp.sum(instance), 1.0)
    prior_loss = jnp.sum(per_sample * prior_mask) / jnp.maximum(jnp.sum(prior_mask), 1.0)
    return instance_loss + prior_loss_weight * prior_loss


def make_loss_fn(unet, vae, text_encoder, schedule: NoiseSchedule, loss_config: LossConfig,
                 model_variables: Callable = merged_variables):
    """`model_variables(frozen, trainable)` -> each model's Flax variables (`merged_variables`:
    trained weights in place of frozen ones; `adapter_variables`: LoRA adapters beside the
    frozen base, which the models given here apply, see `sdjax.lora.adapters.AdaptedModel`)."""
    def loss_fn(trainable, frozen, batch, key, first_position):
        variables = model_variables(frozen, trainable)
        # Adapter dropout (LoRA): a stream apart from the per-sample draws; unused otherwise.
        rngs = {"dropout": jax.random.fold_in(jax.random.fold_in(key, first_position), 7)}
        if "latent_mean" in batch:  # from the latent cache: the VAE's output, read from disk
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            dist = vae.apply(variables["vae"], normalize_pixels(batch["pixel_values"]),
                             method="encode_nhwc")
            mean, std = dist.mean, dist.std
        mean = jax.lax.stop_gradient(mean.astype(jnp.float32))
        std = jax.lax.stop_gradient(std.astype(jnp.float32))
        rows = mean.shape[0]
        positions = first_position + jnp.arange(rows)
        z, noise, t, offset, perturb = _per_sample_draws(key, positions, mean.shape[1:],
                                                         schedule.num_train_timesteps)
        latents = (mean + std * z) * vae.scaling_factor
        if loss_config.noise_offset:
            noise = noise + loss_config.noise_offset * offset
        noised_with = noise + loss_config.input_perturbation * perturb if loss_config.input_perturbation else noise
        noisy = schedule.add_noise(latents, noised_with, t)
        if "text_embeddings" in batch:  # cached or pre-computed: the encoder is frozen
            context = batch["text_embeddings"]
        else:
            context = text_encoder.apply(variables["text_encoder"], batch["input_ids"], rngs=rngs)
        pred = unet.apply(variables["unet"], noisy, t, context, rngs=rngs).astype(jnp.float32)
        target = schedule.target(latents, noise, t)
        per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
        snr_weights = (schedule.min_snr_weights(t, loss_config.snr_gamma, loss_config.snr_v_floor)
                       if loss_config.snr_gamma is not None else None)
        prior_mask = batch.get("prior_mask", jnp.zeros((rows,), jnp.float32))
        return weighted_loss(per_sample, prior_mask.astype(jnp.float32), snr_weights,
                             loss_config.prior_loss_weight)

    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: Callable, unroll_accumulation: bool = False):
    """`optimizer(numbers)` -> (optax transformation, {component: learning-rate schedule})
    (`sdjax.train.optimizer.run_optimizer`); the metrics name the rates lr (the UNet's) and
    lr_<component>. `numbers["seed_key"]` is the run key's data (`jax.random.key_data`).
    `unroll_accumulation`: micro-batches unrolled rather than a loop (for CPU devices, see
    below; decided by the devices compiled for, not the host: a TPU slice compiled on a CPU
    machine gets the TPU's loop)."""
    def train_step(state: TrainState, frozen, batch, numbers):
        tx, schedules = optimizer(numbers)
        key = jax.random.wrap_key_data(numbers["seed_key"])
        k, rows = jax.tree_util.tree_leaves(batch)[0].shape[:2]
        step_key = jax.random.fold_in(key, state.step)

        def micro(carry, inputs):
            grads_sum, loss_sum = carry
            index, mb = inputs
            loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, mb, step_key, index * rows)
            return (jax.tree_util.tree_map(jnp.add, grads_sum, grads), loss_sum + loss), None

        if k == 1:
            # No loop: XLA:CPU runs convolutions inside a while-loop body several times slower
            # (measured in BENCHMARKS.md), and there is no accumulator to keep.
            single = jax.tree_util.tree_map(lambda x: x[0], batch)
            loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, single, step_key, 0)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            # Unrolled on CPU for the same reason as above; a loop elsewhere (compile time).
            (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                            (jnp.arange(k), batch), unroll=unroll_accumulation)
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            loss = loss / k
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            decay = ema_decay(state.step + 1)
            ema = jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   **{("lr" if c == "unet" else f"lr_{c}"): schedule(state.step)
                      for c, schedule in schedules.items()}}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step
