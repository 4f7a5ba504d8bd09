"""Writing a diffusers PyTorch pipeline folder from Flax parameters (no torch needed).

The folder holds model_index.json with PyTorch class names, one config.json and one
safetensors file per model, the scheduler config and the tokenizer, as current diffusers writes
them. Every file is written to a temporary name and renamed into place, so an interrupted export
never leaves a truncated file under a final name, and files already in the folder that are not
part of a pipeline (checkpoints/, logs/) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import numpy as np

from sdjax.weights.convert import to_torch_state_dict

log = logging.getLogger(__name__)

# The diffusers release whose layout this writer follows (informational, as diffusers writes it).
DIFFUSERS_FORMAT_VERSION = "0.42.1"

_CLASS_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors",
                 "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors"}


def _replace_into(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: Mapping) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _replace_into(path, write)


def component_config(component: str, config: Mapping[str, Any]) -> dict:
    config = dict(config)
    if component == "text_encoder":
        config["architectures"] = ["CLIPTextModel"]
        config.setdefault("model_type", "clip_text_model")
    else:
        config["_class_name"] = _CLASS_NAMES[component]
        config.setdefault("_diffusers_version", DIFFUSERS_FORMAT_VERSION)
    return config


def write_pipeline(directory: str, params: Mapping[str, Any], configs: Mapping[str, dict],
                   scheduler_config: Mapping[str, Any], tokenizer=None, dtype=None) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    for component in ("unet", "vae", "text_encoder"):
        sub = os.path.join(directory, component)
        os.makedirs(sub, exist_ok=True)
        state = to_torch_state_dict(params[component], component,
                                    None if dtype is None else np.dtype(dtype))
        _replace_into(os.path.join(sub, _WEIGHT_FILES[component]),
                      lambda tmp, s=state: save_file(s, tmp, metadata={"format": "pt"}))
        del state
        _write_json(os.path.join(sub, "config.json"), component_config(component, configs[component]))

    scheduler = dict(scheduler_config)
    scheduler.setdefault("_class_name", "PNDMScheduler")
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    _write_json(os.path.join(directory, "scheduler", "scheduler_config.json"), scheduler)

    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    else:
        log.warning("no tokenizer to save: %s/tokenizer must be added before diffusers can load "
                    "the pipeline", directory)

    _write_json(os.path.join(directory, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer is not None else [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
