"""Trained weights out of a checkpoint: `train_flax.py export` writes them as a diffusers pipeline;
`generate` and `compare` sample with them."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.errors import ConfigError
from sdjax.train import checkpoint as ckpt


def read_unet(checkpoint: str, ema: Optional[bool] = None) -> tuple:
    """-> (UNet params as host arrays, step, run metadata, whether they are the EMA weights).
    `ema=None` takes the EMA weights when the run kept them."""
    manager, step, meta = ckpt.read_meta(checkpoint)
    has_ema = bool(meta["config"].get("use_ema"))
    if ema and not has_ema:
        manager.close()
        raise ConfigError(f"{checkpoint} has no EMA weights (the run did not use --use_ema); "
                          "drop --ema")
    use_ema = has_ema if ema is None else ema
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    unet = jax.tree_util.tree_map(np.asarray, raw["ema"] if use_ema else raw["params"])
    return unet, step, meta, use_ema


def base_model(meta: dict, dtype=None):
    """The run's base pipeline (VAE, text encoder, tokenizer, scheduler) from its metadata."""
    from sdjax.train.loop import load_base_model

    base = meta["base_model"]
    sd = load_base_model(base["pretrained_model_name_or_path"], base["seed"], base.get("revision"),
                         base.get("variant"), dtype=dtype)
    apply_prediction_type(sd, meta["config"].get("prediction_type"))
    return sd


def apply_prediction_type(sd, prediction_type: Optional[str]) -> None:
    """A run trained with --prediction_type samples, and exports its scheduler config, with it."""
    if prediction_type:
        sd.scheduler_config["prediction_type"] = prediction_type


def export_checkpoint(checkpoint: str, output: str, ema: Optional[bool] = None,
                      dtype: str = "float32") -> str:
    unet, step, meta, use_ema = read_unet(checkpoint, ema)
    import jax.numpy as jnp

    base_model(meta).save_pretrained(output, params={"unet": unet},
                                     dtype=None if dtype == "float32" else jnp.dtype(dtype))
    print(f"exported step {step} ({'EMA' if use_ema else 'raw'} weights, {dtype}) to {output}")
    return output
