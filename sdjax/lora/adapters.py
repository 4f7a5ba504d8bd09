"""LoRA adapters as a parameter tree, and the two ways of using them.

An adapter tree mirrors the model's parameter tree down to each adapted layer, which holds
`{"down": A, "up": B}` in Flax layout: a linear layer's kernel (in, out) gets A (in, r) and
B (r, out); a convolution's kernel (kh, kw, in, out) gets A (kh, kw, in, r), a convolution
with the layer's own kernel size, strides and padding, and B (r, out), a 1x1 convolution. The
layer's output becomes `layer(x) + scale * B(A(dropout(x)))` with scale = alpha / rank, as
PEFT computes it.

- Training applies the adapters inside the layers (`AdaptedModel`, through Flax's method
  interception: no module surgery), in the order PEFT computes them. This supports dropout
  on the adapter's input, and its backward pass needs no full-size kernel gradient (merged
  kernels would need `x^T g` for every adapted layer: BENCHMARKS.md has both measured).
- Sampling, export and fusing merge them into the kernels (`merge_adapters`): no extra work
  per step, and the model is an ordinary one.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

LORA_INITS = ("gaussian", "kaiming")


def init_adapters(key, shapes: Mapping, targets, rank: int, init: str = "gaussian") -> dict:
    """Adapters for the layers at `targets` (paths into the parameter tree `shapes`).

    B starts at zero (the model is unchanged at step 0); A is drawn as PEFT draws it:
    `gaussian` (what diffusers' LoRA scripts ask PEFT for) N(0, 1/rank^2); `kaiming` (PEFT's
    default) uniform within +-1/sqrt(fan_in)."""
    flat = flatten_dict(shapes)
    out = {}
    for index, path in enumerate(targets):
        kernel = flat[tuple(path) + ("kernel",)].shape
        down_shape = tuple(kernel[:-1]) + (rank,)
        k = jax.random.fold_in(key, index)
        if init == "gaussian":
            down = jax.random.normal(k, down_shape, jnp.float32) / rank
        else:
            bound = 1.0 / np.sqrt(int(np.prod(kernel[:-1])))
            down = jax.random.uniform(k, down_shape, jnp.float32, -bound, bound)
        out[tuple(path) + ("down",)] = np.asarray(down)
        out[tuple(path) + ("up",)] = np.zeros((rank, kernel[-1]), np.float32)
    return unflatten_dict(out)


def adapter_structs(shapes: Mapping, targets, rank: int) -> dict:
    """The adapter tree `init_adapters` makes, as float32 ShapeDtypeStructs."""
    flat = flatten_dict(shapes)
    out = {}
    for path in targets:
        kernel = flat[tuple(path) + ("kernel",)].shape
        out[tuple(path) + ("down",)] = jax.ShapeDtypeStruct(tuple(kernel[:-1]) + (rank,),
                                                            jnp.float32)
        out[tuple(path) + ("up",)] = jax.ShapeDtypeStruct((rank, kernel[-1]), jnp.float32)
    return unflatten_dict(out)


def adapter_layers(adapters: Mapping) -> dict:
    """{layer path: {"down": A, "up": B}} of an adapter tree."""
    flat = flatten_dict(adapters)
    layers = {}
    for path, value in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = value
    return layers


def low_rank_delta(down, up):
    """The kernel change A @ B of one adapter, in the kernel's layout (numpy or jax arrays)."""
    xp = jnp if isinstance(down, jax.Array) else np
    return xp.tensordot(down, up, axes=([down.ndim - 1], [0]))


def merge_adapters(params: Mapping, adapters: Mapping, scale: Any = 1.0) -> dict:
    """`params` with every adapted kernel replaced by `W + scale * A @ B`, computed in float32
    and stored in the kernel's dtype. `scale` is one number or {layer path: number}. Works on
    host (numpy) and device (jax) trees; the other leaves are the same objects."""
    flat = dict(flatten_dict(params))
    for path, adapter in adapter_layers(adapters).items():
        key = tuple(path) + ("kernel",)
        if key not in flat:
            raise KeyError("/".join(path))
        kernel = flat[key]
        s = scale[path] if isinstance(scale, Mapping) else scale
        delta = low_rank_delta(adapter["down"], adapter["up"])
        xp = jnp if isinstance(kernel, jax.Array) or isinstance(delta, jax.Array) else np
        merged = xp.asarray(kernel, xp.float32) + xp.float32(s) * xp.asarray(delta, xp.float32)
        flat[key] = merged.astype(kernel.dtype)
    return unflatten_dict(flat)


def count(adapters: Mapping) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters))


# --- in-layer application (training) ------------------------------------------------------------

def _interceptor(scale: float, dropout: float):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
                or not module.has_variable("lora", "down")):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        if dropout > 0.0 and module.has_rng("dropout"):
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
        dtype = module.dtype or x.dtype
        down = module.get_variable("lora", "down").astype(dtype)
        up = module.get_variable("lora", "up").astype(dtype)
        x = x.astype(dtype)
        if isinstance(module, nn.Conv):
            h = nn.Conv(down.shape[-1], module.kernel_size, strides=module.strides,
                        padding=module.padding, input_dilation=module.input_dilation,
                        kernel_dilation=module.kernel_dilation, use_bias=False,
                        dtype=dtype).apply({"params": {"kernel": down}}, x)
        else:
            h = x @ down
        return y + (h @ up) * jnp.asarray(scale, dtype)

    return intercept


class AdaptedModel:
    """A linen model whose `apply` runs the adapters in the `lora` collection of its variables
    inside their layers: `AdaptedModel(unet, scale).apply({"params": base, "lora": adapters},
    ...)`. Without a `lora` collection it is the model itself. Dropout (if any) draws from the
    `dropout` rng stream. Every other attribute is the model's."""

    def __init__(self, module: nn.Module, scale: float, dropout: float = 0.0):
        self.module = module
        self.scale = float(scale)
        self.dropout = float(dropout)

    def apply(self, variables, *args, rngs: Optional[dict] = None, **kwargs):
        with nn.intercept_methods(_interceptor(self.scale, self.dropout)):
            return self.module.apply(variables, *args, rngs=rngs, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)
