"""Writing Flax parameters as one single-file checkpoint in the original LDM layout (the
`.safetensors` files A1111, ComfyUI and diffusers' `from_single_file` read).

The file is streamed: its header is computed from the parameter shapes, then each tensor is
converted and written in turn, so writing needs little host memory beyond the parameters
themselves. It is written under a temporary name and renamed into place.

SD 1.x text encoders are written as `cond_stage_model.transformer.text_model.*`; SD 2.x ones as
OpenCLIP (`cond_stage_model.model.*`, q/k/v fused into `in_proj_weight`), holding the layers the
model uses (OpenCLIP's unused last layer and `text_projection` are not part of a diffusers
model, so they are not written; every reader named above does without them).
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict

from sdjax.errors import ConfigError, WeightsError
from sdjax.weights.convert import _torch_shape, flax_to_torch_layout, torch_key
from sdjax.weights.ldm_keys import is_vae_attention_projection, ldm_key
from sdjax.weights.save import _replace_into

_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "int64": "I64", "int32": "I32"}
COMPONENTS = ("unet", "vae", "text_encoder")
FORMATS = ("diffusers", "single_file")


def write_safetensors(path: str, specs: Mapping[str, tuple], produce: Callable[[str], np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a safetensors file tensor by tensor: `specs` maps each name to (shape, dtype),
    `produce(name)` returns the array (converted to that dtype here)."""
    names = sorted(specs)
    header, offset = {}, 0
    for name in names:
        shape, dtype = specs[name]
        dtype = np.dtype(dtype)
        if dtype.name not in _CODES:
            raise WeightsError(f"cannot write {name} as {dtype.name} in safetensors")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype.name], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in names:
                shape, dtype = specs[name]
                array = np.ascontiguousarray(np.asarray(produce(name)).astype(dtype, copy=False))
                if tuple(array.shape) != tuple(shape):
                    raise WeightsError(f"{name}: produced shape {array.shape}, expected {shape}")
                f.write(array.reshape(-1).view(np.uint8).data)

    _replace_into(path, write)


def single_file_layout(params: Mapping, configs: Mapping, family: str) -> dict:
    """{single-file key: [(part, component, Flax path, value), ...]} for every parameter."""
    layout = {}
    for component in COMPONENTS:
        for path, value in flatten_dict(params[component]).items():
            name, part = ldm_key(component, torch_key(path, component), configs[component], family)
            layout.setdefault(name, []).append((part, component, path, value))
    for name, parts in layout.items():
        if len(parts) > 1 and sorted(p[0] for p in parts) != [0, 1, 2]:
            raise WeightsError(f"{name}: expected the q, k and v projections, found parts "
                               f"{sorted(p[0] for p in parts)}")
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
    return layout


def write_single_file(path: str, params: Mapping, configs: Mapping, family: str, dtype=None,
                      metadata: Optional[Mapping[str, str]] = None) -> str:
    """Writes the 'unet', 'vae' and 'text_encoder' parameter trees (Flax layout) as one
    single-file checkpoint of `family` ('sd1' or 'sd2'); `dtype` converts every tensor."""
    layout = single_file_layout(params, configs, family)
    specs = {}
    for name, parts in layout.items():
        shapes = [_torch_shape(p[2], np.shape(p[3])) for p in parts]
        shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        if is_vae_attention_projection(name) and len(shape) == 2:
            shape += (1, 1)
        value_dtype = getattr(parts[0][3], "dtype", np.float32)
        specs[name] = (shape, np.dtype(dtype) if dtype is not None else np.dtype(value_dtype))

    def produce(name):
        arrays = [flax_to_torch_layout(p[2], np.asarray(p[3])) for p in layout[name]]
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        return array.reshape(specs[name][0])

    write_safetensors(path, specs, produce, {"format": "pt", **(metadata or {})})
    return path


def family_of(configs: Mapping) -> str:
    """'sd2' for an OpenCLIP text encoder (GELU, as SD 2.x's ViT-H), else 'sd1' (CLIP ViT-L,
    quick GELU)."""
    act = configs["text_encoder"].get("hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def output_format(output: str, format: Optional[str]) -> str:
    """`format`, or single_file for a `.safetensors` output and diffusers otherwise."""
    inferred = "single_file" if output.endswith(".safetensors") else "diffusers"
    format = format or inferred
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose {' or '.join(FORMATS)}")
    if format == "single_file" and inferred != "single_file":
        raise ConfigError(f"--format single_file writes one .safetensors file: name --output "
                          f"FILE.safetensors, not {output}")
    if format == "diffusers" and inferred != "diffusers":
        raise ConfigError(f"--output {output} names a .safetensors file: a diffusers pipeline is "
                          "a folder (or use --format single_file)")
    return format
