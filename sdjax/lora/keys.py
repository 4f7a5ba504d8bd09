"""The key names of LoRA files, in every layout found in the wild, and the layers they name.

A key names one tensor of one adapted layer: its `down` (A) matrix, its `up` (B) matrix or its
`alpha`. The layouts (X = the diffusers/transformers module name, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.
self_attn.q_proj`):

- PEFT (diffusers' current format): `[unet.|text_encoder.]X.lora_A[.ADAPTER].weight` (down),
  `lora_B` (up); PEFT's own files start with `base_model.model.`.
- diffusers, older: `X.lora.down.weight` / `X.lora.up.weight`, `X.lora_linear_layer.down.weight`,
  and the attention processors' `…attn1.processor.to_q_lora.down.weight` (`to_k_lora`,
  `to_v_lora`, `to_out_lora`; in the text encoder they stand for q/k/v/out_proj). Files from
  before the `unet.` prefix hold the UNet alone.
- kohya / A1111 / ComfyUI / LyCORIS LoCon: `lora_unet_<X with _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_…` for the text encoder (SDXL: `lora_te1_`,
  `lora_te2_`).
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional

from flax.traverse_util import flatten_dict

from sdjax.lora.targets import ADAPTED_COMPONENTS, module_name

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# Diffusers' file prefixes of the two components.
DIFFUSERS_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder."}

_KOHYA = re.compile(r"lora_(unet|te|te1|te2)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "sdxl", "te2": "sdxl"}
_KOHYA_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_ROLES = [
    (re.compile(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight"), {"A": "down", "B": "up"}),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight"), None),
    (re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"), None),
    (re.compile(r"(.+)\.(alpha)"), None),
]
_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                     "to_out": "out_proj"}}
# Signs of an SDXL LoRA: its second text encoder, its added-conditioning embedding, and the
# original (LDM) block names kohya uses for SDXL's UNet.
_SDXL_SIGNS = ("text_encoder_2.", "add_embedding", "label_emb", "input_blocks", "output_blocks",
               "middle_block")


class ParsedKey(NamedTuple):
    component: Optional[str]  # None: not said (old UNet-only files; try the UNet first)
    names: dict  # {component: module name} candidates, dotted or (kohya) underscored
    role: str  # down, up or alpha
    kohya: bool


def parse_key(key: str) -> Optional[ParsedKey]:
    """What a LoRA file's key names, or None for a key of no known layout. A ParsedKey with
    component "sdxl" comes from SDXL's second text encoder or first one named as SDXL names it."""
    m = _KOHYA.fullmatch(key)
    if m:
        component = _KOHYA_COMPONENT[m.group(1)]
        return ParsedKey(component, {component: m.group(2)}, _KOHYA_ROLE[m.group(3)], True)
    rest, component = key, None
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model."):]
    for c, prefix in DIFFUSERS_PREFIX.items():
        if rest.startswith(prefix):
            rest, component = rest[len(prefix):], c
            break
    else:
        if rest.startswith("text_encoder_2."):
            component = "sdxl"
    for pattern, roles in _ROLES:
        m = pattern.fullmatch(rest)
        if not m:
            continue
        if len(m.groups()) == 3:  # attention-processor style: the projection is in the role
            base, proj, role = m.groups()
            names = {c: f"{base}.{_PROCESSOR_NAMES[c][proj]}" for c in ADAPTED_COMPONENTS}
        else:
            base, role = m.groups()
            role = roles[role] if roles else role
            if base.endswith(".processor"):
                base = base[: -len(".processor")]
            names = {c: base for c in ADAPTED_COMPONENTS}
        if component is not None:
            names = {component: names.get(component, base)}
        return ParsedKey(component, names, role, False)
    return None


def looks_sdxl(key: str) -> bool:
    parsed = parse_key(key)
    if parsed is not None and parsed.component == "sdxl":
        return True
    return any(sign in key for sign in _SDXL_SIGNS)


def layer_table(shapes: Mapping, component: str) -> dict:
    """{name a file may use: (layer path, kernel shape)} of every linear/conv layer of one
    component, under its dotted module name and its kohya name (both with and without the
    text encoder's `text_model.` prefix)."""
    table = {}
    for path, leaf in flatten_dict(shapes).items():
        if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
            continue
        name = module_name(path[:-1], component)
        entry = (tuple(path[:-1]), tuple(leaf.shape))
        names = [name]
        if component == "text_encoder":
            names.append(name[len("text_model."):] if name.startswith("text_model.")
                         else "text_model." + name)
        for n in names:
            table[n] = entry
            table[n.replace(".", "_")] = entry
    return table


def kohya_name(path, component: str) -> str:
    """`lora_unet_down_blocks_0_…_to_q`, `lora_te_text_model_encoder_layers_0_…_q_proj`."""
    name = module_name(path, component)
    if component == "text_encoder" and not name.startswith("text_model."):
        name = "text_model." + name
    return KOHYA_PREFIX[component] + name.replace(".", "_")


def diffusers_name(path, component: str) -> str:
    """`unet.down_blocks.0.….to_q`, `text_encoder.text_model.encoder.layers.0.….q_proj`: the
    text encoder keeps `text_model.`, which diffusers removes when the installed transformers'
    CLIPTextModel has no such module (>= 5.6) and which older versions and ComfyUI need."""
    name = module_name(path, component)
    if component == "text_encoder" and not name.startswith("text_model."):
        name = "text_model." + name
    return DIFFUSERS_PREFIX[component] + name
