"""optax AdamW with global-norm clipping over everything trained, per-component learning rates,
the diffusers learning-rate schedules, and EMA decay."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from sdjax.config import LR_SCHEDULERS


def learning_rate_schedule(name: str, peak, warmup_steps, total_steps):
    """diffusers' `get_scheduler` shapes, as a function of the optimizer step count.

    constant: peak throughout (warmup ignored, as in diffusers); constant_with_warmup: linear
    0 -> peak over warmup_steps; linear / cosine: that warmup, then down to 0 at total_steps.
    The numbers may be traced (the step takes them as arguments: `run_optimizer`).
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}")

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warmup = jnp.maximum(jnp.asarray(warmup_steps, jnp.float32), 0.0)
        total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        ramp = jnp.where(warmup > 0, jnp.minimum(1.0, count / jnp.maximum(warmup, 1.0)), 1.0)
        progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
        if name == "constant":
            factor = jnp.ones_like(count)
        elif name == "constant_with_warmup":
            factor = ramp
        elif name == "linear":
            factor = jnp.where(count < warmup, ramp, 1.0 - progress)
        else:  # cosine
            factor = jnp.where(count < warmup, ramp, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.asarray(peak, jnp.float32) * factor

    return schedule


def component_labels(params: dict) -> dict:
    """Each leaf labelled with its component (the top-level key of the trainable set)."""
    return {c: jax.tree_util.tree_map(lambda _, c=c: c, tree) for c, tree in params.items()}


def make_optimizer(schedules: Mapping[str, Callable], *, beta1: float, beta2: float, eps: float,
                   weight_decay: float, max_grad_norm: float) -> optax.GradientTransformation:
    """Clipping over the global norm of every trained component together (as diffusers clips
    the chained parameters), then AdamW per component with that component's schedule, through
    `optax.partition`. `schedules` maps each trained component to its learning-rate schedule."""
    # Clipping stays in the chain when off (an infinite norm), so that the optimizer state has
    # one structure and a checkpoint resumes whatever --max_grad_norm the new run gives.
    limit = jnp.where(jnp.asarray(max_grad_norm, jnp.float32) > 0, max_grad_norm, jnp.inf)
    per_component = {c: optax.adamw(s, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
                     for c, s in schedules.items()}
    return optax.chain(optax.clip_by_global_norm(limit),
                       optax.partition(per_component, component_labels))


def run_optimizer(scheduler: str, numbers: Mapping) -> tuple:
    """(optimizer, {component: learning-rate schedule}) from the run's numbers
    (`sdjax.train.trainer.step_numbers`), which the jitted step takes as an argument rather
    than as constants: a run resumed with another learning rate, warmup, length or clipping,
    or a sweep over them, runs the step it compiled before (the persistent compilation cache),
    where a TPU would compile a full-size step for minutes. The optimizer state's structure
    does not depend on them (a schedule is always a function), so checkpoints resume across
    them."""
    schedules = {c: learning_rate_schedule(scheduler, peak, numbers["lr_warmup_steps"],
                                           numbers["lr_total_steps"])
                 for c, peak in numbers["learning_rate"].items()}
    tx = make_optimizer(schedules, beta1=numbers["adam_beta1"], beta2=numbers["adam_beta2"],
                        eps=numbers["adam_epsilon"], weight_decay=numbers["adam_weight_decay"],
                        max_grad_norm=numbers["max_grad_norm"])
    return tx, schedules


def ema_decay(optimizer_steps, max_decay: float = 0.9999):
    """diffusers EMAModel's decay after `optimizer_steps` updates (no warmup, update_after_step=0):
    0 for the first update (the EMA starts as a copy), then (1 + s) / (10 + s), capped."""
    s = jnp.asarray(optimizer_steps, jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(max_decay, (1.0 + s) / (10.0 + s)))
