"""A training run's checkpoints on disk, and reading the trained weights out of them.

A run's checkpoints are Orbax steps `output_dir/checkpoints/checkpoint_N` (local or gs://). Each
holds the train state {step, params, opt_state, ema} and a JSON record (`meta`): the run config,
where the frozen base model came from (it is not copied), the data position, and the state
layout: which components are trained (`params` and `ema` are dicts keyed by component, e.g.
{"unet": ..., "text_encoder": ...}) and whether EMA weights are kept.

Training writes and resumes them (`sdjax.train.run_checkpoints`); `export`, `generate` and `compare`
read them here, without importing the trainer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax import storage
from sdjax.errors import ConfigError

PREFIX = "checkpoint"
_NAME = re.compile(r"checkpoint[-_](\d+)")

# Version 1 (sdjax before text-encoder training): `params`/`ema` were the UNet tree itself.
LAYOUT_VERSION = 2


def checkpoint_dir(output_dir: str) -> str:
    return storage.join(storage.absolute(output_dir), "checkpoints")


def step_path(directory: str, step: int) -> str:
    return storage.join(directory, f"{PREFIX}_{step}")


def make_manager(directory: str, max_to_keep: Optional[int] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, step_prefix=PREFIX, enable_async_checkpointing=not read_only,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, options=options)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """What --resume_from_checkpoint names: a step of this run (`directory` None; `step` None
    for latest) or a checkpoint folder anywhere."""
    step: Optional[int]
    directory: Optional[str] = None


def parse_ref(ref: str) -> CheckpointRef:
    """`latest`, `N`, `checkpoint-N` (the diffusers name) or `checkpoint_N` (the name sdjax
    writes) name a checkpoint of this run; a path (local or gs://) names a checkpoint folder."""
    ref = str(ref).strip()
    if ref == "latest":
        return CheckpointRef(None)
    if re.fullmatch(r"\d+", ref):
        return CheckpointRef(int(ref))
    if _NAME.fullmatch(ref):
        return CheckpointRef(int(_NAME.fullmatch(ref).group(1)))
    if "/" in ref or storage.exists(ref):
        match = _NAME.fullmatch(storage.basename(ref))
        if not match:
            raise ConfigError(f"--resume_from_checkpoint={ref!r} is not a checkpoint folder "
                              f"(expected a path ending in {PREFIX}_N)")
        return CheckpointRef(int(match.group(1)), storage.absolute(storage.dirname(ref)))
    raise ConfigError(f"--resume_from_checkpoint={ref!r}: give latest, checkpoint-N, N or the "
                      f"path of a {PREFIX}_N folder")


def open_checkpoint(checkpoint_path: str, what: str = "--checkpoint") -> tuple:
    """-> (read-only manager, step) of a checkpoint folder `.../checkpoint_N` (local or gs://);
    refused unless it is complete."""
    path = storage.absolute(checkpoint_path)
    match = _NAME.fullmatch(storage.basename(path))
    if not match:
        raise ConfigError(f"{what} {checkpoint_path} is not a checkpoint folder "
                          f"(expected .../checkpoints/{PREFIX}_N)")
    step = int(match.group(1))
    if not storage.isdir(path):
        raise ConfigError(f"{what} {checkpoint_path} does not exist")
    manager = make_manager(storage.dirname(path), read_only=True)
    if step not in manager.all_steps():
        manager.close()
        raise ConfigError(f"{what} {checkpoint_path} is incomplete (its save was cut short)")
    return manager, step


def read_meta(checkpoint_path: str) -> dict:
    """The run record saved with a checkpoint (config, base model, step, state layout)."""
    manager, step = open_checkpoint(checkpoint_path)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()


# --- the state layout ------------------------------------------------------------------------

def state_layout(trained: list, ema: bool, adapter: Optional[dict] = None) -> dict:
    """What a checkpoint's state holds, recorded in its meta. `adapter` (LoRA runs: kind, rank,
    alpha, layers) says the trained components are adapters, not the models' weights."""
    order = ("unet", "text_encoder")
    ranked = sorted(trained, key=lambda c: (order.index(c) if c in order else len(order), c))
    layout = {"version": LAYOUT_VERSION, "trained": ranked, "ema": bool(ema)}
    if adapter is not None:
        layout["adapter"] = dict(adapter)
    return layout


def layout_of(meta: dict) -> dict:
    """The layout a checkpoint was written with (version 1 checkpoints: the UNet alone)."""
    if "state_layout" in meta:
        return meta["state_layout"]
    return {"version": 1, "trained": ["unet"], "ema": bool(meta["config"].get("use_ema"))}


def describe_layout(layout: dict) -> str:
    trained = " + ".join(layout["trained"]) or "nothing"
    adapter = layout.get("adapter")
    if adapter:
        trained = (f"LoRA (rank {adapter['rank']}, alpha {adapter['alpha']:g}, layers "
                   f"{adapter['layers']}) on {trained}")
    return f"{trained} trained, EMA {'on' if layout['ema'] else 'off'}"


def layout_difference(saved: dict, wanted: dict) -> Optional[str]:
    """None when a checkpoint of layout `saved` restores into a run of layout `wanted`, else
    what differs, in words."""
    if saved.get("version") != wanted["version"]:
        return (f"it was written by an older sdjax (state layout {saved.get('version')}, this "
                f"is {wanted['version']}); export it with `train_flax.py export` and start from "
                "the exported pipeline")
    if saved != wanted:
        return f"it holds {describe_layout(saved)}; this run has {describe_layout(wanted)}"
    return None


# --- reading trained weights ----------------------------------------------------------------

def read_trained(checkpoint: str, like: dict, ema: Optional[bool] = None) -> tuple:
    """-> ({component: params as host arrays}, step, meta, whether they are the EMA weights).

    Reads only the trained components' weights (not the optimizer state, not the other copy);
    `like` maps components to a parameter tree (arrays or shapes) of the model they are for.
    `ema=None` takes the EMA weights when the run kept them."""
    manager, step = open_checkpoint(checkpoint)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        layout = layout_of(meta)
        if ema and not layout["ema"]:
            raise ConfigError(f"{checkpoint} has no EMA weights (the run did not use --use_ema); "
                              "drop --ema")
        use_ema = layout["ema"] if ema is None else ema
        name = "ema" if use_ema else "params"
        shapes = {c: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32),
                                            like[c]) for c in layout["trained"]}
        target = {name: shapes if layout["version"] >= 2 else shapes["unet"]}
        to_host = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=to_host, partial_restore=True)))["state"][name]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"the weights in {checkpoint} do not fit the model they are loaded "
                              f"for: {str(e).splitlines()[0][:200]}") from None
    finally:
        manager.close()
    if layout["version"] < 2:
        restored = {"unet": restored}
    for component, tree in restored.items():
        want = jax.tree_util.tree_map(lambda x: tuple(x.shape), like[component])
        if jax.tree_util.tree_map(lambda x: tuple(x.shape), tree) != want:
            raise ConfigError(f"the {component} in {checkpoint} does not fit the model it is "
                              "loaded for (different architecture)")
    return restored, step, meta, use_ema


def read_model_weights(checkpoint: str, base: dict, ema: Optional[bool] = None) -> tuple:
    """-> ({component: the model weights the checkpoint trained}, step, meta, used EMA), host
    arrays. `base` is the run's base parameters: their trees give the shapes, and a LoRA
    checkpoint's adapters are merged into them (float32 math, the base's dtype)."""
    layout = layout_of(read_meta(checkpoint))
    if not layout.get("adapter"):
        return read_trained(checkpoint, base, ema)
    from sdjax.lora.training import adapter_shapes, layout_scale, merged_params

    adapters, step, meta, used_ema = read_trained(checkpoint, adapter_shapes(base, layout), ema)
    return merged_params(base, adapters, layout_scale(layout)), step, meta, used_ema


def base_model(meta: dict, dtype=None):
    """The run's base pipeline (every model, tokenizer, scheduler) as the run loaded it."""
    from sdjax.pipeline import load_base

    sd = load_base(meta["base_model"], dtype=dtype)
    apply_prediction_type(sd, meta["config"].get("prediction_type"))
    return sd


def apply_prediction_type(sd, prediction_type: Optional[str]) -> None:
    """A run trained with --prediction_type samples, and exports its scheduler config, with it."""
    if prediction_type:
        sd.scheduler_config["prediction_type"] = prediction_type


def trained_pipeline(checkpoint: str, ema: Optional[bool] = None, dtype=None) -> tuple:
    """-> (the run's pipeline with the checkpoint's trained weights in it, step, meta, used EMA)."""
    meta = read_meta(checkpoint)
    sd = base_model(meta, dtype=dtype)
    trained, step, meta, used_ema = read_model_weights(checkpoint, sd.params, ema)
    if dtype is not None:
        trained = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), trained)
    sd.params.update(trained)
    return sd, step, meta, used_ema
