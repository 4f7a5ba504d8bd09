"""A model's files opened without loading them: its configs, scheduler config, tokenizer, and one
lazily read `TensorSource` per component. Two kinds:

- a diffusers pipeline folder or hub id (`open_pretrained`);
- a single-file checkpoint in the original LDM layout (`open_single_file_model`), described by
  the shipped config of its family (SD 1.x -> configs/models/sd15, epsilon; SD 2.x ->
  configs/models/sd21, v-prediction), or by `original_config`: an LDM yaml, or a diffusers
  folder (its configs, scheduler and tokenizer; how non-standard models such as the tiny test
  ones are described).

`load_model` turns either into a `StableDiffusion`; `sdjax.merge` reads them tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

from sdjax.errors import WeightsError
from sdjax.hub import COMPONENT_KINDS, resolve_model_dir
from sdjax.models.build import build_models, param_shapes
from sdjax.pipeline import (MODEL_COMPONENTS, SHIPPED_CONFIGS, StableDiffusion, _read_json,
                            load_tokenizer)
from sdjax.weights import ldm_config
from sdjax.weights.convert import load_params
from sdjax.weights.files import find_weights, open_weights
from sdjax.weights.single_file import (component_source, detect_family, open_single_file,
                                       text_encoder_sizes)

log = logging.getLogger(__name__)

FAMILY_CONFIGS = {"sd1": "sd15", "sd2": "sd21"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
# (hub repository, subfolder) of each family's tokenizer.
DEFAULT_TOKENIZERS = {"sd1": ("openai/clip-vit-large-patch14", ""),
                      "sd2": ("stabilityai/stable-diffusion-2-1", "tokenizer")}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.json")


@dataclasses.dataclass
class ModelFiles:
    where: str
    configs: dict
    scheduler_config: dict
    # component -> f(expected parameter shapes) -> (TensorSource, torch_layout)
    sources: dict
    tokenizer: Callable[[], object]
    family: Optional[str] = None


def is_single_file(name: Optional[str]) -> bool:
    return bool(name) and os.path.isfile(os.path.expanduser(name))


def open_pretrained(name: str, revision: Optional[str] = None,
                    variant: Optional[str] = None) -> ModelFiles:
    folder = resolve_model_dir(name, revision=revision, variant=variant)
    configs = StableDiffusion._read_configs(folder)
    scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                           "scheduler config")

    def source(component):
        path = find_weights(os.path.join(folder, component), COMPONENT_KINDS[component], variant)
        return lambda expected: open_weights(path)

    return ModelFiles(name, configs, scheduler, {c: source(c) for c in MODEL_COMPONENTS},
                      lambda: StableDiffusion._read_tokenizer(folder, required=True))


def default_tokenizer(family: str):
    """The tokenizer of the family's reference model, through the Hugging Face hub cache."""
    from huggingface_hub import constants, snapshot_download

    repo, sub = DEFAULT_TOKENIZERS[family]
    name = f"{repo}/{sub}" if sub else repo
    try:
        folder = snapshot_download(repo, allow_patterns=[f"{sub}/{f}" if sub else f
                                                         for f in _TOKENIZER_FILES],
                                   local_files_only=constants.HF_HUB_OFFLINE)
    except Exception as e:
        why = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
               if constants.HF_HUB_OFFLINE
               else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise WeightsError(f"cannot load the {FAMILY_NAMES[family]} tokenizer {name} ({why}): "
                           "give --tokenizer_name (a tokenizer folder or hub id)") from None
    return load_tokenizer(os.path.join(folder, sub) if sub else folder)


def _describe(sf, family: str, original_config: Optional[str]) -> tuple:
    """-> (configs, scheduler config, tokenizer folder or None) of a single file."""
    shipped = os.path.join(SHIPPED_CONFIGS, FAMILY_CONFIGS[family])
    base_scheduler = _read_json(os.path.join(shipped, "scheduler", "scheduler_config.json"),
                                "scheduler config")
    if original_config is None:
        return StableDiffusion._read_configs(shipped), base_scheduler, None
    path = os.path.expanduser(original_config)
    if os.path.isdir(path):
        scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
        scheduler = (_read_json(scheduler_path, "scheduler config")
                     if os.path.isfile(scheduler_path) else base_scheduler)
        tokenizer = os.path.join(path, "tokenizer")
        return (StableDiffusion._read_configs(path), scheduler,
                tokenizer if os.path.isdir(tokenizer) else None)
    if not os.path.isfile(path):
        raise WeightsError(f"--original_config {original_config} does not exist: give the "
                           "model's LDM yaml or a diffusers folder describing it")
    original = ldm_config.read_yaml(path)
    shipped_text = StableDiffusion._read_configs(shipped)["text_encoder"]
    configs = {"unet": ldm_config.unet_config(original, original_config),
               "vae": ldm_config.vae_config(original, original_config),
               "text_encoder": ldm_config.text_encoder_config(
                   shipped_text, text_encoder_sizes(sf, family))}
    return configs, ldm_config.scheduler_config(original, base_scheduler, original_config), None


def open_single_file_model(path: str, original_config: Optional[str] = None,
                           prediction_type: Optional[str] = None, ema: bool = False
                           ) -> ModelFiles:
    sf = open_single_file(os.path.expanduser(path))
    family = detect_family(sf)
    configs, scheduler, tokenizer_dir = _describe(sf, family, original_config)
    if prediction_type:
        scheduler["prediction_type"] = prediction_type

    def source(component):
        return lambda expected: (component_source(sf, component, expected, configs[component],
                                                  family, ema and component == "unet"), True)

    def tokenizer():
        return load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer(family)

    return ModelFiles(path, configs, scheduler, {c: source(c) for c in MODEL_COMPONENTS},
                      tokenizer, family)


def open_model(name: str, revision: Optional[str] = None, variant: Optional[str] = None,
               original_config: Optional[str] = None,
               prediction_type: Optional[str] = None) -> ModelFiles:
    """A single file (any existing file) or a diffusers folder / hub id."""
    if is_single_file(name):
        return open_single_file_model(name, original_config, prediction_type)
    if original_config:
        raise WeightsError(f"--original_config describes a single-file checkpoint, but {name} is "
                           "not a file: drop --original_config")
    files = open_pretrained(name, revision, variant)
    if prediction_type:
        files.scheduler_config["prediction_type"] = prediction_type
    return files


def load_model(files: ModelFiles, dtype=None, tokenizer: Optional[str] = None,
               vae: Optional[str] = None, require_tokenizer: bool = True,
               **build_options) -> StableDiffusion:
    """The models of `files` with their weights; `tokenizer` (a folder or hub id) and `vae` (a
    VAE folder or hub id) replace the model's own."""
    import jax.numpy as jnp

    from sdjax.pipeline import _model_folder

    configs, sources = dict(files.configs), dict(files.sources)
    if vae:
        vae_folder = _model_folder(vae, "vae", None)
        configs["vae"] = _read_json(os.path.join(vae_folder, "config.json"), "vae config")
        vae_weights = find_weights(vae_folder, COMPONENT_KINDS["vae"], None)
        sources["vae"] = lambda expected: open_weights(vae_weights)
    modules = build_models(configs, dtype, **build_options)
    params = {}
    for component, module in modules.items():
        expected = param_shapes(module, component)
        source, torch_layout = sources[component](expected)
        try:
            params[component] = load_params(source, expected, component, dtype or jnp.float32,
                                            torch_layout=torch_layout)
        except WeightsError as e:
            if files.family is None or component == "vae" and vae:
                raise
            raise WeightsError(f"{e} A non-standard single file needs --original_config (its "
                               "LDM yaml, or a diffusers folder with the configs).") from None
    if tokenizer:
        loaded = load_tokenizer(tokenizer)
    else:
        try:
            loaded = files.tokenizer()
        except WeightsError as e:
            if require_tokenizer:
                raise
            log.warning("%s", e)
            loaded = None
    return StableDiffusion(modules, params, configs, loaded, files.scheduler_config,
                           source=files.where)
