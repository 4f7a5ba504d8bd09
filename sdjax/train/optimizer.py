"""optax AdamW with global-norm clipping over everything trained, per-component learning rates,
the diffusers learning-rate schedules, and EMA decay."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(name: str, peak: float, warmup_steps: int, total_steps: int):
    """diffusers' `get_scheduler` shapes, as a function of the optimizer step count.

    constant: peak throughout (warmup ignored, as in diffusers); constant_with_warmup: linear
    0 -> peak over warmup_steps; linear / cosine: that warmup, then down to 0 at total_steps.
    """
    warmup = max(0, int(warmup_steps))
    total = max(1, int(total_steps))

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = jnp.minimum(1.0, count / max(1, warmup)) if warmup else 1.0
        progress = jnp.clip((count - warmup) / max(1, total - warmup), 0.0, 1.0)
        if name == "constant":
            factor = jnp.ones_like(count)
        elif name == "constant_with_warmup":
            factor = ramp
        elif name == "linear":
            factor = jnp.where(count < warmup, ramp, 1.0 - progress)
        elif name == "cosine":
            factor = jnp.where(count < warmup, ramp, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        else:
            raise ValueError(f"unknown lr scheduler {name!r}")
        return peak * factor

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
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    per_component = {c: optax.adamw(s, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
                     for c, s in schedules.items()}
    return optax.chain(optax.clip_by_global_norm(limit),
                       optax.partition(per_component, component_labels))


def ema_decay(optimizer_steps, max_decay: float = 0.9999):
    """diffusers EMAModel's decay after `optimizer_steps` updates (no warmup, update_after_step=0):
    0 for the first update (the EMA starts as a copy), then (1 + s) / (10 + s), capped."""
    s = jnp.asarray(optimizer_steps, jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(max_decay, (1.0 + s) / (10.0 + s)))
