"""LoRA files: writing the two formats the PyTorch world loads, reading every variant in use.

Formats written by `write_lora` (safetensors, float32 unless `dtype` says otherwise):

- `diffusers`: `pytorch_lora_weights.safetensors` (the name diffusers' `load_lora_weights`
  looks for in a folder), current diffusers/PEFT keys `unet.<module>.lora_A.weight` (A) and
  `.lora_B.weight` (B), `text_encoder.text_model.<module>…`, in PyTorch layouts (linear A
  (r, in), B (out, r); convolution A (r, in, kh, kw), B (out, r, 1, 1)). The header's
  `lora_adapter_metadata` holds, as diffusers' `save_lora_weights(…,
  unet_lora_adapter_metadata=…)` writes it, a JSON object of PEFT `LoraConfig` arguments
  prefixed by component (`unet.r`, `unet.lora_alpha`, `unet.target_modules`, …): diffusers
  builds its LoraConfig from it, so alpha != rank survives. Without it a loader takes
  alpha = rank.
- `kohya`: `<name>.safetensors` (default `pytorch_lora_weights_kohya.safetensors` in a folder),
  the keys A1111, ComfyUI, kohya's sd-scripts and diffusers read: `lora_unet_<module with _>`
  and `lora_te_text_model_…`, each with `.lora_down.weight`, `.lora_up.weight` and a scalar
  `.alpha`, and kohya's string metadata (`ss_network_dim`, `ss_network_alpha`,
  `ss_network_module`, `ss_base_model_version`, `modelspec.*`).

`read_lora` reads any of the layouts in `sdjax.lora.keys` from a file or a folder holding
`pytorch_lora_weights.safetensors` (or `.bin`, through `torch.load(weights_only=True)`), and
checks every key and shape against the model.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from flax.traverse_util import unflatten_dict

from sdjax import storage
from sdjax.errors import ConfigError, WeightsError
from sdjax.lora.adapters import adapter_layers
from sdjax.lora.keys import (ParsedKey, diffusers_name, kohya_name, layer_table, looks_sdxl,
                             parse_key)
from sdjax.lora.targets import ADAPTED_COMPONENTS, module_name

FORMATS = ("diffusers", "kohya")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_BIN_FILE = "pytorch_lora_weights.bin"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ARCHITECTURES = ("stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v")
_KOHYA_VERSIONS = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-v2-512": "sd_v2",
                   "stable-diffusion-v2-768-v": "sd_v2_v"}
_SHOWN = 5  # keys named in an error message


# --- writing ------------------------------------------------------------------------------------

def model_architecture(configs: Mapping[str, Mapping], scheduler_config: Mapping) -> str:
    """The modelspec architecture of an SD pipeline: SD 2.x has OpenCLIP's text encoder (gelu;
    CLIP ViT-L's is quick_gelu); `-768-v` when it predicts v."""
    if configs.get("text_encoder", {}).get("hidden_act", "quick_gelu") == "quick_gelu":
        return "stable-diffusion-v1"
    if scheduler_config.get("prediction_type") == "v_prediction":
        return "stable-diffusion-v2-768-v"
    return "stable-diffusion-v2-512"


def _layers(adapters: Mapping) -> dict:
    """{(component, layer path): (A, B)} as float32 numpy, checked to be adapter trees."""
    out = {}
    for component, tree in adapters.items():
        if component not in ADAPTED_COMPONENTS:
            raise ConfigError(f"LoRA adapters for {component!r}: only "
                              f"{', '.join(ADAPTED_COMPONENTS)} can be adapted")
        for path, layer in adapter_layers(tree).items():
            if set(layer) != {"down", "up"}:
                raise ConfigError(f"adapter {'/'.join(path)} holds {sorted(layer)}, not down/up")
            out[(component, tuple(path))] = (np.asarray(layer["down"], np.float32),
                                             np.asarray(layer["up"], np.float32))
    return out


def _torch_pair(down: np.ndarray, up: np.ndarray) -> tuple:
    """Flax A, B -> PyTorch A, B (see the module docstring for the layouts)."""
    if down.ndim == 4:
        return np.transpose(down, (3, 2, 0, 1)), up.T[:, :, None, None]
    return down.T, up.T


def _strings(metadata: Mapping) -> dict:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()
            if v is not None}


def _diffusers_metadata(layers: dict, rank: int, alpha: float) -> dict:
    config = {}
    for component in ADAPTED_COMPONENTS:
        names = sorted(module_name(path, component) for c, path in layers if c == component)
        if names:
            # Exact module names: PEFT matches a target by name or dotted suffix, so the text
            # encoder's names (without `text_model.`) fit transformers' CLIPTextModel with and
            # without that level.
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": names,
                           f"{component}.lora_dropout": 0.0, f"{component}.bias": "none"})
    return {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _kohya_metadata(layers: dict, rank: int, alpha: float, extra: Mapping, title: str) -> dict:
    architecture = extra.get("architecture", "stable-diffusion-v1")
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"LoRA metadata architecture={architecture!r}: use one of "
                          f"{', '.join(ARCHITECTURES)}")
    out = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha), "ss_base_model_version": _KOHYA_VERSIONS[architecture],
        "ss_v2": str(architecture != "stable-diffusion-v1"),
        "ss_v_parameterization": str(architecture.endswith("-v")),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.prediction_type": "v" if architecture.endswith("-v") else "epsilon",
    }
    if any(down.ndim == 4 and down.shape[:2] != (1, 1) for down, _ in layers.values()):
        out["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": _number(alpha)})
    if not any(c == "text_encoder" for c, _ in layers):
        out["ss_network_train_unet_only"] = "True"
    return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_file(path: str, format: str = "diffusers") -> str:
    """The file `write_lora` writes for `path`: `path` itself when it names a .safetensors
    file, else the format's file name in the folder `path`."""
    if str(path).endswith(".safetensors"):
        return str(path)
    return storage.join(path, DIFFUSERS_FILE if format == "diffusers" else KOHYA_FILE)


def write_lora(path: str, adapters: Mapping[str, Mapping], rank: int, alpha: float,
               format: str = "diffusers", metadata: Optional[Mapping[str, Any]] = None,
               dtype=None) -> str:
    """Writes adapter trees ({"unet": tree, "text_encoder": tree}, Flax layout) as a LoRA file
    that diffusers' `load_lora_weights` (both formats), A1111 and ComfyUI (kohya) load; the
    effect is W + alpha / rank * A @ B. `path`: a .safetensors file or a folder (see
    `lora_file`), local or a bucket path; written under a temporary name and renamed.
    `metadata`: extra strings for the header (e.g. base_model); for kohya, `architecture`
    (one of ARCHITECTURES, see `model_architecture`) and `title` fill kohya's own keys.
    `dtype` (e.g. "float16") converts the tensors. -> the file's path."""
    from safetensors.numpy import save

    if format not in FORMATS:
        raise ConfigError(f"LoRA format {format!r}: choose {' or '.join(FORMATS)}")
    layers = _layers(adapters)
    if not layers:
        raise ConfigError("no LoRA adapters to write")
    for (component, path_), (down, up) in layers.items():
        if down.shape[-1] != rank or up.shape[0] != rank:
            raise ConfigError(f"adapter {component}/{'/'.join(path_)} has rank "
                              f"{down.shape[-1]}, not {rank}")
    out_dtype = np.dtype(dtype) if dtype is not None else np.float32
    target = lora_file(path, format)
    extra = dict(metadata or {})
    header = {"format": "pt"}
    tensors = {}
    for (component, layer), (down, up) in sorted(layers.items()):
        a, b = _torch_pair(down, up)
        if format == "diffusers":
            name = diffusers_name(layer, component)
            tensors[f"{name}.lora_A.weight"] = a
            tensors[f"{name}.lora_B.weight"] = b
        else:
            name = kohya_name(layer, component)
            tensors[f"{name}.lora_down.weight"] = a
            tensors[f"{name}.lora_up.weight"] = b
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    # (kohya's alpha stays a 0-d float32; np.ascontiguousarray would make it 1-d)
    tensors = {k: np.ascontiguousarray(v.astype(out_dtype)) if v.ndim else v
               for k, v in tensors.items()}
    if format == "diffusers":
        header.update(_diffusers_metadata(layers, rank, alpha))
        header.update(_strings({k: v for k, v in extra.items() if k != METADATA_KEY}))
    else:
        title = str(extra.pop("title", None) or os.path.splitext(storage.basename(target))[0])
        header.update(_kohya_metadata(layers, rank, alpha, extra, title))
        extra.pop("architecture", None)
        header.update(_strings(extra))
    storage.makedirs(storage.dirname(target) or ".")
    storage.write_bytes(target, save(tensors, metadata=header))
    return target


# --- reading ------------------------------------------------------------------------------------

@dataclass
class LoraWeights:
    """A LoRA file read against a model. `adapters`: {component: adapter tree} in Flax layout
    (float32 numpy); `scales`: {component: {layer path: alpha / rank}} (what
    `merge_adapters` takes); `rank`, `alpha`: one number when every layer has the same, else
    {component: {layer path: number}}; `metadata`: the file header's strings; `format`:
    diffusers (PEFT keys), diffusers-old (lora.down/up, processors) or kohya."""
    adapters: dict
    scales: dict
    rank: Any
    alpha: Any
    metadata: dict = field(default_factory=dict)
    format: str = "diffusers"
    path: str = ""


def resolve_lora_path(path: str) -> str:
    """A LoRA file, or the diffusers file in a folder."""
    if storage.isdir(path):
        for name in (DIFFUSERS_FILE, DIFFUSERS_BIN_FILE):
            if storage.exists(storage.join(path, name)):
                return storage.join(path, name)
        found = sorted(n for n in storage.listdir(path) if n.endswith((".safetensors", ".bin")))
        if len(found) == 1:
            return storage.join(path, found[0])
        raise WeightsError(f"no LoRA file in {path}: looked for {DIFFUSERS_FILE} or "
                           f"{DIFFUSERS_BIN_FILE}" + (f"; name one of {', '.join(found)}"
                                                      if found else ""))
    if not storage.exists(path):
        raise WeightsError(f"LoRA file {path} does not exist")
    return path


def _read_tensors(path: str) -> tuple:
    """({key: numpy array}, header metadata) of a local safetensors or .bin file."""
    if path.endswith(".bin"):
        from sdjax.weights.files import _import_torch, _torch_load

        torch = _import_torch(path)
        state = _torch_load(torch, path)
        if not isinstance(state, Mapping):
            raise WeightsError(f"{path} holds no state dict of tensors")
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in state.items()}, {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot read LoRA file {path}: {first}. The file is damaged or "
                           "incomplete (an interrupted download?): download it again.") from None


def _load(path: str) -> tuple:
    if not storage.is_remote(path):
        return _read_tensors(path)
    with tempfile.TemporaryDirectory(prefix="sdjax-lora-") as folder:
        local = os.path.join(folder, storage.basename(path))
        storage.copy_tree(path, local)
        return _read_tensors(local)


def _peft_settings(metadata: Mapping) -> dict:
    """{component: LoraConfig arguments} from diffusers' lora_adapter_metadata."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise WeightsError(f"the LoRA file's {METADATA_KEY} is not JSON") from None
    out = {}
    for key, value in config.items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _pattern_value(patterns: Mapping, name: str):
    """PEFT's alpha_pattern lookup: a pattern names a module by full name or dotted suffix."""
    for pattern, value in (patterns or {}).items():
        p = pattern.lstrip("^")
        if name == p or name.endswith("." + p) or re.fullmatch(rf"(.*\.)?(?:{p})", name):
            return value
    return None


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _listing(keys: list) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown} (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def _sdxl_error(path: str):
    return WeightsError(f"{path} is an SDXL LoRA (it adapts SDXL's second text encoder, added "
                        "embeddings or 2048-wide cross-attention): it cannot be used with an SD "
                        "1.x/2.x model")


_CROSS_ATTENTION = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _to_flax(tensor: np.ndarray, kernel: tuple, role: str) -> Optional[np.ndarray]:
    """A PyTorch-layout A or B for a layer with Flax kernel shape `kernel`, in Flax layout, or
    None when it cannot be one."""
    t = np.asarray(tensor, np.float32)
    if role == "up":
        if t.ndim == 4 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0]
        return t.T if t.ndim == 2 else None
    if len(kernel) == 4:
        if t.ndim == 2 and kernel[:2] == (1, 1):
            t = t[:, :, None, None]
        return np.transpose(t, (2, 3, 1, 0)) if t.ndim == 4 else None
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]
    return t.T if t.ndim == 2 else None


def _torch_kernel(kernel: tuple) -> tuple:
    return (kernel[3], kernel[2], kernel[0], kernel[1]) if len(kernel) == 4 else kernel[::-1]


def read_lora(path: str, shapes: Mapping[str, Mapping]) -> LoraWeights:
    """Reads a LoRA file (or a folder holding pytorch_lora_weights.safetensors/.bin, local or
    a bucket path) for the model whose parameter trees (arrays or ShapeDtypeStructs) are
    `shapes` ({"unet": …, "text_encoder": …}; other components are ignored). Every key must
    name a layer of the model with fitting shapes, else WeightsError (one line)."""
    path = resolve_lora_path(str(path))
    tensors, metadata = _load(path)
    if not tensors:
        raise WeightsError(f"{path} holds no tensors")
    tables = {c: layer_table(shapes[c], c) for c in ADAPTED_COMPONENTS if c in shapes}
    found, unmatched, formats = {}, [], set()
    for key in sorted(tensors):
        parsed = parse_key(key)
        hit = _resolve(parsed, tables) if parsed is not None else None
        if hit is None:
            unmatched.append(key)
            continue
        component, layer, kernel = hit
        formats.add("kohya" if parsed.kohya else (
            "diffusers" if ".lora_A" in key or ".lora_B" in key else "diffusers-old"))
        entry = found.setdefault((component, layer), {"kernel": kernel, "keys": {}})
        if parsed.role in entry["keys"]:
            raise WeightsError(f"{path} holds two {parsed.role} tensors for "
                               f"{module_name(layer, component)}: {entry['keys'][parsed.role]} "
                               f"and {key}")
        entry["keys"][parsed.role] = key
    if any(looks_sdxl(k) for k in unmatched):
        raise _sdxl_error(path)
    if unmatched:
        lycoris = [k for k in unmatched if any(s in k for s in ("hada_", "lokr_", "dora_scale",
                                                                 "lora_magnitude_vector"))]
        hint = (" (LoHa/LoKr/DoRA weights, which sdjax does not read)" if lycoris
                else ": a LoRA for another model, or a layout sdjax does not know")
        raise WeightsError(f"{len(unmatched)} key(s) of {path} match no layer of the model"
                           f"{hint}: {_listing(unmatched)}")

    settings = _peft_settings(metadata)
    adapters, scales, ranks, alphas = {}, {}, {}, {}
    for (component, layer), entry in sorted(found.items()):
        name = module_name(layer, component)
        keys, kernel = entry["keys"], entry["kernel"]
        if "down" not in keys or "up" not in keys:
            have = ", ".join(keys.values())
            raise WeightsError(f"{path}: layer {name} has {have} but no "
                               f"{'up' if 'down' in keys else 'down'} weights")
        down = _to_flax(tensors[keys["down"]], kernel, "down")
        up = _to_flax(tensors[keys["up"]], kernel, "up")
        rank = None if down is None else down.shape[-1]
        if (down is None or up is None or down.shape != kernel[:-1] + (rank,)
                or up.shape != (rank, kernel[-1])):
            _shape_error(path, name, tensors[keys["down"]].shape, tensors[keys["up"]].shape,
                         kernel)
        peft = settings.get(component, {})
        if "alpha" in keys:
            alpha = float(np.asarray(tensors[keys["alpha"]]).reshape(()))
        elif peft:
            pattern_alpha = _pattern_value(peft.get("alpha_pattern"), name)
            alpha = float(pattern_alpha if pattern_alpha is not None
                          else peft.get("lora_alpha", rank))
        else:
            alpha = float(rank)  # no alpha saved: scale 1, as diffusers, A1111 and ComfyUI do
        scale = alpha / (np.sqrt(rank) if peft.get("use_rslora") else rank)
        adapters.setdefault(component, {})[layer + ("down",)] = down
        adapters[component][layer + ("up",)] = up
        scales.setdefault(component, {})[layer] = float(scale)
        ranks.setdefault(component, {})[layer] = int(rank)
        alphas.setdefault(component, {})[layer] = alpha
    return LoraWeights(
        adapters={c: unflatten_dict(tree) for c, tree in adapters.items()}, scales=scales,
        rank=_uniform(ranks), alpha=_uniform(alphas), metadata=metadata,
        format="+".join(sorted(formats)), path=path)


def _uniform(per_layer: dict):
    values = {v for layers in per_layer.values() for v in layers.values()}
    return values.pop() if len(values) == 1 else per_layer


def _resolve(parsed: ParsedKey, tables: Mapping) -> Optional[tuple]:
    """(component, layer path, kernel shape) of a parsed key, or None."""
    for component in ADAPTED_COMPONENTS:
        name = parsed.names.get(component)
        if name is None or component not in tables:
            continue
        entry = tables[component].get(name)
        if entry is not None:
            return (component,) + entry
    return None


def _shape_error(path, name, down, up, kernel):
    torch_kernel = _torch_kernel(kernel)
    hint = ""
    if name.endswith(("attn2.to_k", "attn2.to_v")) and len(down) >= 2:
        width = down[1]
        if width in _CROSS_ATTENTION:
            if width == 2048:
                raise _sdxl_error(path)
            hint = f" (its cross-attention is {width} wide: {_CROSS_ATTENTION[width]})"
    raise WeightsError(f"{path} is a LoRA for another architecture{hint}: layer {name} has "
                       f"weight {_shape(torch_kernel)} but the file's down/up are "
                       f"{_shape(down)} / {_shape(up)}")
