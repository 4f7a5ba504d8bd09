"""`train_flax.py export`: a checkpoint of a run written as a diffusers pipeline."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sdjax.checkpoints import trained_pipeline
from sdjax.parallel import sync_hosts


def export_checkpoint(checkpoint: str, output: str, ema: Optional[bool] = None,
                      dtype: str = "float32") -> str:
    """Writes the run's base pipeline with every component the checkpoint trained replaced."""
    sd, step, meta, use_ema = trained_pipeline(checkpoint, ema)
    if jax.process_index() == 0:  # on a pod, one host writes
        sd.save_pretrained(output, dtype=None if dtype == "float32" else jnp.dtype(dtype))
        from sdjax.checkpoints import layout_of

        trained = " and ".join(layout_of(meta)["trained"])
        print(f"exported step {step} ({trained}, {'EMA' if use_ema else 'raw'} weights, {dtype}) "
              f"to {output}")
    sync_hosts("sdjax-export-written")
    return output
