"""StableDiffusion: the three Flax models, their parameters, tokenizer and scheduler config.

    sd = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    noise_pred = sd.unet.apply({"params": sd.params["unet"]}, latents, t, text_embeddings)
    images = sd("a photo of an astronaut riding a horse", num_inference_steps=30)  # PIL images
    sd.save_pretrained("out")  # a diffusers PyTorch pipeline folder

`from_config` builds the same object with random weights from a config folder (the shipped
`configs/models/{sd15,sd21,sd21-base,tiny}` or any diffusers pipeline folder).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from sdjax.errors import SdjaxError, WeightsError
from sdjax.hub import COMPONENT_KINDS, resolve_model_dir
from sdjax.models.build import build_models, param_shapes
from sdjax.models.init import random_params
from sdjax.weights.convert import load_params
from sdjax.weights.files import find_weights, open_weights
from sdjax.weights.save import write_pipeline

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "models")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: {path} does not exist. Is this a diffusers "
                           "Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, "
                           "scheduler/)?") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {what} {path}: {e}") from None


def _model_folder(name_or_path: str, component: str, variant: Optional[str]) -> str:
    """The folder of one model given on its own (a folder with config.json, a pipeline folder
    holding `component/`, or a hub id of a one-model repository)."""
    folder = resolve_model_dir(name_or_path, variant=variant, component=component)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(
            os.path.join(folder, component)):
        return os.path.join(folder, component)
    return folder


def load_tokenizer(name_or_path: str):
    """A CLIP tokenizer from a folder, a pipeline folder (its tokenizer/) or a hub id."""
    from transformers import CLIPTokenizer

    sub = os.path.join(name_or_path, "tokenizer")
    path = sub if os.path.isdir(sub) else name_or_path
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                       for f in ("vocab.json", "tokenizer.json")):
        raise WeightsError(f"cannot load a CLIP tokenizer from {name_or_path}: it holds neither "
                           "vocab.json nor tokenizer.json (nor a tokenizer/ folder with them)")
    try:
        return CLIPTokenizer.from_pretrained(path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot load a CLIP tokenizer from {name_or_path}: {first}") from None


def load_pipeline(name: str, seed: int = 0, revision: Optional[str] = None,
                  variant: Optional[str] = None, dtype=None, vae: Optional[str] = None,
                  tokenizer: Optional[str] = None,
                  original_config: Optional[str] = None) -> "StableDiffusion":
    """A diffusers folder or hub id, a single-file checkpoint (`original_config` describes a
    non-standard one), or a shipped config name (random weights from `seed`); `vae` and
    `tokenizer` replace those of the pipeline (diffusers' --pretrained_vae_name_or_path and
    --tokenizer_name)."""
    from sdjax.model_files import is_single_file

    if original_config and not is_single_file(name):
        raise WeightsError(f"--original_config describes a single-file checkpoint, but {name} is "
                           "not a file: drop --original_config")
    if is_single_file(name):
        return StableDiffusion.from_single_file(name, original_config=original_config,
                                                dtype=dtype, vae=vae, tokenizer=tokenizer)
    if not os.path.exists(name) and os.path.isdir(os.path.join(SHIPPED_CONFIGS, name)):
        if vae:
            raise WeightsError("--pretrained_vae_name_or_path needs a pretrained model, not the "
                               f"shipped config {name!r}")
        sd = StableDiffusion.from_config(name, seed=seed, dtype=dtype)
    else:
        sd = StableDiffusion.from_pretrained(name, revision=revision, variant=variant, dtype=dtype,
                                             vae=vae)
    if tokenizer:
        sd.tokenizer = load_tokenizer(tokenizer)
    return sd


def load_base(spec: Mapping[str, Any], dtype=None) -> "StableDiffusion":
    """The base pipeline a training run recorded in its checkpoints
    (`sdjax.train.setup.base_model_spec`)."""
    sd = load_pipeline(spec["pretrained_model_name_or_path"], spec.get("seed", 0),
                       spec.get("revision"), spec.get("variant"), dtype, spec.get("vae"),
                       spec.get("tokenizer"), spec.get("original_config"))
    if spec.get("lora"):  # LoRA files fused into the base (--lora)
        from sdjax.lora.fuse import fuse_lora_files

        sd.params.update(fuse_lora_files(sd.params, spec["lora"]))
    return sd


class StableDiffusion:
    """The SD pipeline's models (`.unet`, `.vae`, `.text_encoder`), `.params`, `.tokenizer` and
    `.scheduler_config`. Parameters are plain nested dicts of host arrays."""

    def __init__(self, modules: Mapping[str, Any], params: Mapping[str, Any], configs: Mapping[str, dict],
                 tokenizer=None, scheduler_config: Optional[dict] = None, source: Optional[str] = None):
        self.unet = modules["unet"]
        self.vae = modules["vae"]
        self.text_encoder = modules["text_encoder"]
        self.params = dict(params)
        self.configs = {k: dict(v) for k, v in configs.items()}
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or {})
        self.source = source
        self._sampler = None
        self._placed = (None, None)

    # --- construction -----------------------------------------------------------------------

    @staticmethod
    def _read_configs(folder: str, component_dirs: Optional[Mapping[str, str]] = None) -> dict:
        if not os.path.isdir(folder):
            raise WeightsError(f"model folder {folder} does not exist")
        configs = {}
        for component in MODEL_COMPONENTS:
            sub = (component_dirs or {}).get(component) or os.path.join(folder, component)
            if not os.path.isdir(sub):
                raise WeightsError(f"{folder} has no {component}/ subfolder; a diffusers Stable "
                                   "Diffusion folder has unet/, vae/, text_encoder/, tokenizer/ "
                                   "and scheduler/")
            configs[component] = _read_json(os.path.join(sub, "config.json"), f"{component} config")
        return configs

    @staticmethod
    def _read_tokenizer(folder: str, required: bool):
        sub = os.path.join(folder, "tokenizer")
        if not os.path.isdir(sub):
            if required:
                raise WeightsError(f"{folder} has no tokenizer/ subfolder")
            return None
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(sub)
        except Exception as e:
            raise WeightsError(f"cannot load the CLIP tokenizer from {sub}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: Optional[str] = None,
                        variant: Optional[str] = None, dtype=None,
                        attention_implementation: Optional[str] = "xla",
                        gradient_checkpointing: bool = False,
                        remat_policy: str = "nothing_saveable",
                        vae: Optional[str] = None) -> "StableDiffusion":
        """Loads a diffusers pipeline folder or hub id (safetensors, .bin, or Flax msgpack).

        `dtype` is that of the parameters and of the computation (default float32, whatever the
        files hold); `variant` picks e.g. `diffusion_pytorch_model.fp16.safetensors`; `vae` (a
        VAE folder or hub id, e.g. stabilityai/sd-vae-ft-mse) replaces the pipeline's VAE.
        """
        folder = resolve_model_dir(name_or_path, revision=revision, variant=variant)
        dirs = {c: os.path.join(folder, c) for c in MODEL_COMPONENTS}
        if vae:
            dirs["vae"] = _model_folder(vae, "vae", variant)
        configs = cls._read_configs(folder, dirs)
        scheduler_config = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                                      "scheduler config")
        modules = build_models(configs, dtype, attention_implementation, gradient_checkpointing,
                               remat_policy)
        param_dtype = dtype or jnp.float32
        params = {}
        for component, module in modules.items():
            weights = find_weights(dirs[component], COMPONENT_KINDS[component], variant)
            source, torch_layout = open_weights(weights)
            params[component] = load_params(source, param_shapes(module, component), component,
                                            param_dtype, torch_layout=torch_layout)
        tokenizer = cls._read_tokenizer(folder, required=True)
        return cls(modules, params, configs, tokenizer, scheduler_config, source=name_or_path)

    @classmethod
    def from_single_file(cls, path: str, original_config: Optional[str] = None,
                         prediction_type: Optional[str] = None, dtype=None,
                         tokenizer: Optional[str] = None, vae: Optional[str] = None,
                         ema: bool = False, require_tokenizer: bool = True,
                         attention_implementation: Optional[str] = "xla",
                         gradient_checkpointing: bool = False,
                         remat_policy: str = "nothing_saveable") -> "StableDiffusion":
        """Loads a single-file SD 1.x/2.x checkpoint in the original LDM layout (`.safetensors`,
        or `.ckpt` with torch installed), as A1111, ComfyUI and civitai use.

        The family comes from the text encoder's keys: SD 1.x is described by the shipped
        `sd15` config (epsilon), SD 2.x by `sd21` (v-prediction); `original_config` (an LDM
        yaml, or a diffusers folder with the configs, scheduler and tokenizer) describes other
        models, and `prediction_type` overrides the scheduler's. The tokenizer is that of the
        family's reference model from the Hugging Face hub (cached), unless `tokenizer` (a
        folder or hub id) or the `original_config` folder gives one. `ema` reads the UNet's
        EMA weights (`model_ema.*`) of files that keep them.
        """
        from sdjax.model_files import load_model, open_single_file_model

        if not os.path.isfile(os.path.expanduser(path)):
            raise WeightsError(f"single-file checkpoint {path} does not exist")
        files = open_single_file_model(path, original_config, prediction_type, ema)
        return load_model(files, dtype, tokenizer, vae, require_tokenizer,
                          attention_implementation=attention_implementation,
                          gradient_checkpointing=gradient_checkpointing,
                          remat_policy=remat_policy)

    @classmethod
    def from_config(cls, name_or_path: str = "tiny", seed: int = 0, dtype=None,
                    attention_implementation: Optional[str] = "xla",
                    gradient_checkpointing: bool = False, remat_policy: str = "nothing_saveable",
                    init_params: bool = True) -> "StableDiffusion":
        """Random weights for a shipped config (`sd15`, `sd21`, `sd21-base`, `tiny`) or a folder.

        With `init_params=False` the params are ShapeDtypeStructs (for counting and AOT compiles).
        """
        folder = name_or_path
        if not os.path.isdir(folder):
            folder = os.path.join(SHIPPED_CONFIGS, name_or_path)
            if not os.path.isdir(folder):
                shipped = sorted(os.listdir(SHIPPED_CONFIGS))
                raise WeightsError(f"unknown model config {name_or_path!r}: pass a folder or one of "
                                   f"{', '.join(shipped)}")
        configs = cls._read_configs(folder)
        scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        scheduler_config = _read_json(scheduler_path, "scheduler config")
        modules = build_models(configs, dtype, attention_implementation, gradient_checkpointing,
                               remat_policy)
        params = {}
        for offset, (component, module) in enumerate(modules.items()):
            shapes = param_shapes(module, component)
            params[component] = (random_params(shapes, seed + offset, dtype or jnp.float32)
                                 if init_params else shapes)
        tokenizer = cls._read_tokenizer(folder, required=False)
        return cls(modules, params, configs, tokenizer, scheduler_config, source=folder)

    @classmethod
    def from_configs(cls, configs: Mapping[str, dict], scheduler_config: Mapping[str, Any],
                     dtype=None) -> "StableDiffusion":
        """The models of raw config dicts with parameter shapes only (for counts and ahead-of-
        time compiles, e.g. of a single file's architecture)."""
        modules = build_models(configs, dtype)
        params = {c: param_shapes(m, c) for c, m in modules.items()}
        return cls(modules, params, configs, None, dict(scheduler_config))

    # --- sampling ----------------------------------------------------------------------------

    def sampler(self):
        """The `Sampler` over these models (one per pipeline; it keeps the compiled programs)."""
        if self._sampler is None:
            from sdjax.sampling.sampler import Sampler

            modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
            self._sampler = Sampler(modules, self.configs, self.scheduler_config, self.tokenizer)
        return self._sampler

    def _device_params(self):
        """`self.params` replicated on the devices, placed once while the trees stay the same
        objects (assign a new tree, e.g. `sd.params["unet"] = new`, to sample other weights)."""
        sources = tuple(self.params[c] for c in MODEL_COMPONENTS)
        placed_from = self._placed[0]
        if placed_from is None or any(a is not b for a, b in zip(placed_from, sources)):
            self._placed = (None, None)  # let the old copy go before placing the new one
            self._placed = (sources, self.sampler().place(dict(zip(MODEL_COMPONENTS, sources))))
        return self._placed[1]

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: Optional[int] = None,
                 width: Optional[int] = None, num_images_per_prompt: int = 1, seed: int = 0,
                 scheduler: Optional[str] = None, latents=None, output_type: str = "pil"):
        """Text to image, as diffusers' StableDiffusionPipeline with the same argument names.

        `scheduler` is a sampler name (`sdjax.sampling.schedulers.SCHEDULERS`) or its diffusers
        class name (default: the one `scheduler_config` names), set up from
        `self.scheduler_config` (edit it to change e.g. timestep_spacing). `seed` replaces diffusers' generator: image i of prompt
        p draws its noise from fold_in(fold_in(key(seed), p), i). `latents` (N, C, H/8, W/8)
        sets the initial noise.
        -> a list of PIL images; `output_type="np"`: (N, H, W, 3) floats in [0, 1];
        `"latent"`: the final latents (N, C, H/8, W/8)."""
        if output_type not in ("pil", "np", "latent"):
            raise SdjaxError(f"output_type={output_type!r}: choose pil, np or latent")
        leaves = jax.tree_util.tree_leaves(self.params["unet"])
        if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
            raise SdjaxError("these parameters are shapes only (from_config(init_params=False)); "
                             "nothing to sample with")
        out = self.sampler().sample(
            self._device_params(), prompt, negative_prompt, num_inference_steps, guidance_scale,
            height, width, num_images_per_prompt, seed, scheduler, latents,
            decode=output_type != "latent")
        if output_type == "latent":
            return out.latents
        if output_type == "np":
            return out.images
        from sdjax.sampling.images import to_pil

        return to_pil(out.images)

    # --- export -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str, params: Optional[Mapping[str, Any]] = None,
                        dtype=None) -> str:
        """Writes a diffusers PyTorch pipeline folder that `StableDiffusionPipeline.from_pretrained`
        loads. `params` (all or some components) replaces `self.params`; `dtype` (e.g. float16)
        converts the saved tensors. `directory` may be a bucket path (gs://...): the files are
        written locally, then uploaded. Returns the directory."""
        merged = dict(self.params)
        merged.update(params or {})
        for component in MODEL_COMPONENTS:
            leaves = jax.tree_util.tree_leaves(merged[component])
            if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
                raise SdjaxError("these parameters are shapes only (from_config(init_params=False)); "
                                 "nothing to save")
        from sdjax import storage

        with storage.local_folder(directory) as folder:
            write_pipeline(folder, merged, self.configs, self.scheduler_config, self.tokenizer,
                           dtype)
        return directory

    def save_single_file(self, path: str, params: Optional[Mapping[str, Any]] = None,
                         dtype=None) -> str:
        """Writes one `.safetensors` file in the original LDM layout (A1111, ComfyUI and
        diffusers' `from_single_file` read it). SD 2.x-style models (a GELU text encoder) get an
        OpenCLIP text encoder, others a CLIP one. `params` and `dtype` as in save_pretrained."""
        from sdjax.weights.single_file_save import family_of, write_single_file

        merged = dict(self.params)
        merged.update(params or {})
        if not path.endswith(".safetensors") or "://" in path:
            raise WeightsError(f"{path}: a single-file checkpoint is written as a local "
                               ".safetensors file")
        for component in MODEL_COMPONENTS:
            leaves = jax.tree_util.tree_leaves(merged[component])
            if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
                raise SdjaxError("these parameters are shapes only "
                                 "(from_config(init_params=False)); nothing to save")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        return write_single_file(path, merged, self.configs, family_of(self.configs), dtype)
