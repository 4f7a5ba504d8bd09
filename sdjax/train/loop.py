"""The training run, top to bottom: start-up -> inputs -> trainer -> resume -> steps -> export.

    python train_flax.py [text_to_image|dreambooth] <diffusers flags>
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import jax
from tqdm.contrib.logging import logging_redirect_tqdm

from sdjax import __version__
from sdjax.config import TrainConfig, config_to_dict
from sdjax.errors import ConfigError
from sdjax.parallel import host_copy, make_mesh, sync_hosts
from sdjax.train.run_checkpoints import RunCheckpoints
from sdjax.train.inputs import open_inputs
from sdjax.train.metrics import MetricsWriter
from sdjax.train.preemption import Preemption
from sdjax.train.setup import base_model_spec, run_mesh, start_run
from sdjax.train.step_loop import StepLoop
from sdjax.train.trainer import build_trainer

log = logging.getLogger("sdjax")


def train(cfg: TrainConfig, notes: Optional[list] = None) -> str:
    if cfg.compile_only:  # will it fit? (no weights, no data, no training)
        from sdjax.train.fit import compile_check

        start_run(cfg, notes)
        compile_check(cfg)
        return cfg.output_dir
    is_main = start_run(cfg, notes)
    checkpoints = RunCheckpoints(cfg.output_dir, cfg.checkpoints_total_limit, is_main)
    if cfg.resume_from_checkpoint:  # a checkpoint that is not there: refused before any writing
        checkpoints.check_ref(cfg.resume_from_checkpoint)
    if cfg.use_lora:  # another tool's LoRA files where this run writes its own: refused now
        from sdjax.lora.training import check_lora_output_dir

        check_lora_output_dir(cfg.output_dir, cfg.save_lora_format or "diffusers")
    mesh = run_mesh(cfg)
    inputs = open_inputs(cfg, is_main, mesh, use_cache=cfg.cache_latents)
    loader = inputs.loader
    max_steps = _total_steps(cfg, loader)
    cfg, mesh, layout_note, precompiled = _choose_layout(cfg, inputs.sd, loader, mesh, max_steps)
    trainer = build_trainer(cfg, inputs.sd, loader, mesh, max_steps)
    trainer.precompiled = precompiled

    lora_output = _lora_output(cfg, inputs.sd, trainer, is_main)
    if lora_output is not None:  # a branch's LoRA folders move aside with its checkpoints
        checkpoints.companions = lora_output.own_folders
    state, start_step = _resume(cfg, trainer, checkpoints, loader, is_main)
    if is_main:
        _print_summary(cfg, inputs, trainer, start_step, max_steps, layout_note)

    writer = MetricsWriter(cfg, is_main)
    preemption = Preemption()
    validation = None
    if cfg.all_validation_prompts:
        from sdjax.train.validation import Validation

        validation = Validation(cfg, inputs.sd, trainer.models, mesh, writer, is_main,
                                loader.steps_per_epoch)
    loop = StepLoop(trainer, loader, mesh, checkpoints, _run_record(cfg, loader, trainer), writer,
                    preemption, validation, cfg.logging_steps, cfg.checkpointing_steps,
                    _images_per_step(cfg), is_main, lora_output)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            state = loop.run(state, start_step, max_steps)
        checkpoints.wait()
    finally:
        try:
            checkpoints.drain()
        finally:
            writer.close()
            preemption.close()
            checkpoints.close()
    if state is not None and lora_output is not None:  # diffusers' LoRA scripts: the LoRA only
        for path in lora_output.write(state):
            print(f"saved the {'EMA ' if cfg.use_ema else ''}LoRA weights to {path}")
    elif state is not None:  # None: preempted, checkpoint written, no export
        _export(cfg, inputs.sd, state, is_main)
    sync_hosts("sdjax-run-finished")  # no host exits before the export is complete
    return cfg.output_dir


def build_cache(cfg: TrainConfig, notes: Optional[list] = None) -> str:
    """The `cache` command: encode the data set into the latent cache, and stop."""
    cfg.cache_latents = True  # validated as a run that trains from the cache
    is_main = start_run(cfg, notes)
    from sdjax.cache import cache_directory

    if cfg.streaming:
        raise ConfigError("the latent cache needs random access to the data set: drop --streaming")
    if cfg.task != "text_to_image":
        raise ConfigError(f"the latent cache is for text_to_image runs, not {cfg.task}")
    open_inputs(cfg, is_main, make_mesh(), use_cache=True)
    return cache_directory(cfg)


def _total_steps(cfg: TrainConfig, loader) -> int:
    if loader.batches_per_epoch == 0:
        rows = cfg.train_batch_size * jax.device_count() * cfg.gradient_accumulation_steps
        raise ConfigError(f"no bucket holds a full step's batch of {rows} images; lower "
                          "--train_batch_size or --gradient_accumulation_steps, or widen "
                          "--bucket_reso_steps")
    return cfg.max_train_steps or math.ceil(cfg.num_train_epochs * loader.steps_per_epoch)


def _choose_layout(cfg: TrainConfig, sd, loader, mesh, max_steps: int) -> tuple:
    """Without --fsdp/--sharding: the layout whose compiled step fits the devices (see
    sdjax.train.fit.choose_run_layout). -> (cfg, mesh, note for the summary, compiled steps)."""
    from sdjax.train.fit import StepFacts, choose_run_layout

    facts = StepFacts(max_steps, loader.cache is not None, loader.supplies_text_embeddings)
    run, chosen_mesh, note, compiled = choose_run_layout(cfg, sd, facts)
    return run, chosen_mesh or mesh, note, compiled


def _images_per_step(cfg: TrainConfig) -> int:
    rows = cfg.train_batch_size * jax.device_count() * cfg.gradient_accumulation_steps
    return rows * (2 if cfg.prior_preservation else 1)


def _lora_output(cfg: TrainConfig, sd, trainer, is_main: bool):
    if trainer.lora is None:
        return None
    from sdjax.lora.files import model_architecture
    from sdjax.lora.training import LoraOutput

    # sd.scheduler_config carries --prediction_type (load_base_model)
    metadata = {"base_model": cfg.pretrained_model_name_or_path,
                "architecture": model_architecture(sd.configs, sd.scheduler_config)}
    return LoraOutput(cfg, trainer.layout, metadata, is_main)


def _run_record(cfg: TrainConfig, loader, trainer) -> dict:
    """What every checkpoint records besides the state (see sdjax.checkpoints)."""
    return {"sdjax_version": __version__, "config": config_to_dict(cfg),
            "base_model": base_model_spec(cfg), "state_layout": trainer.layout,
            "global_batch": loader.global_batch, "accumulation": loader.k, "seed": cfg.run_seed}


def _resume(cfg: TrainConfig, trainer, checkpoints, loader, is_main: bool) -> tuple:
    if not cfg.resume_from_checkpoint:
        return trainer.state, 0
    resumed = checkpoints.resume(cfg.resume_from_checkpoint, trainer.abstract_state(),
                                 trainer.layout)
    if resumed is None:
        if is_main:
            print(f"no checkpoint in {checkpoints.directory} yet; starting a new run")
        return trainer.state, 0
    state, meta, step = resumed
    trainer.state = None  # the restored state replaces the initial one: free its buffers
    before = (meta.get("global_batch"), meta.get("accumulation"), meta.get("seed"))
    now = (loader.global_batch, loader.k, cfg.run_seed)
    if before != now and is_main:
        print(f"warning: the checkpoint was written with global batch {before[0]}, accumulation "
              f"{before[1]}, seed {before[2]}; this run uses {now[0]}, {now[1]}, {now[2]}, so it "
              "will not see the same samples an uninterrupted run would have")
    return state, step


def _print_summary(cfg: TrainConfig, inputs, trainer, start_step: int, max_steps: int,
                   layout_note: Optional[str] = None) -> None:
    devices, rows = jax.device_count(), cfg.train_batch_size * jax.device_count()
    k = cfg.gradient_accumulation_steps
    from sdjax.parallel import fsdp_size

    fsdp = fsdp_size(trainer._mesh)
    layout = (f"state {cfg.sharding_strategy} over fsdp groups of {fsdp}" if fsdp > 1
              else "state replicated")
    if layout_note:
        layout += f" ({layout_note})"
    print(f"sdjax {__version__}: {jax.process_count()} host(s), {devices} device(s) "
          f"({jax.devices()[0].platform}), {layout}; per-device batch {cfg.train_batch_size}, "
          f"global batch {rows}, accumulation {k}, effective batch {rows * k}")
    trained = " + ".join(cfg.trained_components)
    if trainer.lora is not None:
        from sdjax.lora.adapters import adapter_layers, count

        adapters = trainer.lora.adapters
        trained = (f"LoRA rank {cfg.lora_rank} (alpha {trainer.lora.layout['alpha']:g}) on "
                   + " + ".join(f"{c} ({len(adapter_layers(a))} layers)" for c, a in adapters.items())
                   + f", {count(adapters):,} parameters")
    print(f"{cfg.task}: training {trained}; data: {inputs.description}; training steps "
          f"{start_step} -> {max_steps}; compute {cfg.compute_dtype_name}, frozen weights "
          f"{cfg.frozen_dtype_name}, "
          f"{f'gradient checkpointing ({cfg.remat_policy}), ' if cfg.remat else ''}EMA "
          f"{'on' if cfg.use_ema else 'off'}, prediction {trainer.schedule.prediction_type}")


def _export(cfg: TrainConfig, sd, state, is_main: bool) -> None:
    from sdjax.train.state import trained_weights

    weights = host_copy(trained_weights(state, cfg.use_ema))
    if is_main:
        sd.save_pretrained(cfg.output_dir, params=weights)
        print(f"saved the {'EMA ' if cfg.use_ema else ''}weights ({' and '.join(weights)}) as a "
              f"diffusers pipeline in {cfg.output_dir}")
