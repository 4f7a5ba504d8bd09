"""Finding and reading weight files: safetensors (single or sharded), PyTorch .bin, Flax msgpack.

Tensors are read lazily, one at a time (safetensors memory-maps the file), so loading needs
little more host memory than the loaded parameters themselves.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from flax.traverse_util import flatten_dict

from sdjax.errors import WeightsError
from sdjax.weights.convert import TensorSource

# Weight file stems per component kind: (safetensors/bin stem, Flax msgpack name, legacy .bin stem).
WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "transformers": ("model", "flax_model.msgpack", "pytorch_model"),
}


def _with_variant(filename: str, variant: Optional[str]) -> str:
    if not variant:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def candidate_files(kind: str, variant: Optional[str]) -> list:
    """Weight files to look for in a component folder, in order of preference."""
    st, msgpack, legacy = WEIGHT_NAMES[kind]
    names = [_with_variant(f"{st}.safetensors", variant),
             _with_variant(f"{st}.safetensors.index.json", variant)]
    if not variant:
        names.append(msgpack)
    names += [_with_variant(f"{legacy}.bin", variant), _with_variant(f"{legacy}.bin.index.json", variant)]
    return names


def find_weights(folder: str, kind: str, variant: Optional[str]) -> str:
    for name in candidate_files(kind, variant):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    hint = (f" (no '{variant}' variant: try without variant)" if variant else "")
    raise WeightsError(f"no weights file in {folder}{hint}: looked for "
                       f"{', '.join(candidate_files(kind, variant))}; found {present or 'nothing'}")


def _safetensors_source(paths: dict, where: str) -> TensorSource:
    """`paths` maps each tensor name to its file; files are opened once each."""
    from safetensors import safe_open

    handles = {}

    def get(key):
        path = paths[key]
        try:
            if path not in handles:
                handles[path] = safe_open(path, framework="numpy")
            return handles[path].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise WeightsError(f"cannot read tensor {key!r} from {path}: {e}. The file is "
                               "damaged or incomplete: download it again.") from None

    return TensorSource(paths.keys(), get, where)


def _safetensors_keys(path: str) -> list:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}. The file is damaged or incomplete "
                           "(an interrupted download?): download it again.") from None


def _sharded_index(path: str) -> dict:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"cannot read shard index {path}: {e}") from None
    folder = os.path.dirname(path)
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
    if missing:
        raise WeightsError(f"shard index {path} names files that are not there: {', '.join(missing)}")
    return {k: os.path.join(folder, f) for k, f in weight_map.items()}


def _import_torch(where: str):
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{where} holds PyTorch .bin weights, which need torch to read: "
                           "`pip install torch` (the CPU build is enough), or convert them to "
                           "safetensors.") from None
    return torch


def _torch_load(torch, path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {e}. "
                           "Use a safetensors file or download it again.") from None


def _torch_source(paths: dict, where: str, states: Optional[dict] = None) -> TensorSource:
    """Reads each .bin file (memory-mapped) the first time one of its tensors is asked for."""
    torch = _import_torch(where)
    states = {} if states is None else states

    def get(key):
        path = paths[key]
        if path not in states:
            states[path] = _torch_load(torch, path)
        tensor = states[path][key]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16 of its own
        return tensor.numpy()

    return TensorSource(paths.keys(), get, where)


def _msgpack_source(path: str) -> TensorSource:
    from flax import serialization

    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:
        raise WeightsError(f"cannot read Flax weights {path}: {e}. Download it again.") from None
    if set(tree) == {"params"}:
        tree = tree["params"]
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
    return TensorSource(flat.keys(), flat.__getitem__, path)


def open_weights(path: str) -> tuple:
    """Returns (TensorSource, torch_layout) for a weights file or shard index."""
    if path.endswith(".msgpack"):
        return _msgpack_source(path), False
    if path.endswith(".index.json"):
        paths = _sharded_index(path)
        if ".safetensors" in os.path.basename(path):
            return _safetensors_source(paths, path), True
        return _torch_source(paths, path), True
    if path.endswith(".safetensors"):
        return _safetensors_source({k: path for k in _safetensors_keys(path)}, path), True
    if path.endswith(".bin"):
        state = _torch_load(_import_torch(path), path)
        return _torch_source({k: path for k in state}, path, states={path: state}), True
    raise WeightsError(f"unknown weights format: {path}")
