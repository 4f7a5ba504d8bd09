"""Flax modules built from the models' config dicts, and their parameter shapes.

`build_models` turns the raw diffusers configs of 'unet', 'vae' and 'text_encoder' into linen
modules (choosing each attention site's implementation); `param_shapes` gives a module's
parameter tree without allocating it.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.attention import (attention_plan_message, check_attention_implementation,
                                    local_platform)
from sdjax.models.clip import CLIPTextModel
from sdjax.models.clip import plan_attention as plan_clip_attention
from sdjax.models.config import clip_text_config, unet_config, vae_config
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.unet import plan_attention as plan_unet_attention
from sdjax.models.vae import AutoencoderKL
from sdjax.models.vae import plan_attention as plan_vae_attention


def _dummy_inputs(component: str, config) -> tuple:
    """Smallest inputs that trace each model (for eval_shape and init)."""
    if component == "unet":
        side = 2 ** (len(config.block_out_channels) - 1)
        return (jnp.zeros((1, config.in_channels, side, side)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, config.cross_attention_dim)))
    if component == "vae":
        side = 2 ** (len(config.block_out_channels) - 1)
        return (jnp.zeros((1, config.in_channels, side, side)),)
    return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)


def build_models(configs: Mapping[str, dict], dtype=None, attention_implementation="xla",
                 gradient_checkpointing: bool = False, remat_policy: str = "nothing_saveable", *,
                 platform: Optional[str] = None, image_size: Optional[int] = None):
    """Linen modules from the raw config dicts of 'unet', 'vae' and 'text_encoder'.

    A "cudnn", "flash" or "auto" attention request is resolved here, per attention site, so that
    a fused kernel only gets the shapes and dtypes it takes
    (`sdjax.models.attention.choose_attention_implementation`): the rest (for cuDNN anything
    float32, the VAE's 512-wide single head, UNet levels with head dims over 128; for the TPU
    flash kernel sequence lengths that are not multiples of 128, such as the 77 text tokens) runs
    XLA, and one line on the `sdjax` logger says which is which. "auto" is cudnn on a GPU, flash
    on a TPU and xla elsewhere, for `platform` (that of the devices compiled for, as
    `sdjax.models.attention.device_platform` names it: an ahead-of-time compile for a TPU
    topology on another machine passes "tpu"; default the local devices'). `image_size` (pixels;
    default the UNet's sample_size times the VAE's downsampling) is the size the message
    assumes; other sizes are checked when traced. "xla" and None (JAX picks) reach every module
    unchanged.
    """
    dtype = dtype or jnp.float32
    check_attention_implementation(attention_implementation)
    remat = dict(gradient_checkpointing=gradient_checkpointing, remat_policy=remat_policy)
    parsed = {"unet": unet_config(configs["unet"]), "vae": vae_config(configs["vae"]),
              "text_encoder": clip_text_config(configs["text_encoder"])}
    if attention_implementation in ("auto", "flash"):
        platform = platform or local_platform()
    vae_factor = 2 ** (len(parsed["vae"].block_out_channels) - 1)
    latent_size = image_size // vae_factor if image_size else configs["unet"].get("sample_size")
    latent_size = latent_size if isinstance(latent_size, int) else None
    text_len = parsed["text_encoder"].max_position_embeddings
    requested = attention_implementation
    implementations, choices = {}, []
    for component, (implementation, component_choices) in {
            "unet": plan_unet_attention(parsed["unet"], requested, dtype, platform, latent_size,
                                        text_len),
            "vae": plan_vae_attention(parsed["vae"], requested, dtype, platform, latent_size),
            "text_encoder": plan_clip_attention(parsed["text_encoder"], requested, dtype,
                                                platform)}.items():
        implementations[component] = implementation
        choices += component_choices
    message = attention_plan_message(requested, choices, platform)
    if message:
        # "auto" falls back by design; an explicit kernel that does not fit everywhere warns.
        fell_back = requested != "auto" and any(c.reason for c in choices)
        logging.getLogger("sdjax").log(logging.WARNING if fell_back else logging.INFO, message)
    return {
        "unet": UNet2DConditionModel(parsed["unet"], dtype=dtype,
                                     attention_implementation=implementations["unet"], **remat),
        "vae": AutoencoderKL(parsed["vae"], dtype=dtype,
                             attention_implementation=implementations["vae"]),
        "text_encoder": CLIPTextModel(parsed["text_encoder"], dtype=dtype,
                                      attention_implementation=implementations["text_encoder"],
                                      **remat),
    }


_PARAM_SHAPES: dict = {}


def param_shapes(module, component: str) -> dict:
    """The parameter tree of `module` as ShapeDtypeStructs, computed without allocating.
    Remembered per module (its repr names the class, config and every option): a run asks
    several times for the same models' shapes, and tracing `init` takes about half a second."""
    key = (component, repr(module))
    if key not in _PARAM_SHAPES:
        inputs = _dummy_inputs(component, module.config)
        _PARAM_SHAPES[key] = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return jax.tree_util.tree_map(lambda x: x, _PARAM_SHAPES[key])  # new containers, same leaves


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
