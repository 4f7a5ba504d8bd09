"""Starting a run: validation of the config, multi-host start-up, the base model, output_dir."""

from __future__ import annotations

import os
from typing import Optional

import jax

from sdjax import storage
from sdjax.config import TrainConfig
from sdjax.errors import ConfigError
from sdjax.parallel import initialize_distributed, sync_hosts


def enable_compilation_cache() -> None:
    """JAX's persistent cache for programs that took a second or more to compile (JAX's own
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, where set, wins)."""
    path = os.environ.get("SDJAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def start_run(cfg: TrainConfig, notes: Optional[list]) -> bool:
    """Validates and starts multi-host JAX; -> whether this is process 0. Nothing is written yet:
    output_dir is made once the model and data have loaded (see `prepare_output_dir`)."""
    cfg.validate()
    if not cfg.topology:
        # A program compiled for a TPU slice you are not on cannot be loaded back from the
        # cache (JAX warns and compiles again): caching it only costs disk.
        enable_compilation_cache()
    initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                           cfg.distributed_timeout)
    is_main = jax.process_index() == 0
    notes = list(notes or [])
    notes += [f"{flag}: ignored without --with_prior_preservation"
              for flag in cfg.ignored_dreambooth_flags]
    if cfg.train_text_encoder and cfg.cache_latents:
        notes.append("--train_text_encoder: the latent cache supplies the latents only; the "
                     "captions go through the text encoder being trained at every step")
    for note in notes:
        if is_main:
            print(f"note: {note}")
    return is_main


def run_mesh(cfg: TrainConfig):
    """The run's ("data", "fsdp") mesh: --fsdp devices per group, or each host's devices when
    --sharding splits the state without a size."""
    from sdjax.parallel import make_mesh

    strategy = cfg.sharding_strategy
    fsdp = cfg.fsdp or (jax.local_device_count() if strategy != "replicated" else 1)
    return make_mesh(fsdp)


def base_model_spec(cfg: TrainConfig) -> dict:
    """Where the frozen base came from, recorded in every checkpoint (`sdjax.pipeline.load_base`
    loads it back for export, generate and compare)."""
    return {"pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
            "revision": cfg.revision, "variant": cfg.variant, "seed": cfg.run_seed,
            "vae": cfg.pretrained_vae_name_or_path, "tokenizer": cfg.tokenizer_name,
            "lora": list(cfg.lora or []), "original_config": cfg.original_config}


def load_base_model(cfg: TrainConfig):
    from sdjax.checkpoints import apply_prediction_type
    from sdjax.pipeline import load_base

    sd = load_base(base_model_spec(cfg))
    if sd.tokenizer is None:
        raise ConfigError(f"{cfg.pretrained_model_name_or_path} has no tokenizer/: add one, or "
                          "give --tokenizer_name")
    apply_prediction_type(sd, cfg.prediction_type)  # for validation and the exported scheduler
    if cfg.use_lora:  # bad --lora_layers or --rank for this model: refused before any writing
        from sdjax.lora.training import run_targets

        run_targets(cfg, sd.params)
    return sd


def prepare_output_dir(cfg: TrainConfig, is_main: bool) -> None:
    """Host 0 makes output_dir (a local folder or a bucket path); every host waits for it."""
    if cfg.output_dir and is_main:
        try:
            storage.makedirs(cfg.output_dir)
        except OSError as e:
            raise ConfigError(f"cannot create --output_dir {cfg.output_dir}: "
                              f"{e.strerror or e}") from None
        if not storage.is_remote(cfg.output_dir) and not os.access(cfg.output_dir, os.W_OK):
            raise ConfigError(f"--output_dir {cfg.output_dir} is not writable")
    sync_hosts("sdjax-output-dir")
