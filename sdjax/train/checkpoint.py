"""Orbax checkpoints of the training state, with the metadata needed to resume and export.

A checkpoint `output_dir/checkpoints/checkpoint_N` holds the train state (UNet params, optimizer
state, EMA, step) and a JSON record: the run config, where the frozen base weights came from
(they are not copied), the data position and the sdjax version. Orbax writes each checkpoint
under a temporary name and renames it when complete, so a save cut short (SIGKILL, preemption)
is never listed and `latest` is always the last complete one.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import orbax.checkpoint as ocp

from sdjax.errors import ConfigError

PREFIX = "checkpoint"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.abspath(os.path.join(output_dir, "checkpoints"))


def make_manager(directory: str, max_to_keep: Optional[int] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, step_prefix=PREFIX, enable_async_checkpointing=not read_only,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=force)


def resolve_step(manager: ocp.CheckpointManager, ref: str) -> Optional[int]:
    """`latest`, `checkpoint-N` (the diffusers name), `checkpoint_N`, `N`, or a checkpoint path
    -> a step of this manager, or None for `latest` when there is none yet."""
    steps = manager.all_steps()
    if ref == "latest":
        return manager.latest_step()
    match = re.fullmatch(r"(?:.*/)?(?:checkpoint[-_])?(\d+)/?", ref)
    if not match:
        raise ConfigError(f"--resume_from_checkpoint={ref!r}: give latest, checkpoint-N, N or a path")
    step = int(match.group(1))
    if step not in steps:
        have = ", ".join(str(s) for s in steps) or "none"
        raise ConfigError(f"checkpoint {ref} does not exist in {manager.directory} "
                          f"(complete checkpoints: {have})")
    return step


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple:
    """-> (state laid out like `abstract_state`, metadata dict)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def read_meta(checkpoint_path: str) -> tuple:
    """-> (manager, step, meta) for a checkpoint folder path (for export)."""
    path = os.path.abspath(checkpoint_path.rstrip("/"))
    match = re.fullmatch(rf"{PREFIX}_(\d+)", os.path.basename(path))
    if not os.path.isdir(path) or not match:
        raise ConfigError(f"--checkpoint {checkpoint_path} is not a checkpoint folder "
                          f"(expected .../checkpoints/{PREFIX}_N)")
    manager = make_manager(os.path.dirname(path), read_only=True)
    step = int(match.group(1))
    if step not in manager.all_steps():
        raise ConfigError(f"--checkpoint {checkpoint_path} is incomplete (its save was cut short)")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return manager, step, meta
