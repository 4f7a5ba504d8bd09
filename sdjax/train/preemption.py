"""SIGTERM (TPU preemption, job schedulers) asks the training loop to checkpoint and stop."""

from __future__ import annotations

import signal
import threading

import jax


class Preemption:
    """One process: our own SIGTERM handler. Several: JAX's preemption sync point, so that
    every host stops at the same step (JAX's coordination service listens for the signal)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
