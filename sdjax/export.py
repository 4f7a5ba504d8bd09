"""`train_flax.py export`: a checkpoint of a run written as a diffusers pipeline, or as one
single-file checkpoint in the original LDM layout (`--format single_file`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sdjax.checkpoints import trained_pipeline
from sdjax.parallel import sync_hosts
from sdjax.weights.single_file_save import output_format


def export_checkpoint(checkpoint: str, output: str, ema: Optional[bool] = None,
                      dtype: str = "float32", format: Optional[str] = None) -> str:
    """Writes the run's base pipeline with every component the checkpoint trained replaced:
    a diffusers folder, or (`format="single_file"`, the default for a `.safetensors` output)
    one single file."""
    format = output_format(output, format)
    sd, step, meta, use_ema = trained_pipeline(checkpoint, ema)
    if jax.process_index() == 0:  # on a pod, one host writes
        save = sd.save_single_file if format == "single_file" else sd.save_pretrained
        save(output, dtype=None if dtype == "float32" else jnp.dtype(dtype))
        from sdjax.checkpoints import layout_of

        trained = " and ".join(layout_of(meta)["trained"])
        print(f"exported step {step} ({trained}, {'EMA' if use_ema else 'raw'} weights, {dtype}) "
              f"to {output}")
    sync_hosts("sdjax-export-written")
    return output
