"""Model configurations read from (and written back to) diffusers/transformers `config.json` dicts.

Each model has a frozen dataclass holding the options our Flax module implements. Reading a
config dict sorts every key into one of four kinds:
- a field of the dataclass: used;
- bookkeeping that does not change the math (`_class_name`, `sample_size`, `dtype`, ...): ignored;
- an option we know but only support at one value (`class_embed_type: null`, ...): checked,
  and a different value raises ConfigError instead of being silently ignored;
- a key we have never seen: accepted only when it is null/false (how new libraries add
  switched-off options), otherwise it raises, since it may change the math. The CLIP text
  config is read leniently instead: transformers writes dozens of generic keys (generation
  defaults and the like) into it and CLIPTextModel has no math options beyond our fields.
The original dict is kept beside the dataclass so an export writes back what was read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sdjax.errors import ConfigError


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def parse_config(cls, config: Mapping[str, Any], *, ignored: frozenset, fixed: Mapping[str, Any],
                 what: str, strict: bool = True):
    """Builds dataclass `cls` from a config dict; see the module docstring for the rules."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in config.items():
        if key in fields:
            kwargs[key] = _as_tuple(value)
        elif key.startswith("_") or key in ignored:
            continue
        elif key in fixed:
            allowed = fixed[key]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if _as_tuple(value) not in allowed:
                problems.append(f"{key}={value!r} (supported: {' or '.join(repr(a) for a in allowed)})")
        elif strict and value not in (None, False):
            problems.append(f"{key}={value!r} (unknown option)")
    if problems:
        raise ConfigError(f"{what} config uses options sdjax does not implement: "
                          + "; ".join(problems) + ". Use a Stable Diffusion 1.x/2.x config.")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} config is invalid: {e}") from None


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The options of diffusers' UNet2DConditionModel that SD 1.x/2.x checkpoints use."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                             "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    transformer_layers_per_block: int = 1

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        bad = [t for t in self.down_block_types if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
        bad += [t for t in self.up_block_types if t not in ("CrossAttnUpBlock2D", "UpBlock2D")]
        if bad:
            raise ValueError(f"unsupported block types {bad}")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} (only 'silu')")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
        if self.downsample_padding != 1:
            raise ValueError("downsample_padding must be 1")
        if self.transformer_layers_per_block != 1:
            raise ValueError("transformer_layers_per_block must be 1 (SDXL is not supported yet)")

    def _per_block(self, value):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return (value,) * len(self.block_out_channels)

    @property
    def heads_per_block(self) -> tuple:
        # diffusers' SD configs call the number of heads `attention_head_dim` (a naming slip kept
        # for compatibility): the head count is num_attention_heads, else attention_head_dim.
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return self._per_block(heads)


UNET_IGNORED = frozenset({"sample_size", "dropout"})
UNET_FIXED = {
    "addition_embed_type": None, "addition_time_embed_dim": None, "addition_embed_type_num_heads": 64,
    "attention_type": "default", "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": (None, False), "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": (1, 1.0),
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The options of diffusers' AutoencoderKL that SD 1.x/2.x checkpoints use."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        if set(self.down_block_types) - {"DownEncoderBlock2D"} or set(self.up_block_types) - {"UpDecoderBlock2D"}:
            raise ValueError("only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} (only 'silu')")


VAE_IGNORED = frozenset({"sample_size", "force_upcast"})
VAE_FIXED = {"use_quant_conv": True, "use_post_quant_conv": True, "latents_mean": None,
             "latents_std": None, "shift_factor": (None, 0, 0.0)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The options of transformers' CLIPTextModel (CLIP ViT-L/14, OpenCLIP ViT-H/14 text towers)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act={self.hidden_act!r} (supported: 'quick_gelu', 'gelu')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")


CLIP_FIXED = {"model_type": ("clip_text_model", "clip")}


def unet_config(config: Mapping[str, Any]) -> UNetConfig:
    return parse_config(UNetConfig, config, ignored=UNET_IGNORED, fixed=UNET_FIXED, what="UNet")


def vae_config(config: Mapping[str, Any]) -> VAEConfig:
    return parse_config(VAEConfig, config, ignored=VAE_IGNORED, fixed=VAE_FIXED, what="VAE")


def clip_text_config(config: Mapping[str, Any]) -> CLIPTextConfig:
    archs = config.get("architectures") or ["CLIPTextModel"]
    if archs[0] != "CLIPTextModel":
        raise ConfigError(f"text encoder architecture {archs[0]!r} is not supported "
                          "(only CLIPTextModel, as in SD 1.x/2.x)")
    return parse_config(CLIPTextConfig, config, ignored=frozenset(), fixed=CLIP_FIXED,
                        what="Text encoder", strict=False)
