"""Trained weights out of a checkpoint: `train_flax.py export` writes them as a diffusers pipeline;
`generate` and `compare` sample with them."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.errors import ConfigError
from sdjax.parallel import sync_hosts
from sdjax.train import checkpoint as ckpt


def checkpoint_meta(checkpoint: str) -> dict:
    """The run metadata recorded with a checkpoint (config, base model, step)."""
    manager, _, meta = ckpt.read_meta(checkpoint)
    manager.close()
    return meta


def read_unet(checkpoint: str, like, ema: Optional[bool] = None) -> tuple:
    """-> (UNet params as host arrays, step, run metadata, whether they are the EMA weights).

    Only that one tree is read (not the optimizer state or the other weights); `like` is a UNet
    parameter tree of the model it is for (arrays or shapes). `ema=None` takes the EMA weights
    when the run kept them."""
    manager, step, meta = ckpt.read_meta(checkpoint)
    try:
        has_ema = bool(meta["config"].get("use_ema"))
        if ema and not has_ema:
            raise ConfigError(f"{checkpoint} has no EMA weights (the run did not use --use_ema); "
                              "drop --ema")
        use_ema = has_ema if ema is None else ema
        name = "ema" if use_ema else "params"
        target = {name: jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), like)}
        to_host = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=to_host, partial_restore=True)))["state"][name]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"the UNet in {checkpoint} does not fit the model it is loaded "
                              f"for: {str(e).splitlines()[0][:200]}") from None
    finally:
        manager.close()
    want = jax.tree_util.tree_map(lambda x: tuple(x.shape), like)
    if jax.tree_util.tree_map(lambda x: tuple(x.shape), restored) != want:
        raise ConfigError(f"the UNet in {checkpoint} does not fit the model it is loaded for "
                          "(different architecture)")
    return restored, step, meta, use_ema


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
    sd = base_model(checkpoint_meta(checkpoint))
    unet, step, _, use_ema = read_unet(checkpoint, sd.params["unet"], ema)
    import jax.numpy as jnp

    if jax.process_index() == 0:  # on a pod, one host writes
        sd.save_pretrained(output, params={"unet": unet},
                           dtype=None if dtype == "float32" else jnp.dtype(dtype))
        print(f"exported step {step} ({'EMA' if use_ema else 'raw'} weights, {dtype}) to {output}")
    sync_hosts("sdjax-export-written")
    return output
