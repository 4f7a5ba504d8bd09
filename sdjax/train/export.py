"""`train_flax.py export`: any checkpoint -> a diffusers pipeline folder."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.errors import ConfigError
from sdjax.train import checkpoint as ckpt


def export_checkpoint(checkpoint: str, output: str, ema: Optional[bool] = None,
                      dtype: str = "float32") -> str:
    from sdjax.train.loop import load_base_model

    manager, step, meta = ckpt.read_meta(checkpoint)
    base = meta["base_model"]
    has_ema = bool(meta["config"].get("use_ema"))
    if ema and not has_ema:
        raise ConfigError(f"{checkpoint} has no EMA weights (the run did not use --use_ema); "
                          "drop --ema")
    use_ema = has_ema if ema is None else ema
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    unet = jax.tree_util.tree_map(np.asarray, raw["ema"] if use_ema else raw["params"])
    sd = load_base_model(base["pretrained_model_name_or_path"], base["seed"], base.get("revision"),
                         base.get("variant"))
    import jax.numpy as jnp

    sd.save_pretrained(output, params={"unet": unet},
                       dtype=None if dtype == "float32" else jnp.dtype(dtype))
    print(f"exported step {step} ({'EMA' if use_ema else 'raw'} weights, {dtype}) to {output}")
    return output
