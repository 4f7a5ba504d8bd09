"""Which layers get a LoRA adapter: named presets or diffusers module names.

A layer is named as diffusers names the PyTorch module (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`, `encoder.layers.3.self_attn.q_proj`); a target
name matches every layer whose name ends in it (`to_q`, `to_out.0`, `ff.net.2`, `conv1`).

Presets (`--lora_layers`):
- `attention` (the default, what diffusers' LoRA scripts train): the UNet's `to_q, to_k, to_v,
  to_out.0`; the text encoder's `q_proj, k_proj, v_proj, out_proj`.
- `transformer`: every linear layer of the UNet's transformer blocks (`proj_in`, `proj_out`,
  the feed-forward `ff.net.0.proj`, `ff.net.2`, and the attention), and the text encoder's
  attention and MLP (`mlp.fc1`, `mlp.fc2`): kohya's standard LoRA.
- `locon`: `transformer` plus the convolutions and time projections of the resnets,
  down- and upsamplers (LoCon; kohya's `conv_dim`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from flax.traverse_util import flatten_dict

from sdjax.errors import ConfigError
from sdjax.weights.convert import torch_key

ADAPTED_COMPONENTS = ("unet", "text_encoder")

_ATTENTION = {"unet": ("to_q", "to_k", "to_v", "to_out.0"),
              "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
_TRANSFORMER = {"unet": _ATTENTION["unet"] + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
                "text_encoder": _ATTENTION["text_encoder"] + ("mlp.fc1", "mlp.fc2")}
_RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
           "upsamplers.0.conv")
PRESETS = {
    "attention": _ATTENTION,
    "transformer": _TRANSFORMER,
    "locon": {"unet": _TRANSFORMER["unet"] + _RESNET,
              "text_encoder": _TRANSFORMER["text_encoder"]},
}
# Layers outside the down/mid/up blocks are never adapted (conv_in, conv_out, time embedding).
_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


def module_name(module_path: Sequence[str], component: str) -> str:
    """The diffusers/transformers name of the layer at `module_path` (without its leaf)."""
    return torch_key(tuple(module_path) + ("kernel",), component)[: -len(".weight")]


def layer_names(spec: str) -> dict:
    """`--lora_layers`: a preset name or comma-separated target names -> {component: names}."""
    spec = (spec or "attention").strip()
    if spec in PRESETS:
        return {c: tuple(names) for c, names in PRESETS[spec].items()}
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--lora_layers={spec!r} names no layer: give a preset "
                          f"({', '.join(PRESETS)}) or names such as to_q,to_k,to_v,to_out.0")
    return {c: names for c in ADAPTED_COMPONENTS}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(shapes: Mapping, component: str, names: Sequence[str]) -> tuple:
    """-> (paths of the layers to adapt, sorted; the target names that matched nothing).

    `shapes` is the component's parameter tree (arrays or ShapeDtypeStructs); only layers with a
    2-d (linear) or 4-d (convolution) kernel can be adapted."""
    paths, used = [], set()
    for path, leaf in flatten_dict(shapes).items():
        if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
            continue
        name = module_name(path[:-1], component)
        if component == "unet" and not name.startswith(_UNET_BLOCKS):
            continue
        hit = [t for t in names if _matches(name, t)]
        if hit:
            paths.append(path[:-1])
            used.update(hit)
    return sorted(paths), [t for t in names if t not in used]
