"""diffusers' --pre_compute_text_embeddings: each distinct caption goes through the frozen text
encoder once before training; batches then carry the embeddings and the text encoder is not on
the devices while the UNet trains (DreamBooth has two prompts; a captioned data set has one
per distinct caption, so past a limit --cache_latents is the tool)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.data.loader import tokenize
from sdjax.errors import ConfigError
from sdjax.parallel import batch_sharded, replicate, replicated, shard_batch

MAX_CAPTIONS = 20000


def distinct_captions(captions, with_empty: bool) -> list:
    """Every caption a sample can be given (one of several, or the empty one under dropout)."""
    found = dict.fromkeys([""] if with_empty else [])
    for caption in captions:
        for text in ([caption] if isinstance(caption, str) else caption):
            if isinstance(text, str):
                found.setdefault(text)
    return list(found)


class PromptEmbeddings:
    """The text encoder's output for a fixed set of captions, on the host, in the run's compute
    dtype."""

    def __init__(self, table: dict):
        self.table = table

    @classmethod
    def compute(cls, sd, captions, mesh, dtype_name: str, with_empty: bool = False,
                rows_per_device: int = 8) -> "PromptEmbeddings":
        texts = distinct_captions(captions, with_empty)
        if len(texts) > MAX_CAPTIONS:
            raise ConfigError(f"--pre_compute_text_embeddings: {len(texts)} distinct captions "
                              f"(more than {MAX_CAPTIONS}); use --cache_latents, which caches "
                              "them on disk")
        from sdjax.models.build import build_models

        dtype = jnp.dtype(dtype_name)
        encoder = build_models(sd.configs, dtype)["text_encoder"]
        params = replicate(jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                                  sd.params["text_encoder"]), mesh)
        # Kept in the compute dtype: the batch then has the dtype the step was compiled for (a
        # float32 table made the step compile a second time at step 1 under bf16).
        encode = jax.jit(lambda p, ids: encoder.apply({"params": p}, ids).astype(dtype),
                         in_shardings=(replicated(mesh), batch_sharded(mesh)),
                         out_shardings=replicated(mesh))
        ids = tokenize(sd.tokenizer, texts)
        chunk = rows_per_device * mesh.devices.size
        table = {}
        for start in range(0, len(texts), chunk):
            part = ids[start:start + chunk]
            padded = math.ceil(len(part) / mesh.devices.size) * mesh.devices.size
            part = part[np.minimum(np.arange(padded), len(part) - 1)]
            out = np.asarray(encode(params, shard_batch(part, mesh)).addressable_data(0))
            table.update(zip(texts[start:start + chunk], out))
        del params, encode  # nothing of the encoder stays on the devices
        return cls(table)

    def embeddings(self, captions: list) -> np.ndarray:
        return np.stack([self.table[c] for c in captions])
