"""Orbax checkpoints of the training state, with the metadata needed to resume and export.

A checkpoint `output_dir/checkpoints/checkpoint_N` holds the train state (the trained
components' params, optimizer state, EMA, step) and a JSON record (see `sdjax.checkpoints`, which
also reads them for export). Orbax writes each checkpoint
under a temporary name (on a bucket: with a commit marker) and makes it visible when complete,
so a save cut short (SIGKILL, preemption) is never listed and `latest` is always the last
complete one.

Lines of training: `checkpoints/` only ever holds one line. A run that continues from a
checkpoint older than the newest one in its folder trains a new branch: at its first save, the
newer checkpoints of the abandoned branch are moved (never deleted) to
`output_dir/abandoned_checkpoints/after_step_N_<time>/`. A run that starts afresh, or continues
from a checkpoint of another folder (another run's, or one under abandoned_checkpoints/), is a new
line: at its first save every checkpoint of this folder moves to
`abandoned_checkpoints/before_new_line_<time>/`. So `latest`, every step number in
`checkpoints/` and what `--checkpoints_total_limit` deletes belong to the line being trained.
Files that go with a checkpoint (a LoRA run's `checkpoint-N/` folders) move with it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import orbax.checkpoint as ocp

from sdjax import storage
from sdjax.checkpoints import (PREFIX, checkpoint_dir, layout_difference, layout_of, make_manager,
                               open_checkpoint, parse_ref, step_path)
from sdjax.errors import ConfigError, SdjaxError
from sdjax.parallel import on_main_host, sync_hosts

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
    or silently skips a checkpoint, nor mixes two lines of training.

    Every step reported by `saved` was accepted by Orbax (and exists once `wait` returns).
    Nothing is written (not even `checkpoints/`) before the first save.
    `companions(step)`: paths of other files that belong to a step (moved aside with it).
    """

    def __init__(self, output_dir: str, max_to_keep: Optional[int], is_main: bool,
                 companions: Optional[Callable[[int], list]] = None):
        self.output_dir = storage.absolute(output_dir)
        self.directory = checkpoint_dir(output_dir)
        self.max_to_keep = max_to_keep
        self.is_main = is_main
        self.companions = companions
        self.branch_point = 0
        self.new_line = True    # until a checkpoint of this folder is resumed
        self.resumed_from: Optional[str] = None
        self.saved: list = []
        self._checked_branch = False
        self._manager: Optional[ocp.CheckpointManager] = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        """This folder's Orbax manager: read-only until the run saves (so a run that stops before
        its first save, bad input included, leaves no folder behind)."""
        if self._manager is None:
            self._manager = make_manager(self.directory, read_only=True)
        return self._manager

    def steps(self) -> list:
        """The complete checkpoints in this folder (none when it does not exist)."""
        if not storage.isdir(self.directory):
            return []
        return sorted(self.manager.all_steps())

    def resume(self, ref: str, abstract_state, layout: dict) -> Optional[tuple]:
        """-> (state, meta, step) restored from `ref`, or None for `latest` with no checkpoint.
        The run's branch starts at that step; a checkpoint of another folder starts a new line."""
        named = parse_ref(ref)
        elsewhere = named.directory is not None and named.directory != self.directory
        if elsewhere:
            manager, step = open_checkpoint(step_path(named.directory, named.step),
                                            "--resume_from_checkpoint")
        else:
            step = self.resolve(ref)
            if step is None:
                return None
            manager = self.manager
        try:
            state, meta = restore(manager, step, abstract_state, layout)
        finally:
            if elsewhere:
                manager.close()
        self.branch_point = step
        self.new_line = elsewhere
        self.resumed_from = step_path(named.directory if elsewhere else self.directory, step)
        return state, meta, step

    def resolve(self, ref: str) -> Optional[int]:
        """The step of this folder `ref` names (None: `latest` with no checkpoint yet); a step
        that is not here is refused without writing anything."""
        if not storage.isdir(self.directory):
            if parse_ref(ref).step is None:
                return None
            raise ConfigError(f"checkpoint {ref} does not exist in {self.directory} "
                              "(complete checkpoints: none)")
        return resolve_step(self.manager, ref)

    def check_ref(self, ref: str) -> None:
        """Refuses (before anything is loaded or written) a --resume_from_checkpoint that names
        no complete checkpoint."""
        named = parse_ref(ref)
        if named.directory is not None and named.directory != self.directory:
            open_checkpoint(step_path(named.directory, named.step),
                            "--resume_from_checkpoint")[0].close()
        else:
            self.resolve(ref)

    def last_good(self) -> str:
        """The newest complete checkpoint of this branch, in words."""
        if self._manager is not None:
            self._manager.wait_until_finished()
        if self.saved:
            return step_path(self.directory, self.saved[-1])
        return self.resumed_from or "none (no checkpoint was saved)"

    def save(self, step: int, state, meta: dict, force: bool = False) -> None:
        if not self._checked_branch:
            self._move_aside_other_lines()
            self._checked_branch = True
        if step in self.manager.all_steps():  # this branch saved it already (save and stop)
            return
        save(self.manager, step, state, meta, force=force)
        self.saved.append(step)

    def _move_aside_other_lines(self) -> None:
        """Before the first save: the checkpoints that are not this line's are moved aside (a
        new line: all of them; a branch: those after the branch point), with their companion
        files; then the manager that saves (and keeps --checkpoints_total_limit) takes over."""
        present = self.steps()
        moving = present if self.new_line else [s for s in present if s > self.branch_point]
        if moving:
            on_main_host(lambda: self._move(moving), "moving checkpoints aside")
            sync_hosts("sdjax-checkpoints-moved-aside")
        if self._manager is not None:
            self._manager.close()
        self._manager = make_manager(self.directory, self.max_to_keep)

    def _move(self, steps: list) -> None:
        kind = "before_new_line" if self.new_line else f"after_step_{self.branch_point}"
        folder = _unused(storage.join(self.output_dir, ABANDONED,
                                      f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}"))
        for s in steps:
            storage.move(step_path(self.directory, s), storage.join(folder, f"{PREFIX}_{s}"))
            for path in (self.companions(s) if self.companions else []):
                storage.move(path, storage.join(folder, storage.basename(path)))
        names = ", ".join(f"{PREFIX}_{s}" for s in steps)
        if self.new_line:
            why = ("this run starts a new line of training" if self.resumed_from is None else
                   f"this run continues from {self.resumed_from}, another folder's checkpoint")
            print(f"note: {why}; the checkpoints already in {self.directory} ({names}) were "
                  f"moved to {folder}")
        else:
            print(f"note: this run continues from step {self.branch_point}; the newer "
                  f"checkpoints of the branch it leaves ({names}) were moved to {folder}")

    def wait(self) -> None:
        """Waits for saves in flight; raises if a reported save is not on disk."""
        if self._manager is None:
            return
        self.manager.wait_until_finished()
        if self.saved:
            self.manager.reload()
            have = set(self.manager.all_steps())
            kept = self.saved[-self.max_to_keep:] if self.max_to_keep else self.saved
            missing = [s for s in kept if s not in have]
            if missing:
                raise SdjaxError(f"checkpoint step {missing[0]} was saved but is not in "
                                 f"{self.directory}: was the folder changed during the run?")

    def drain(self) -> None:
        """Waits for saves in flight (nothing to wait for before the first save)."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def _unused(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist yet (two branches
    from the same step in the same second get folders of their own)."""
    candidate, n = path, 1
    while storage.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate
