"""What the step needs, built once per run: the models, the optimizer over the trainable set, the
train state and the frozen set placed on the devices, and the jitted step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.checkpoints import state_layout
from sdjax.config import TrainConfig
from sdjax.models.attention import device_platform
from sdjax.parallel import batch_sharded, mesh_context, replicated
from sdjax.schedule import NoiseSchedule
from sdjax.train.optimizer import run_optimizer
from sdjax.train.state import (TrainState, adapter_variables, frozen_shardings, init_state,
                               merged_variables, place, split_params, state_shardings,
                               trained_weights)
from sdjax.train.step import LossConfig, make_loss_fn, make_train_step


@dataclasses.dataclass
class Trainer:
    models: dict                # linen modules: unet, vae, text_encoder
    schedule: NoiseSchedule
    state: TrainState           # on the devices
    frozen: dict                # what the step reads and does not train, on the devices
    step_fn: Callable           # jitted (state, frozen, batch, numbers) -> (state, metrics);
                                # donates state
    numbers: dict               # the run's numbers the step takes (`step_numbers`), placed
    layout: dict                # what the checkpoints hold (sdjax.checkpoints.state_layout)
    _sd: object
    _mesh: object
    _use_ema: bool
    _extra: Optional[dict] = None   # frozen weights placed for sampling only
    lora: Optional[object] = None   # sdjax.lora.training.LoraRun of a LoRA run
    _strategy: str = "replicated"   # how the state is split over fsdp (sdjax.train.state)
    _merge: Optional[Callable] = None
    precompiled: dict = dataclasses.field(default_factory=dict)  # batch_key -> compiled step

    def abstract_state(self):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def sampling_params(self, state: TrainState) -> dict:
        """Every model's weights for sampling: the trained ones (EMA when kept) and the frozen
        ones, placed once (the step may not hold all of them: see `build_trainer`)."""
        trained = trained_weights(state, self._use_ema)
        missing = [c for c in ("unet", "vae", "text_encoder")
                   if c not in self.frozen and (self.lora is not None or c not in trained)]
        if missing and self._extra is None:
            dtype = self.models["unet"].dtype
            host = {c: _cast(self._sd.params[c], dtype) for c in missing}
            self._extra = place(host, frozen_shardings(self._mesh, host, self._strategy))
        base = {**self.frozen, **(self._extra or {})}
        if self.lora is None:
            return {**base, **trained}
        if self._merge is None:  # the adapters merged into the base kernels (compute dtype)
            from sdjax.lora.adapters import merge_adapters

            self._merge = jax.jit(lambda p, a: merge_adapters(p, a, self.lora.scale))
        return {**base, **{c: self._merge(base[c], a) for c, a in trained.items()}}


def _cast(tree, dtype):
    """Host arrays in `dtype`; shapes-only leaves (ShapeDtypeStructs) stay shapes."""
    def cast(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return np.asarray(x).astype(dtype)

    return jax.tree_util.tree_map(cast, tree)


def step_numbers(cfg: TrainConfig, max_steps: int, devices: int) -> dict:
    """The run's numbers the step takes as an argument (`sdjax.train.optimizer.run_optimizer`):
    the seed's key, each trained component's peak learning rate (--text_encoder_lr defaults to
    --learning_rate, as in diffusers; --scale_lr multiplies both), the schedule's warmup and
    length, AdamW's and clipping's settings. Host arrays, the same on every host."""
    scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * devices if cfg.scale_lr else 1
    peaks = {"unet": cfg.learning_rate}
    if cfg.train_text_encoder:
        peaks["text_encoder"] = cfg.text_encoder_lr or cfg.learning_rate
    f32 = np.float32
    return {"seed_key": np.asarray(jax.random.key_data(jax.random.key(cfg.run_seed))),
            "learning_rate": {c: f32(peak * scale) for c, peak in peaks.items()},
            "lr_warmup_steps": f32(cfg.lr_warmup_steps), "lr_total_steps": f32(max_steps),
            "adam_beta1": f32(cfg.adam_beta1), "adam_beta2": f32(cfg.adam_beta2),
            "adam_epsilon": f32(cfg.adam_epsilon), "adam_weight_decay": f32(cfg.adam_weight_decay),
            "max_grad_norm": f32(cfg.max_grad_norm or 0.0)}


def loss_config(cfg: TrainConfig) -> LossConfig:
    """The loss settings of a run; the command picks its script's min-SNR weights (dreambooth:
    train_dreambooth.py's, floored at one for v-prediction; text_to_image: its own)."""
    return LossConfig(cfg.effective_noise_offset, cfg.input_perturbation, cfg.snr_gamma,
                      cfg.prior_loss_weight, snr_v_floor=cfg.task == "dreambooth")


@dataclasses.dataclass
class StepProgram:
    """The jitted step of a run and what it takes: built from the model's parameter trees,
    which may be shapes only (`sdjax.train.fit` compiles it for a TPU topology this way)."""
    models: dict
    schedule: NoiseSchedule
    tx: object
    trainable: dict             # host arrays (adapters, or the trained models' weights)
    frozen: dict                # host arrays or ShapeDtypeStructs, in the frozen dtype
    shardings: TrainState       # of every state leaf
    frozen_sharding: dict
    abstract_state: TrainState
    step_fn: Callable           # jitted (state, frozen, batch, numbers) -> (state, metrics)
    numbers: dict               # its last argument (`step_numbers`), host arrays
    layout: dict
    lora: Optional[object]
    strategy: str


def step_program(cfg: TrainConfig, sd, mesh, max_steps: int, cached_latents: bool,
                 text_embeddings: bool) -> StepProgram:
    """The step for this run on `mesh`. `cached_latents` / `text_embeddings`: the batch
    brings VAE latents (no VAE on the devices) / text embeddings (no frozen text encoder)."""
    from sdjax.models.build import build_models

    dtype = jnp.dtype(cfg.compute_dtype_name)
    numbers = step_numbers(cfg, max_steps, mesh.devices.size)
    optimizer = functools.partial(run_optimizer, cfg.lr_scheduler)
    tx, _ = optimizer(numbers)  # for the state's structure, which the numbers do not change
    # "auto" attention for the devices the step is compiled for (a TPU topology's under
    # --compile_only on another machine).
    platform = device_platform(mesh.devices.flat[0])
    models = build_models(sd.configs, dtype, cfg.attention_implementation,
                          cfg.remat, cfg.remat_policy, platform=platform,
                          image_size=cfg.resolution)
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    lora = None
    if cfg.use_lora:
        from sdjax.lora.training import setup_lora

        lora = setup_lora(cfg, sd.params)
        trainable, frozen = lora.adapters, dict(sd.params)
        loss_models, variables = lora.wrap(models), adapter_variables
    else:
        trainable, frozen = split_params(sd.params, cfg.trained_components)
        loss_models, variables = models, merged_variables
    loss_fn = make_loss_fn(loss_models["unet"], loss_models["vae"], loss_models["text_encoder"],
                           schedule, loss_config(cfg), variables)

    base_step = make_train_step(loss_fn, optimizer, unroll_accumulation=platform == "cpu")
    # What the batch brings instead: cached latents (no VAE), cached or pre-computed text
    # embeddings (no text encoder).
    if cached_latents:
        frozen.pop("vae", None)
    if text_embeddings and "text_encoder" not in trainable:
        frozen.pop("text_encoder", None)
    frozen = _cast(frozen, jnp.dtype(cfg.frozen_dtype_name))
    strategy = cfg.sharding_strategy
    frozen_sharding = frozen_shardings(mesh, frozen, strategy)
    use_ema = cfg.use_ema
    abstract = jax.eval_shape(lambda p: init_state(p, tx, use_ema), _shapes(trainable))
    shardings = state_shardings(mesh, abstract, strategy)

    def step(s, f, b, n):
        with mesh_context(mesh):  # the flash attention kernel runs per batch shard
            return base_step(s, f, b, n)

    step_fn = jax.jit(step,
                      in_shardings=(shardings, frozen_sharding, batch_sharded(mesh, 1),
                                    replicated(mesh)),
                      out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    layout = state_layout(cfg.trained_components, cfg.use_ema,
                          lora.layout if lora is not None else None)
    return StepProgram(models, schedule, tx, trainable, frozen, shardings, frozen_sharding,
                       abstract, step_fn, numbers, layout, lora, strategy)


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def build_trainer(cfg: TrainConfig, sd, loader, mesh, max_steps: int) -> Trainer:
    program = step_program(cfg, sd, mesh, max_steps, loader.cache is not None,
                           loader.supplies_text_embeddings)
    frozen = place(program.frozen, program.frozen_sharding)
    tx, use_ema = program.tx, cfg.use_ema
    state = jax.jit(lambda p: init_state(p, tx, use_ema), out_shardings=program.shardings)(
        place(program.trainable, program.shardings.params))
    numbers = place(program.numbers, jax.tree_util.tree_map(lambda _: replicated(mesh),
                                                            program.numbers))
    return Trainer(program.models, program.schedule, state, frozen, program.step_fn, numbers,
                   program.layout, sd, mesh, use_ema, lora=program.lora,
                   _strategy=program.strategy)
