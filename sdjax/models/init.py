"""Random parameters from a shape tree, on the host, without tracing the model.

`module.init` traces and compiles a whole forward pass (tens of seconds on CPU even for the tiny
model), only for the outputs to be thrown away. These weights are for tests, demos and
benchmarks, so a plain host-side init from `jax.eval_shape`'s shapes does: LeCun-normal kernels
(fan-in over all but the output axis, as flax's default), normal(0.02) embeddings (as CLIP's),
zero biases and unit norm scales.
"""

from __future__ import annotations

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def random_params(shapes, seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in flatten_dict(shapes).items():
        shape, leaf = tuple(spec.shape), path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
        elif leaf == "embedding":
            value = rng.standard_normal(shape, np.float32) * 0.02
        elif leaf == "scale":
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        out[path] = value.astype(dtype, copy=False)
    return unflatten_dict(out)
