"""The NaN guard: a run whose loss, gradients or weights stop being finite stops before it saves
them, and says which checkpoint is the last good one."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import SdjaxError


class TrainingStopped(SdjaxError):
    """The run stopped on its own account (NaN loss); the message says where and what is kept."""


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_weights_finite = jax.jit(lambda state: _finite((state.params, state.ema)))


def check_finite(values: dict, state, done: int, saving: bool, checkpoints) -> None:
    """A non-finite loss or gradient norm (and, before a save, non-finite weights: a finite
    loss does not prove the update was finite) stops the run before it is saved."""
    bad = [f"{name} is {values[name]}" for name in ("loss", "grad_norm")
           if name in values and not math.isfinite(values[name])]
    if not bad and saving and not bool(np.asarray(_weights_finite(state).addressable_data(0))):
        bad = ["the updated weights are not finite"]
    if bad:
        raise TrainingStopped(f"{' and '.join(bad)} at step {done}; stopping without saving it. "
                              f"The last good checkpoint is {checkpoints.last_good()}")
