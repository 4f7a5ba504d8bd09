"""diffusers configs from an original LDM config yaml (`v1-inference.yaml`, `v2-inference-v.yaml`
and the like: what diffusers' `from_single_file(original_config=...)` reads).

    model.params.parameterization        "v" -> v_prediction, else epsilon
    model.params.{linear_start, linear_end, timesteps, scale_factor, image_size}
    model.params.unet_config.params      in/out_channels, model_channels, channel_mult,
                                         num_res_blocks, attention_resolutions, num_heads or
                                         num_head_channels, use_linear_in_transformer, context_dim
    model.params.first_stage_config.params.ddconfig   ch, ch_mult, num_res_blocks, z_channels

The yaml does not describe the text encoder beyond its kind: its config is the family's
(CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x) with the sizes read from the weights
and 64-wide attention heads, as both use. Architectures the LDM yaml cannot express (group
norms other than 32, other time embeddings) are described with a diffusers folder instead.
"""

from __future__ import annotations

from typing import Mapping

from sdjax.errors import WeightsError


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise WeightsError(f"cannot read --original_config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        first = (str(e).strip().splitlines() or ["invalid"])[0]
        raise WeightsError(f"--original_config {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise WeightsError(f"--original_config {path} is not an LDM config (no `model:` section); "
                           "give the model's original yaml or a diffusers folder")
    return data


def _get(tree: Mapping, dotted: str, where: str, default=KeyError):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is KeyError:
                raise WeightsError(f"--original_config {where} has no {dotted}") from None
            return default
        node = node[part]
    return node


def unet_config(original: Mapping, where: str) -> dict:
    params = _get(original, "model.params.unet_config.params", where)
    if int(params.get("transformer_depth", 1) or 1) != 1:
        raise WeightsError(f"--original_config {where}: transformer_depth "
                           f"{params['transformer_depth']} (sdjax supports 1, as SD 1.x/2.x use)")
    if params.get("num_classes") is not None:
        raise WeightsError(f"--original_config {where}: class-conditioned UNets (num_classes) "
                           "are not supported")
    channels = int(params["model_channels"])
    mult = [int(m) for m in params["channel_mult"]]
    blocks = [channels * m for m in mult]
    attention = {int(r) for r in params.get("attention_resolutions", [])}
    resolutions = [2 ** i for i in range(len(mult))]
    down = ["CrossAttnDownBlock2D" if r in attention else "DownBlock2D" for r in resolutions]
    up = ["CrossAttnUpBlock2D" if r in attention else "UpBlock2D" for r in reversed(resolutions)]
    heads = params.get("num_heads", -1)
    if heads in (None, -1):
        width = int(params["num_head_channels"])
        heads = [c // width for c in blocks]
    context = params.get("context_dim")
    context = context[0] if isinstance(context, (list, tuple)) else context
    image_size = _get(original, "model.params.image_size", where, None)
    config = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": int(params.get("in_channels", 4)),
        "out_channels": int(params.get("out_channels", 4)),
        "block_out_channels": blocks, "down_block_types": down, "up_block_types": up,
        "layers_per_block": int(params["num_res_blocks"]),
        "cross_attention_dim": int(context),
        "attention_head_dim": heads,
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        # SD 2.x (1024-wide context) is run with attention upcast to float32, as in diffusers.
        "upcast_attention": int(context) == 1024,
    }
    if image_size is not None:
        config["sample_size"] = int(image_size)
    return config


def vae_config(original: Mapping, where: str) -> dict:
    dd = _get(original, "model.params.first_stage_config.params.ddconfig", where)
    blocks = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": int(dd.get("in_channels", 3)), "out_channels": int(dd.get("out_ch", 3)),
        "block_out_channels": blocks, "latent_channels": int(dd.get("z_channels", 4)),
        "layers_per_block": int(dd["num_res_blocks"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "scaling_factor": float(_get(original, "model.params.scale_factor", where, 0.18215)),
    }
    image_size = _get(original, "model.params.image_size", where, None)
    if image_size is not None:
        config["sample_size"] = int(image_size) * 2 ** (len(blocks) - 1)
    return config


def scheduler_config(original: Mapping, base: Mapping, where: str) -> dict:
    """The family's scheduler config with the yaml's schedule and parameterization."""
    config = dict(base)
    params = _get(original, "model.params", where)
    for ldm, name in (("linear_start", "beta_start"), ("linear_end", "beta_end"),
                      ("timesteps", "num_train_timesteps")):
        if params.get(ldm) is not None:
            config[name] = params[ldm]
    config["prediction_type"] = ("v_prediction" if params.get("parameterization") == "v"
                                 else "epsilon")
    return config


def text_encoder_config(base: Mapping, sizes: Mapping) -> dict:
    """The family's text encoder config with the sizes found in the weights (`hidden_size`,
    `intermediate_size`, `num_hidden_layers`, `vocab_size`, `max_position_embeddings`)."""
    config = dict(base)
    config.update(sizes)
    config["num_attention_heads"] = max(1, int(sizes["hidden_size"]) // 64)
    return config
