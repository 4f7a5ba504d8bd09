"""Key names of single-file Stable Diffusion checkpoints (the original LDM layout that
CompVis/Stability released and A1111, ComfyUI and civitai use) <-> current diffusers names.

One function, `ldm_key`, maps a diffusers/transformers key of a component to the key of the
single file holding it, driven by that component's config (layers per block, which blocks have
attention, how many VAE levels). Reading and writing both use it, so they cannot disagree.

    UNet  (model.diffusion_model.)  input_blocks.{1 + i*(L+1) + j}.0 <- down_blocks.i.resnets.j,
          .1 <- down_blocks.i.attentions.j, input_blocks.{(i+1)*(L+1)}.0.op <- downsampler i;
          middle_block.{0,1,2} <- mid_block.resnets.0 / attentions.0 / resnets.1;
          output_blocks.{i*(L+1) + j}.0/.1 <- up_blocks.i.resnets.j / attentions.j (L+1 each),
          the upsampler at .1.conv (no attention) or .2.conv of the block's last one;
          time_embed.{0,2}, input_blocks.0.0 (conv_in), out.{0,2} (norm and conv_out).
    VAE   (first_stage_model.)      encoder.down.i.block.j, decoder.up.{n-1-i}.block.j (reversed),
          mid.block_{1,2}, mid.attn_1.{norm,q,k,v,proj_out} (1x1 convs), nin_shortcut, norm_out.
    CLIP  (cond_stage_model.transformer.text_model.) the transformers names, for SD 1.x.
    OpenCLIP (cond_stage_model.model.) for SD 2.x: token_embedding, positional_embedding,
          transformer.resblocks.N.{ln_1, attn.in_proj (q, k, v fused), attn.out_proj, ln_2,
          mlp.c_fc, mlp.c_proj}, ln_final.

`part` is the third of a fused OpenCLIP `in_proj` tensor a q/k/v key is (0, 1, 2), else None.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

from sdjax.errors import WeightsError

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "clip": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
# Text encoder layout per model family.
TEXT_LAYOUT = {"sd1": "clip", "sd2": "openclip"}

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight",
                   "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _resnet(rest: str, names: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def _unet(key: str, config: Mapping) -> Optional[str]:
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    per = int(config.get("layers_per_block", 2)) + 1  # LDM blocks per diffusers block (+ sampler)
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + i * per + j}.0.{_resnet(rest, _UNET_RESNET)}"
        return f"input_blocks.{1 + i * per + j}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET)}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{i * per + j}.0.{_resnet(rest, _UNET_RESNET)}"
        return f"output_blocks.{i * per + j}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        i = int(m[1])
        attention = config.get("up_block_types", [])[i] == "CrossAttnUpBlock2D"
        return f"output_blocks.{i * per + per - 1}.{2 if attention else 1}.conv.{m[2]}"
    return None


def _vae(key: str, config: Mapping) -> Optional[str]:
    levels = len(config.get("up_block_types") or config.get("block_out_channels"))
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key)
    if m and m[2] in _VAE_ATTENTION:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        level = levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    return None


def _openclip(key: str) -> Tuple[Optional[str], Optional[int]]:
    if key in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[key], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", key)
    if m:
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", _QKV[m[2]]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m[2] in _OPENCLIP_LAYER:
        return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", None
    return None, None


def ldm_key(component: str, key: str, config: Mapping, family: str) -> Tuple[str, Optional[int]]:
    """(single-file key, part) of the diffusers/transformers `key` of `component` ('unet', 'vae',
    'text_encoder'; text encoder keys without the `text_model.` prefix)."""
    part = None
    if component == "unet":
        name = _unet(key, config)
        prefix = PREFIXES["unet"]
    elif component == "vae":
        name = _vae(key, config)
        prefix = PREFIXES["vae"]
    elif TEXT_LAYOUT[family] == "clip":
        name, prefix = f"text_model.{key}", PREFIXES["clip"]
    else:
        (name, part), prefix = _openclip(key), PREFIXES["openclip"]
    if name is None:
        raise WeightsError(f"no single-file name for the {component} parameter {key} "
                           "(a model sdjax cannot write in the original LDM layout)")
    return prefix + name, part


def is_vae_attention_projection(ldm: str) -> bool:
    """VAE mid-block q/k/v/proj_out weights are 1x1 convolutions in the LDM layout."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) is not None
