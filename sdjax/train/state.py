"""The train state and where each of its leaves lives.

    TrainState(step, params, opt_state, ema)

`params` (and `ema`) is the trainable set: a dict keyed by component ({"unet": ...},
{"unet": ..., "text_encoder": ...}, or those components' LoRA adapters); everything else is
frozen and passed to the step separately, never donated. The step's loss sees the merged view `{**frozen, **params}`, so
full fine-tuning, text-encoder training and DreamBooth differ only in what is in `params` and
in the data, never in the step's code.

Every leaf's device placement comes from `state_shardings` / `frozen_shardings`: replicated (the
pmap model on a mesh), or split over the mesh's "fsdp" axis (ZeRO-1: moments and EMA; ZeRO-3:
weights too). The step's code is the same for all; XLA's partitioner inserts the gathers.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sdjax.parallel import fsdp_sharding, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any                 # {component: parameter tree}, float32 master weights
    opt_state: Any
    ema: Optional[Any] = None   # the same structure as params, or None without EMA


def init_state(trainable: dict, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None)


def split_params(params: dict, trained: list) -> tuple:
    """(trainable, frozen): the components in `trained` and the rest."""
    return ({c: params[c] for c in trained},
            {c: p for c, p in params.items() if c not in trained})


def merged_variables(frozen: dict, trainable: dict) -> dict:
    """Each model's Flax variables when whole components are trained: theirs replace the
    frozen ones."""
    return {c: {"params": p} for c, p in {**frozen, **trainable}.items()}


def adapter_variables(frozen: dict, trainable: dict) -> dict:
    """Each model's Flax variables when adapters are trained: the frozen base `params` and, for
    the adapted models, the adapters as the `lora` collection (sdjax.lora.adapters)."""
    return {c: {"params": p, **({"lora": trainable[c]} if c in trainable else {})}
            for c, p in frozen.items()}


# How the train state is laid out over the mesh's "fsdp" axis (sdjax.parallel.fsdp_sharding):
#   replicated  every leaf on every device (pmap's model; fsdp 1)
#   zero1       optimizer moments and EMA split, the trained weights replicated
#   zero3       trained weights, moments, EMA (and so gradients) and the frozen weights split
SHARDINGS = ("replicated", "zero1", "zero3")


def _split(mesh: Mesh, tree):
    return jax.tree_util.tree_map(lambda x: fsdp_sharding(mesh, x.shape), tree)


def _replicated(mesh: Mesh, tree):
    return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)


def state_shardings(mesh: Mesh, abstract_state: TrainState, strategy: str = "zero3"):
    """The sharding of every leaf of the train state (its shapes: `jax.eval_shape` of
    `init_state`) under `strategy` (SHARDINGS); with fsdp 1 every strategy is replicated."""
    params = (_split if strategy == "zero3" else _replicated)(mesh, abstract_state.params)
    moments = _replicated if strategy == "replicated" else _split
    return TrainState(step=replicated(mesh), params=params,
                      opt_state=moments(mesh, abstract_state.opt_state),
                      ema=None if abstract_state.ema is None else moments(mesh, abstract_state.ema))


def frozen_shardings(mesh: Mesh, frozen, strategy: str = "zero3"):
    """The frozen weights: split like the trained ones under zero3, else replicated."""
    return (_split if strategy == "zero3" else _replicated)(mesh, frozen)


def place(tree, shardings):
    """Host arrays (the same on every host) placed with the given shardings on every host."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def trained_weights(state: TrainState, use_ema: bool) -> dict:
    """The weights to sample or export: the EMA copy when kept, else the raw ones."""
    return state.ema if use_ema and state.ema is not None else state.params
