"""PyTorch state dicts <-> Flax parameter trees for the UNet, VAE and CLIP text encoder.

A Flax path maps to a PyTorch key by turning `name_3` into `name.3` (`down_blocks_0` ->
`down_blocks.0`, `to_out_0` -> `to_out.0`; `linear_1/linear_2` keep their underscore, as in
diffusers) and the leaf `kernel/scale/embedding` into `weight`. Each component may accept older
key layouts as aliases: the VAE's legacy attention names (`query/key/value/proj_attn`) and CLIP
keys with or without the `text_model.` prefix. Conv kernels go OIHW <-> HWIO, linear weights
(out, in) <-> (in, out).

Conversion is driven by the model's expected parameter shapes (from `jax.eval_shape`), one
tensor at a time, so a checkpoint is never held twice in memory; every key and shape is checked
and problems are reported together in one message.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax.errors import WeightsError

_INDEXED = re.compile(r"(.+)_(\d+)")
_KEEP_UNDERSCORE = {"linear_1", "linear_2"}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Buffers some checkpoints carry that are not parameters.
_IGNORABLE = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")

# Current diffusers names of the VAE attention projections; the Flax (and legacy) names are the keys.
_VAE_ATTENTION_TORCH = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_component(name: str) -> str:
    m = _INDEXED.fullmatch(name)
    if m and name not in _KEEP_UNDERSCORE:
        return f"{m.group(1)}.{m.group(2)}"
    return name


def torch_key(path: Sequence[str], component: str) -> str:
    """The key current diffusers/transformers write for the Flax parameter at `path`."""
    parts = [_torch_component(p) for p in path[:-1]]
    if component == "vae" and len(parts) >= 2 and parts[-2].startswith("attentions."):
        parts[-1] = _VAE_ATTENTION_TORCH.get(parts[-1], parts[-1])
    if component == "text_encoder" and parts and parts[0] == "text_model":
        parts = parts[1:]  # transformers >= 5.6 saves CLIPTextModel without the prefix
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def torch_key_candidates(path: Sequence[str], component: str) -> list:
    """Keys under which a checkpoint may hold the parameter at `path`, preferred first."""
    primary = torch_key(path, component)
    candidates = [primary]
    if component == "vae":
        legacy = ".".join([_torch_component(p) for p in path[:-1]] + [_LEAF_TO_TORCH[path[-1]]])
        if legacy != primary:
            candidates.append(legacy)
    if component == "text_encoder":
        candidates.append("text_model." + primary)
    return candidates


def torch_to_flax_layout(path: Sequence[str], tensor: np.ndarray, expected_ndim: int) -> np.ndarray:
    if path[-1] != "kernel":
        return tensor
    if tensor.ndim == 4 and expected_ndim == 4:
        return np.transpose(tensor, (2, 3, 1, 0))
    if tensor.ndim == 4 and expected_ndim == 2 and tensor.shape[2:] == (1, 1):
        tensor = tensor[:, :, 0, 0]  # 1x1-conv attention projections of old checkpoints
    if tensor.ndim == 2:
        return tensor.T
    return tensor


def flax_to_torch_layout(path: Sequence[str], array: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return array.T
    return array


def _torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple:
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


class TensorSource:
    """Named tensors read on demand: `keys()` and `get(key)` (numpy, any float dtype)."""

    def __init__(self, keys: Iterable[str], getter: Callable[[str], np.ndarray], where: str):
        self._keys = list(keys)
        self._get = getter
        self.where = where

    def keys(self):
        return self._keys

    def get(self, key: str) -> np.ndarray:
        return self._get(key)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _report(component, where, missing, unexpected, mismatched, limit=5):
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. " + ", ".join(missing[:limit]) + ")")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. " + ", ".join(unexpected[:limit]) + ")")
    if mismatched:
        parts.append(f"{len(mismatched)} with wrong shapes (e.g. " + ", ".join(
            f"{k}: expected {_shape_str(e)}, found {_shape_str(f)}" for k, e, f in mismatched[:limit])
            + ")")
    raise WeightsError(f"{component} weights in {where} do not match its config: "
                       + "; ".join(parts) + ". Check that config.json and the weights belong together.")


def load_params(source: TensorSource, expected: Mapping, component: str, dtype,
                torch_layout: bool = True) -> dict:
    """Builds the Flax parameter tree `expected` (a tree of ShapeDtypeStructs) from `source`.

    `torch_layout=False` reads a Flax checkpoint (keys are '/'-joined Flax paths).
    Raises WeightsError listing missing, unexpected and mis-shaped parameters.
    """
    available = set(source.keys())
    used, out = set(), {}
    missing, mismatched = [], []
    for path, spec in flatten_dict(expected).items():
        candidates = (torch_key_candidates(path, component) if torch_layout else ["/".join(path)])
        key = next((c for c in candidates if c in available), None)
        if key is None:
            missing.append(candidates[0])
            continue
        used.add(key)
        tensor = source.get(key)
        if torch_layout:
            tensor = torch_to_flax_layout(path, tensor, len(spec.shape))
        if tuple(tensor.shape) != tuple(spec.shape):
            shown = _torch_shape(path, spec.shape) if torch_layout else spec.shape
            found = source.get(key).shape if torch_layout else tensor.shape
            mismatched.append((key, shown, found))
            continue
        out[path] = np.asarray(tensor, dtype=dtype)
        del tensor
    unexpected = sorted(k for k in available - used if not _IGNORABLE.search(k))
    if missing or unexpected or mismatched:
        _report(component, source.where, missing, unexpected, mismatched)
    return unflatten_dict(out)


def read_param(source: TensorSource, path: Sequence[str], shape: Sequence[int], component: str,
               dtype, torch_layout: bool = True) -> np.ndarray:
    """One parameter of `source` in Flax layout (for reading a model tensor by tensor);
    WeightsError naming the key if it is missing or has another shape."""
    available = source.keys()
    candidates = torch_key_candidates(path, component) if torch_layout else ["/".join(path)]
    key = next((c for c in candidates if c in available), None)
    if key is None:
        raise WeightsError(f"{component} weights in {source.where} lack {candidates[0]}")
    tensor = source.get(key)
    converted = torch_to_flax_layout(path, tensor, len(shape)) if torch_layout else tensor
    if tuple(converted.shape) != tuple(shape):
        expected = _torch_shape(path, shape) if torch_layout else tuple(shape)
        raise WeightsError(f"{component} weights in {source.where}: {key} has shape "
                           f"{_shape_str(tensor.shape)}, expected {_shape_str(expected)}")
    return np.asarray(converted, dtype=dtype)


def to_torch_state_dict(params: Mapping, component: str, dtype=None) -> dict:
    """Flax tree -> {current diffusers/transformers key: contiguous numpy array}."""
    state = {}
    for path, value in flatten_dict(params).items():
        array = flax_to_torch_layout(path, np.asarray(value))
        if dtype is not None:
            array = array.astype(dtype)
        state[torch_key(path, component)] = np.ascontiguousarray(array)
    return state
