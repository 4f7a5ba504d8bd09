"""Reading single-file Stable Diffusion checkpoints (`.safetensors`, or `.ckpt` with torch).

`open_single_file` opens the file lazily (safetensors memory-maps it; a `.ckpt` is read with
`torch.load(weights_only=True, mmap=True)`), `detect_family` tells SD 1.x from SD 2.x by the text
encoder's keys, and `component_source` presents one component under the current diffusers/
transformers names (`sdjax.weights.ldm_keys`), so `load_params` checks and converts it like any
other checkpoint. Keys of the file under the component's prefix that no parameter uses are
passed on under their own names and reported as unexpected.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict

from sdjax.errors import WeightsError
from sdjax.weights.convert import TensorSource, torch_key
from sdjax.weights.ldm_keys import PREFIXES, TEXT_LAYOUT, ldm_key

FAMILIES = ("sd1", "sd2")
# Keys of real checkpoints that are not model parameters (or not of the models sdjax builds).
_IGNORED = re.compile(
    r"^(first_stage_model\.loss\."  # the VAE's training loss (LPIPS, discriminator)
    r"|cond_stage_model\.model\.(logit_scale|text_projection|attn_mask)$"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")
_RESBLOCK = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


class SingleFile:
    """A checkpoint file opened for reading: `keys`, `shape(key)`, `get(key)` (numpy)."""

    def __init__(self, path: str, keys, shape, get, metadata: Optional[dict] = None):
        self.path = path
        self.keys = set(keys)
        self.shape = shape
        self.get = get
        self.metadata = metadata or {}


def _open_safetensors(path: str) -> SingleFile:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="numpy")
        keys = list(handle.keys())
        metadata = handle.metadata()
    except Exception as e:  # safetensors raises its own error types for corrupt data
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot read {path}: {first}. The file is damaged or incomplete "
                           "(an interrupted download?): download it again.") from None

    def get(key):
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"cannot read tensor {key!r} from {path}: {e}. The file is "
                               "damaged or incomplete: download it again.") from None

    return SingleFile(path, keys, lambda k: tuple(handle.get_slice(k).get_shape()), get, metadata)


def _open_torch(path: str) -> SingleFile:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch pickle (.ckpt), which needs torch to read: "
                           "`pip install torch` (the CPU build is enough), or use the model's "
                           ".safetensors file.") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files saved before PyTorch 1.6 (not zip archives) cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {first}. Use "
                           "the model's .safetensors file, or download it again.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # PyTorch Lightning checkpoints (the original SD releases)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def get(key):
        tensor = tensors[key]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16 of its own
        return tensor.numpy()

    return SingleFile(path, tensors, lambda k: tuple(tensors[k].shape), get)


def open_single_file(path: str) -> SingleFile:
    """A `.safetensors` file, or any other file as a PyTorch pickle (`.ckpt`, `.pt`, `.pth`)."""
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    return _open_torch(path)


def _prefixes(keys) -> str:
    heads = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(f"{h}.*" for h in heads[:4]) + (", ..." if len(heads) > 4 else "")


def detect_family(sf: SingleFile) -> str:
    """'sd1' (CLIP ViT-L text encoder) or 'sd2' (OpenCLIP); WeightsError for anything else."""
    keys = sf.keys
    where = f"{sf.path} is not a Stable Diffusion 1.x/2.x single-file checkpoint"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise WeightsError(f"{where}: its conditioner.embedders.* keys are those of SDXL, which "
                           "sdjax does not read yet")
    if not any(k.startswith(PREFIXES["unet"]) for k in keys):
        found = _prefixes(keys) if keys else "no tensors"
        raise WeightsError(f"{where}: it has no model.diffusion_model.* (UNet) keys; found "
                           f"{found}")
    if not any(k.startswith(PREFIXES["vae"]) for k in keys):
        raise WeightsError(f"{where}: it has no first_stage_model.* (VAE) keys (a UNet-only "
                           "file?); use a full checkpoint")
    if any(k.startswith(PREFIXES["clip"]) for k in keys):
        return "sd1"
    if any(k.startswith(PREFIXES["openclip"]) for k in keys):
        return "sd2"
    raise WeightsError(f"{where}: it has no text encoder (cond_stage_model.transformer.* for SD "
                       "1.x, cond_stage_model.model.* for SD 2.x)")


def text_encoder_layers(sf: SingleFile, family: str) -> int:
    """How many transformer layers the file's text encoder holds."""
    if TEXT_LAYOUT[family] == "openclip":
        pattern = _RESBLOCK
    else:
        pattern = re.compile(r"^cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\."
                             r"(\d+)\.")
    found = {int(m[1]) for m in map(pattern.match, sf.keys) if m}
    return max(found) + 1 if found else 0


def _ema_key(ldm: str) -> str:
    """LDM's EMA copy of a UNet parameter: `model_ema.` + the name after `model.`, without dots."""
    return "model_ema." + ldm[len("model."):].replace(".", "")


def component_source(sf: SingleFile, component: str, expected: Mapping, config: Mapping,
                     family: str, ema: bool = False) -> TensorSource:
    """The file's `component` under diffusers names, for `load_params(source, expected, ...)`.

    `ema` reads the UNet's EMA weights (`model_ema.*`) instead of the raw ones. An SD 2.x text
    encoder file holding one layer more than the config (OpenCLIP's last layer, which SD 2.x
    does not use) has that layer ignored."""
    layout = component if component != "text_encoder" else TEXT_LAYOUT[family]
    prefix = PREFIXES[layout]
    names, raw = {}, set()  # diffusers key -> (file key, part); the non-EMA file keys
    for path in flatten_dict(expected):
        key = torch_key(path, component)
        name, part = ldm_key(component, key, config, family)
        if layout == "clip" and name not in sf.keys:
            bare = prefix + key  # old files: CLIP without the text_model. prefix
            name = bare if bare in sf.keys else name
        raw.add(name)
        if ema:
            name = _ema_key(name)
        names[key] = (name, part)
    if ema and not any(n in sf.keys for n, _ in names.values()):
        raise WeightsError(f"{sf.path} holds no EMA weights (model_ema.*): drop the EMA option")
    used = raw | {n for n, _ in names.values()}
    ignored = _IGNORED
    if layout == "openclip":
        layers = int(config.get("num_hidden_layers", 0))
        if text_encoder_layers(sf, family) == layers + 1:
            ignored = re.compile(rf"{_IGNORED.pattern}|^{re.escape(prefix)}transformer\."
                                 rf"resblocks\.{layers}\.")
    rest = sorted(k for k in sf.keys
                  if k.startswith(prefix) and k not in used and not ignored.search(k))
    present = [k for k, (n, _) in names.items() if n in sf.keys]

    def get(key):
        if key not in names:
            return sf.get(key)
        name, part = names[key]
        tensor = sf.get(name)
        if part is None:
            return tensor
        third = tensor.shape[0] // 3
        return np.ascontiguousarray(tensor[part * third:(part + 1) * third])

    return TensorSource(present + rest, get, sf.path)


def text_encoder_sizes(sf: SingleFile, family: str) -> dict:
    """The text encoder's sizes as found in the file (for configs built from an LDM yaml).

    An SD 2.x file holding OpenCLIP's `text_projection` is a dump of the whole OpenCLIP text
    tower, whose last layer SD 2.x does not use; files converted from diffusers hold only the
    layers used."""
    layers = text_encoder_layers(sf, family)
    if TEXT_LAYOUT[family] == "openclip":
        base = PREFIXES["openclip"]
        tokens, positions = base + "token_embedding.weight", base + "positional_embedding"
        fc1 = base + "transformer.resblocks.0.mlp.c_fc.weight"
        if base + "text_projection" in sf.keys:
            layers -= 1
    else:
        base = PREFIXES["clip"] + ("text_model." if any(
            k.startswith(PREFIXES["clip"] + "text_model.") for k in sf.keys) else "")
        tokens = base + "embeddings.token_embedding.weight"
        positions = base + "embeddings.position_embedding.weight"
        fc1 = base + "encoder.layers.0.mlp.fc1.weight"
    missing = [k for k in (tokens, positions, fc1) if k not in sf.keys]
    if missing:
        raise WeightsError(f"{sf.path} lacks the text encoder tensor {missing[0]}")
    vocab, hidden = sf.shape(tokens)
    return {"hidden_size": int(hidden), "vocab_size": int(vocab),
            "max_position_embeddings": int(sf.shape(positions)[0]),
            "intermediate_size": int(sf.shape(fc1)[0]), "num_hidden_layers": layers}
