"""The training state and the pure, jitted update step.

`train_step(state, frozen, batch, key) -> (state, metrics)`: state = {step, params, opt_state,
ema}; frozen = VAE and text encoder parameters (never donated; empty when training from the
latent cache); batch arrays are shaped (k micro-batches, global rows, ...): pixel_values and
input_ids, or latent_mean, latent_std and text_embeddings from the cache. Gradients are averaged over the k micro-batches in a
`lax.scan`, so one call is one optimizer step whatever the accumulation.

Every random draw of a sample (latent sample, noise, timestep, offset noise, perturbation) comes
from `fold_in(fold_in(key, step), sample_position)`: the same sample gets the same noise whether
it arrives in one batch of B or in k micro-batches of B/k, on one host or on many.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sdjax.schedule import NoiseSchedule
from sdjax.train.optimizer import ema_decay


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Optional[Any] = None


def init_state(params, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: Optional[float] = None


def _per_sample_draws(key, positions, latent_shape, num_timesteps):
    def draw(position):
        k = jax.random.split(jax.random.fold_in(key, position), 5)
        return (jax.random.normal(k[0], latent_shape),           # latent sample
                jax.random.normal(k[1], latent_shape),           # noise
                jax.random.randint(k[2], (), 0, num_timesteps),  # timestep
                jax.random.normal(k[3], latent_shape[:1] + (1, 1)),  # offset noise
                jax.random.normal(k[4], latent_shape))           # input perturbation
    return jax.vmap(draw)(positions)


def make_loss_fn(unet, vae, text_encoder, schedule: NoiseSchedule, loss_config: LossConfig):
    def loss_fn(unet_params, frozen, batch, key, first_position):
        if "latent_mean" in batch:  # from the latent cache: the VAE's output, read from disk
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            dist = vae.apply({"params": frozen["vae"]}, batch["pixel_values"], method="encode")
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
        if "text_embeddings" in batch:
            context = batch["text_embeddings"]
        else:
            context = text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
        context = jax.lax.stop_gradient(context)
        pred = unet.apply({"params": unet_params}, noisy, t, context).astype(jnp.float32)
        target = schedule.target(latents, noise, t)
        per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
        if loss_config.snr_gamma is not None:
            per_sample = per_sample * schedule.min_snr_weights(t, loss_config.snr_gamma)
        return jnp.mean(per_sample)

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, lr_schedule: Callable):
    def train_step(state: TrainState, frozen, batch, key):
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
                                            (jnp.arange(k), batch),
                                            unroll=jax.default_backend() == "cpu")
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            loss = loss / k
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            decay = ema_decay(state.step + 1)
            ema = jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "lr": lr_schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step
