"""Fusing LoRA files into a model's weights: `--lora FILE[:SCALE]` of generate and compare,
validation, and `merge --fuse_lora`.

Each adapted kernel becomes W + scale * alpha / rank * A @ B, computed in float32 on the host
(numpy) and stored in the kernel's dtype; several LoRAs add up, in the order given.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax.errors import ConfigError
from sdjax.lora.adapters import adapter_layers, merge_adapters
from sdjax.lora.files import LoraWeights, read_lora
from sdjax.lora.targets import ADAPTED_COMPONENTS


def parse_lora_spec(spec: str) -> tuple:
    """`FILE[:SCALE]` -> (FILE, SCALE), SCALE 1.0 when absent. Only what follows the last ':'
    can be the scale, and only when it reads as a finite number: `gs://b/x.safetensors` and
    `a:b.safetensors` are paths, and so is a spec naming an existing file as a whole."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--lora needs a file: FILE or FILE:SCALE")
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or os.path.exists(spec):
        return spec, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return spec, 1.0
    if not math.isfinite(scale):
        raise ConfigError(f"--lora {spec}: the scale after ':' must be a finite number")
    return head, scale


def load_loras(specs: Sequence[str], shapes: Mapping[str, Mapping]) -> list:
    """[(LoraWeights, scale)] of `FILE[:SCALE]` specs read against the model `shapes`."""
    loaded = []
    for spec in specs or ():
        path, scale = parse_lora_spec(spec)
        loaded.append((read_lora(path, shapes), scale))
    return loaded


def _on_host(params: Mapping, adapters: Mapping) -> dict:
    """`params` with the kernels `adapters` touches as numpy arrays (the rest unchanged)."""
    flat = dict(flatten_dict(params))
    for path in adapter_layers(adapters):
        key = tuple(path) + ("kernel",)
        if key in flat:
            flat[key] = np.asarray(flat[key])
    return unflatten_dict(flat)


def fuse_loras(params: Mapping[str, Mapping], loaded: Sequence[tuple]) -> dict:
    """`params` ({component: tree}) with each (LoraWeights, scale) of `loaded` merged in; the
    components no LoRA touches are the same objects."""
    out = dict(params)
    for weights, scale in loaded:
        assert isinstance(weights, LoraWeights)
        for component, adapters in weights.adapters.items():
            if component not in out:
                raise ConfigError(f"{weights.path} adapts the {component}, which is not given")
            per_layer = {p: s * scale for p, s in weights.scales[component].items()}
            out[component] = merge_adapters(_on_host(out[component], adapters), adapters,
                                            per_layer)
    return out


def fuse_lora_files(params: Mapping[str, Mapping], specs: Sequence[str]) -> dict:
    """`params` ({component: Flax params}, e.g. a StableDiffusion's `.params`) with the LoRA
    files `specs` (`FILE[:SCALE]`) fused into the UNet and text encoder."""
    shapes = {c: params[c] for c in ADAPTED_COMPONENTS if c in params}
    return fuse_loras(params, load_loras(specs, shapes))
