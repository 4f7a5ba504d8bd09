"""The training run: data -> jitted step -> checkpoints -> diffusers export."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tqdm.contrib.logging import logging_redirect_tqdm

from sdjax import __version__, storage
from sdjax.config import TrainConfig, config_to_dict
from sdjax.data import Loader, open_dataset
from sdjax.errors import ConfigError, SdjaxError
from sdjax.parallel import (batch_sharded, global_batch, initialize_distributed, make_mesh,
                            replicate, replicated, sync_hosts)
from sdjax.schedule import NoiseSchedule
from sdjax.train import checkpoint as ckpt
from sdjax.train.metrics import MetricsWriter
from sdjax.train.preemption import Preemption
from sdjax.train.optimizer import learning_rate_schedule, make_optimizer
from sdjax.train.step import LossConfig, init_state, make_loss_fn, make_train_step

log = logging.getLogger("sdjax")


class TrainingStopped(SdjaxError):
    """The run stopped on its own account (NaN loss); the message says where and what is kept."""


def enable_compilation_cache() -> None:
    path = os.environ.get("SDJAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_base_model(name: str, seed: int, revision=None, variant=None, dtype=None):
    """A diffusers folder or hub id, or a shipped config name (random weights from `seed`)."""
    from sdjax.pipeline import SHIPPED_CONFIGS, StableDiffusion

    if not os.path.exists(name) and os.path.isdir(os.path.join(SHIPPED_CONFIGS, name)):
        return StableDiffusion.from_config(name, seed=seed, dtype=dtype)
    return StableDiffusion.from_pretrained(name, revision=revision, variant=variant, dtype=dtype)


def host_copy(tree):
    """Host numpy copy of a replicated tree (works on multi-host arrays too)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def start_run(cfg: TrainConfig, notes: Optional[list]) -> bool:
    """Validates and starts multi-host JAX; -> whether this is process 0. Nothing is written yet:
    output_dir is made once the model and data have loaded (see `prepare_output_dir`)."""
    cfg.validate()
    enable_compilation_cache()
    initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                           cfg.distributed_timeout)
    is_main = jax.process_index() == 0
    for note in notes or []:
        if is_main:
            print(f"note: {note}")
    return is_main


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


def data_and_model(cfg: TrainConfig, is_main: bool, mesh, use_cache: bool) -> tuple:
    """(images, model, loader): the data set opened and checked, the base model loaded, and
    this host's loader (reading the latent cache, built first if need be, when asked to)."""
    seed = cfg.run_seed
    if cfg.streaming:
        return _stream_and_model(cfg)
    images = open_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.train_data_dir,
                          cfg.image_column, cfg.caption_column, cfg.max_train_samples,
                          cfg.cache_dir, seed, caption_extension=cfg.caption_extension,
                          allow_empty_captions=cfg.allow_empty_captions,
                          tfds_data_dir=cfg.tfds_data_dir)
    n_devices = jax.device_count()
    global_rows = cfg.train_batch_size * n_devices
    if len(images) < global_rows:
        raise ConfigError(f"the data set has {len(images)} images, fewer than one global batch "
                          f"({cfg.train_batch_size} per device x {n_devices} devices = {global_rows}): "
                          "lower --train_batch_size or add images")

    sd = load_base_model(cfg.pretrained_model_name_or_path, seed, cfg.revision, cfg.variant)
    if sd.tokenizer is None:
        raise ConfigError(f"{cfg.pretrained_model_name_or_path} has no tokenizer/")
    prepare_output_dir(cfg, is_main)
    buckets = _bucket_plan(cfg, images, is_main) if cfg.enable_bucket else None
    loader = Loader(images, sd.tokenizer, global_batch=global_rows,
                    accumulation_steps=cfg.gradient_accumulation_steps,
                    process_index=jax.process_index(), process_count=jax.process_count(), seed=seed,
                    resolution=cfg.resolution, center_crop=cfg.center_crop,
                    random_flip=cfg.random_flip, num_workers=cfg.dataloader_num_workers,
                    interpolation=cfg.image_interpolation_mode,
                    caption_dropout_probability=cfg.caption_dropout_probability,
                    max_bad_images=cfg.max_bad_images, buckets=buckets)
    if use_cache:
        from sdjax.cache import open_or_build

        loader.cache = open_or_build(cfg, sd, images, loader, buckets, mesh, is_main,
                                     rebuild=cfg.rebuild_cache)
    return images, sd, loader


def _stream_and_model(cfg: TrainConfig) -> tuple:
    from sdjax.data.stream import StreamLoader, open_stream

    stream, where = open_stream(cfg.dataset_name, cfg.dataset_config_name, cfg.train_data_dir,
                                cfg.image_column, cfg.caption_column, cfg.cache_dir)
    sd = load_base_model(cfg.pretrained_model_name_or_path, cfg.run_seed, cfg.revision, cfg.variant)
    if sd.tokenizer is None:
        raise ConfigError(f"{cfg.pretrained_model_name_or_path} has no tokenizer/")
    prepare_output_dir(cfg, jax.process_index() == 0)
    loader = StreamLoader(stream, where, cfg.image_column, cfg.caption_column, sd.tokenizer,
                          global_batch=cfg.train_batch_size * jax.device_count(),
                          accumulation_steps=cfg.gradient_accumulation_steps,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          seed=cfg.run_seed, resolution=cfg.resolution,
                          center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                          num_workers=cfg.dataloader_num_workers,
                          interpolation=cfg.image_interpolation_mode,
                          caption_dropout_probability=cfg.caption_dropout_probability,
                          max_bad_images=cfg.max_bad_images,
                          shuffle_buffer_size=cfg.shuffle_buffer_size)
    return None, sd, loader


def build_cache(cfg: TrainConfig, notes: Optional[list] = None) -> str:
    """The `cache` command: encode the data set into the latent cache, and stop."""
    cfg.cache_latents = True  # validated as a run that trains from the cache
    is_main = start_run(cfg, notes)
    from sdjax.cache import cache_directory

    if cfg.streaming:
        raise ConfigError("the latent cache needs random access to the data set: drop --streaming")
    data_and_model(cfg, is_main, make_mesh(), use_cache=True)
    return cache_directory(cfg)


def train(cfg: TrainConfig, notes: Optional[list] = None) -> str:
    is_main = start_run(cfg, notes)
    seed = cfg.run_seed
    mesh = make_mesh()
    images, sd, loader = data_and_model(cfg, is_main, mesh, use_cache=cfg.cache_latents)
    from sdjax.train.export import apply_prediction_type

    apply_prediction_type(sd, cfg.prediction_type)  # for validation and the exported scheduler
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    n_devices, n_hosts = jax.device_count(), jax.process_count()
    k = cfg.gradient_accumulation_steps
    global_rows = cfg.train_batch_size * n_devices
    if loader.batches_per_epoch == 0:
        raise ConfigError(f"no bucket holds a full step's batch of {global_rows * k} images; "
                          "lower --train_batch_size or --gradient_accumulation_steps, or widen "
                          "--bucket_reso_steps")
    max_steps = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * loader.steps_per_epoch)

    peak_lr = cfg.learning_rate * (k * cfg.train_batch_size * n_devices if cfg.scale_lr else 1)
    lr_schedule = learning_rate_schedule(cfg.lr_scheduler, peak_lr, cfg.lr_warmup_steps, max_steps)
    tx = make_optimizer(lr_schedule, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
                        eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay,
                        max_grad_norm=cfg.max_grad_norm)

    from sdjax.pipeline import build_models

    dtype = jnp.dtype(cfg.compute_dtype_name)
    models = build_models(sd.configs, dtype, cfg.attention_implementation,
                          cfg.gradient_checkpointing, cfg.remat_policy)
    loss_fn = make_loss_fn(models["unet"], models["vae"], models["text_encoder"], schedule,
                           LossConfig(cfg.noise_offset, cfg.input_perturbation, cfg.snr_gamma))
    base_step = make_train_step(loss_fn, tx, lr_schedule)
    base_key = jax.random.key(seed)

    repl = replicated(mesh)

    def frozen_on_devices():
        return replicate({c: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                                    sd.params[c])
                          for c in ("vae", "text_encoder")}, mesh)

    # From the cache, the step needs neither the VAE nor the text encoder on the devices.
    frozen = {} if loader.cache is not None else frozen_on_devices()
    state = jax.jit(lambda p: init_state(p, tx, cfg.use_ema), out_shardings=repl)(
        replicate(sd.params["unet"], mesh))

    checkpoints = ckpt.RunCheckpoints(cfg.output_dir, cfg.checkpoints_total_limit, is_main)
    start_step = 0
    if cfg.resume_from_checkpoint:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        resumed = checkpoints.resume(cfg.resume_from_checkpoint, abstract)
        if resumed is None:
            if is_main:
                print(f"no checkpoint in {checkpoints.directory} yet; starting a new run")
        else:
            state, meta, start_step = resumed
            _warn_on_changed_data(meta, global_rows, k, seed, is_main)

    step_fn = jax.jit(lambda s, f, b: base_step(s, f, b, base_key),
                      in_shardings=(repl, repl, batch_sharded(mesh, 1)), out_shardings=(repl, repl),
                      donate_argnums=(0,))
    meta_base = {"sdjax_version": __version__, "config": config_to_dict(cfg),
                 "base_model": {"pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
                                "revision": cfg.revision, "variant": cfg.variant, "seed": seed},
                 "global_batch": global_rows, "accumulation": k, "seed": seed}

    if is_main:
        print(f"sdjax {__version__}: {n_hosts} host(s), {n_devices} device(s) "
              f"({jax.devices()[0].platform}); per-device batch {cfg.train_batch_size}, "
              f"global batch {global_rows}, accumulation {k}, effective batch {global_rows * k}")
        what = (f"{len(images)} images from {images.where}, {loader.batches_per_epoch} global "
                 "batches per epoch" if images is not None else f"streaming {loader.where}")
        print(f"data: {what}; training steps {start_step} -> {max_steps}; "
              f"compute {dtype.name}, EMA {'on' if cfg.use_ema else 'off'}, "
              f"prediction {schedule.prediction_type}")

    writer = MetricsWriter(cfg, is_main)
    validation = None
    if cfg.all_validation_prompts:
        from sdjax.train.validation import Validation

        # From the cache the step has no VAE or text encoder on the devices; sampling needs both.
        validation = Validation(cfg, sd, models, frozen or frozen_on_devices(), mesh, writer,
                                is_main, loader.steps_per_epoch)
    preemption = Preemption()
    try:
        with logging_redirect_tqdm(loggers=[log]):
            state = _run_steps(cfg, state, frozen, step_fn, loader, mesh, checkpoints, meta_base,
                               writer, preemption, start_step, max_steps, global_rows * k, is_main,
                               validation)
        checkpoints.wait()
    finally:
        try:
            checkpoints.manager.wait_until_finished()
        finally:
            writer.close()
            preemption.close()
            checkpoints.close()
    if state is not None:  # None: preempted, checkpoint written, no export
        unet_params = host_copy(state.ema if cfg.use_ema else state.params)
        if is_main:
            sd.save_pretrained(cfg.output_dir, params={"unet": unet_params})
            print(f"saved the {'EMA ' if cfg.use_ema else ''}weights as a diffusers pipeline in "
                  f"{cfg.output_dir}")
    sync_hosts("sdjax-run-finished")  # no host exits before the export is complete
    return cfg.output_dir


def _bucket_plan(cfg: TrainConfig, images, is_main: bool):
    from sdjax.data.buckets import BucketPlan, image_sizes

    plan = BucketPlan.build(image_sizes(images), cfg.resolution, cfg.min_bucket_reso,
                            cfg.max_bucket_reso, cfg.bucket_reso_steps)
    if is_main:
        path = storage.join(cfg.output_dir, "buckets.jsonl")
        plan.write_log(path, [images.name(i) for i in range(len(images))])
        used = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(plan.used().items()))
        print(f"aspect-ratio buckets (width x height: images): {used}; each image's bucket is in {path}")
    return plan


def _warn_on_changed_data(meta, global_rows, k, seed, is_main):
    before = (meta.get("global_batch"), meta.get("accumulation"), meta.get("seed"))
    if before != (global_rows, k, seed) and is_main:
        print(f"warning: the checkpoint was written with global batch {before[0]}, accumulation "
              f"{before[1]}, seed {before[2]}; this run uses {global_rows}, {k}, {seed}, so it "
              "will not see the same samples an uninterrupted run would have")


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_params_finite = jax.jit(lambda state: _finite((state.params, state.ema)))


def _check_finite(values: dict, state, done: int, saving: bool, checkpoints) -> None:
    """A non-finite loss or gradient norm (and, before a save, non-finite weights: a finite
    loss does not prove the update was finite) stops the run before it is saved."""
    bad = [f"{name} is {values[name]}" for name in ("loss", "grad_norm")
           if name in values and not math.isfinite(values[name])]
    if not bad and saving and not bool(np.asarray(_params_finite(state).addressable_data(0))):
        bad = ["the updated weights are not finite"]
    if bad:
        raise TrainingStopped(f"{' and '.join(bad)} at step {done}; stopping without saving it. "
                              f"The last good checkpoint is {checkpoints.last_good()}")


def _run_steps(cfg, state, frozen, step_fn, loader, mesh, checkpoints, meta_base, writer,
               preemption, start_step, max_steps, images_per_step, is_main, validation=None):
    from tqdm.auto import tqdm

    if start_step >= max_steps:
        return state
    bar = tqdm(total=max_steps, initial=start_step, disable=not is_main, desc="steps",
               dynamic_ncols=True)
    batches = loader.iterate(start_step)
    compiled = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in range(start_step, max_steps):
            batch = global_batch(next(batches), mesh, sample_axis=1)
            shape = tuple((name, x.shape) for name, x in sorted(batch.items()))
            if shape not in compiled:  # one program per batch shape (bucket), compiled once
                t0 = time.perf_counter()
                compiled[shape] = step_fn.lower(state, frozen, batch).compile()
                if is_main:
                    what = ("images", batch["pixel_values"]) if "pixel_values" in batch else (
                        "cached latents", batch["latent_mean"])
                    tqdm.write(f"compiled the train step for {what[1].shape[-1]}x"
                               f"{what[1].shape[-2]} {what[0]} in {time.perf_counter() - t0:.1f} s")
                window_start, window_steps = time.perf_counter(), 0
            state, metrics = compiled[shape](state, frozen, batch)
            window_steps += 1
            done = step + 1
            log_now = done % cfg.logging_steps == 0 or done == max_steps
            save_now = done % cfg.checkpointing_steps == 0
            stop_now = preemption.should_stop(done)
            if log_now or save_now or stop_now:
                values = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
                _check_finite(values, state, done, save_now or stop_now, checkpoints)
                elapsed = time.perf_counter() - window_start
                values["images_per_sec"] = window_steps * images_per_step / max(elapsed, 1e-9)
                writer.scalars(done, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                img_s=f"{values['images_per_sec']:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if save_now or stop_now:
                meta = dict(meta_base, step=done, micro_batches_consumed=done * loader.k)
                checkpoints.save(done, state, meta, force=stop_now)
            if stop_now:
                checkpoints.wait()
                if is_main:
                    tqdm.write(f"stopped by SIGTERM at step {done}: checkpoint saved; continue "
                               "with --resume_from_checkpoint latest")
                return None
            if validation is not None and validation.due(done, max_steps):
                validation.run(done, state)
                window_start, window_steps = time.perf_counter(), 0
    finally:
        bar.close()
        batches.close()
    return state
