"""Orbax checkpoints of the training state, with the metadata needed to resume and export.

A checkpoint `output_dir/checkpoints/checkpoint_N` holds the train state (the trained
components' params, optimizer state, EMA, step) and a JSON record (see `sdjax.checkpoints`, which
also reads them for export). Orbax writes each checkpoint
under a temporary name (on a bucket: with a commit marker) and makes it visible when complete,
so a save cut short (SIGKILL, preemption) is never listed and `latest` is always the last
complete one.

Branches: a run that continues from a checkpoint older than the newest one in its folder trains
a new branch. At its first save, the newer checkpoints of the abandoned branch are moved (never
deleted) to `output_dir/abandoned_checkpoints/after_step_N_<time>/`, so `latest` and every step
number in `checkpoints/` belong to one line of training.
"""

from __future__ import annotations

import time
from typing import Optional

import orbax.checkpoint as ocp

from sdjax import storage
from sdjax.checkpoints import (PREFIX, checkpoint_dir, layout_difference, layout_of, make_manager,
                               open_checkpoint, parse_ref, step_path)
from sdjax.errors import ConfigError, SdjaxError
from sdjax.parallel import sync_hosts

ABANDONED = "abandoned_checkpoints"


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> None:
    """Starts the (async) save of `step`; raises if Orbax declines to write it."""
    saved = manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)
    if not saved:
        raise SdjaxError(f"Orbax did not save step {step} in {manager.directory} (its newest "
                         f"checkpoint is step {manager.latest_step()}); nothing was overwritten")


def resolve_step(manager: ocp.CheckpointManager, ref: str) -> Optional[int]:
    """A step of this manager named by `ref` (not a path elsewhere); None for `latest` when
    there is no checkpoint yet."""
    named = parse_ref(ref)
    if named.step is None:
        return manager.latest_step()
    steps = manager.all_steps()
    if named.step not in steps:
        have = ", ".join(str(s) for s in sorted(steps)) or "none"
        raise ConfigError(f"checkpoint {ref} does not exist in {manager.directory} "
                          f"(complete checkpoints: {have})")
    return named.step


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, layout: dict) -> tuple:
    """-> (state laid out like `abstract_state`, metadata dict). A checkpoint whose state layout
    (what is trained, EMA) is not `layout` is refused before anything is read."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    different = layout_difference(layout_of(meta), layout)
    if different:
        raise ConfigError(f"checkpoint {step_path(manager.directory, step)} does not fit this "
                          f"run: {different}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as e:
        detail = " ".join(str(e).split())[:240]
        raise ConfigError(f"checkpoint step {step} in {manager.directory} does not fit this run's "
                          f"training state (another model?): {detail}") from None
    return restored["state"], meta


class RunCheckpoints:
    """The checkpoints of one training run: where it resumes from, and saving that never loses
    or silently skips a checkpoint.

    Every step reported by `saved` was accepted by Orbax (and exists once `wait` returns).
    """

    def __init__(self, output_dir: str, max_to_keep: Optional[int], is_main: bool):
        self.output_dir = storage.absolute(output_dir)
        self.directory = checkpoint_dir(output_dir)
        self.manager = make_manager(self.directory, max_to_keep)
        self.max_to_keep = max_to_keep
        self.is_main = is_main
        self.branch_point = 0
        self.resumed_from: Optional[str] = None
        self.saved: list = []
        self._checked_branch = False

    def resume(self, ref: str, abstract_state, layout: dict) -> Optional[tuple]:
        """-> (state, meta, step) restored from `ref`, or None for `latest` with no checkpoint.
        The run's branch starts at that step."""
        named = parse_ref(ref)
        elsewhere = named.directory is not None and named.directory != self.directory
        if elsewhere:
            manager, step = open_checkpoint(step_path(named.directory, named.step),
                                            "--resume_from_checkpoint")
        else:
            manager, step = self.manager, resolve_step(self.manager, ref)
            if step is None:
                return None
        try:
            state, meta = restore(manager, step, abstract_state, layout)
        finally:
            if elsewhere:
                manager.close()
        self.branch_point = step
        self.resumed_from = step_path(named.directory if elsewhere else self.directory, step)
        return state, meta, step

    def last_good(self) -> str:
        """The newest complete checkpoint of this branch, in words."""
        self.manager.wait_until_finished()
        if self.saved:
            return step_path(self.directory, self.saved[-1])
        return self.resumed_from or "none (no checkpoint was saved)"

    def save(self, step: int, state, meta: dict, force: bool = False) -> None:
        if not self._checked_branch:
            self._move_aside_newer()
            self._checked_branch = True
        if step in self.manager.all_steps():  # this branch saved it already (save and stop)
            return
        save(self.manager, step, state, meta, force=force)
        self.saved.append(step)

    def _move_aside_newer(self) -> None:
        """Moves the checkpoints after the branch point (another line of training) aside."""
        newer = sorted(s for s in self.manager.all_steps() if s > self.branch_point)
        if not newer:
            return
        if self.is_main:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = storage.join(self.output_dir, ABANDONED,
                                  f"after_step_{self.branch_point}_{stamp}")
            for s in newer:
                storage.move(step_path(self.directory, s), storage.join(folder, f"{PREFIX}_{s}"))
            names = ", ".join(f"{PREFIX}_{s}" for s in newer)
            print(f"note: this run continues from step {self.branch_point}; the newer checkpoints "
                  f"of the branch it leaves ({names}) were moved to {folder}")
        sync_hosts("sdjax-checkpoints-moved-aside")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for saves in flight; raises if a reported save is not on disk."""
        self.manager.wait_until_finished()
        if self.saved:
            self.manager.reload()
            have = set(self.manager.all_steps())
            kept = self.saved[-self.max_to_keep:] if self.max_to_keep else self.saved
            missing = [s for s in kept if s not in have]
            if missing:
                raise SdjaxError(f"checkpoint step {missing[0]} was saved but is not in "
                                 f"{self.directory}: was the folder changed during the run?")

    def close(self) -> None:
        self.manager.close()
