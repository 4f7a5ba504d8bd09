"""The step loop: batches in, one compiled step per batch shape, logging, the NaN guard,
checkpoints, SIGTERM, validation."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from sdjax.parallel import placed_ahead
from sdjax.train.guard import check_finite


@dataclasses.dataclass
class StepLoop:
    trainer: object             # sdjax.train.trainer.Trainer
    loader: object
    mesh: object
    checkpoints: object         # sdjax.train.run_checkpoints.RunCheckpoints
    meta: dict                  # the run record saved with every checkpoint
    writer: object              # sdjax.train.metrics.MetricsWriter
    preemption: object          # sdjax.train.preemption.Preemption
    validation: Optional[object]
    logging_steps: int
    checkpointing_steps: int
    images_per_step: int
    is_main: bool
    lora_output: Optional[object] = None    # sdjax.lora.training.LoraOutput of a LoRA run

    def run(self, state, start_step: int, max_steps: int):
        """-> the state after `max_steps`, or None when SIGTERM stopped the run (after saving)."""
        if start_step >= max_steps:
            return state
        bar = tqdm(total=max_steps, initial=start_step, disable=not self.is_main, desc="steps",
                   dynamic_ncols=True)
        # Host batches are built ahead in the loader's thread; the next two are on the devices.
        batches = placed_ahead(self.loader.iterate(start_step), self.mesh, sample_axis=1)
        self._compiled = dict(self.trainer.precompiled)
        self._window = (time.perf_counter(), 0)
        try:
            for step in range(start_step, max_steps):
                batch = next(batches)
                state, metrics = self._program(state, batch)(state, self.trainer.frozen, batch,
                                                             self.trainer.numbers)
                self._window = (self._window[0], self._window[1] + 1)
                done = step + 1
                log_now = done % self.logging_steps == 0 or done == max_steps
                save_now = done % self.checkpointing_steps == 0
                stop_now = self.preemption.should_stop(done)
                if log_now or save_now or stop_now:
                    self._log(bar, metrics, state, done, saving=save_now or stop_now)
                bar.update(1)
                if save_now or stop_now:
                    meta = dict(self.meta, step=done, micro_batches_consumed=done * self.loader.k)
                    self.checkpoints.save(done, state, meta, force=stop_now)
                    if self.lora_output is not None:
                        self.lora_output.write(state, done, self.checkpoints.manager.all_steps())
                if stop_now:
                    self.checkpoints.wait()
                    if self.is_main:
                        tqdm.write(f"stopped by SIGTERM at step {done}: checkpoint saved; "
                                   "continue with --resume_from_checkpoint latest")
                    return None
                if self.validation is not None and self.validation.due(done, max_steps):
                    self.validation.run(done, self.trainer.sampling_params(state))
                    self._window = (time.perf_counter(), 0)
        finally:
            bar.close()
            batches.close()
        return state

    def _program(self, state, batch):
        """The step compiled for this batch's shapes (one program per bucket), once."""
        shape = batch_key(batch)
        if shape not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[shape] = self.trainer.step_fn.lower(
                state, self.trainer.frozen, batch, self.trainer.numbers).compile()
            if self.is_main:
                if "pixel_values" in batch:  # (k, rows, H, W, 3)
                    what, (height, width) = "images", batch["pixel_values"].shape[-3:-1]
                else:  # (k, rows, C, h, w)
                    what, (height, width) = "cached latents", batch["latent_mean"].shape[-2:]
                tqdm.write(f"compiled the train step for {width}x{height} {what} in "
                           f"{time.perf_counter() - t0:.1f} s")
            self._window = (time.perf_counter(), 0)
        return self._compiled[shape]

    def _log(self, bar, metrics, state, done: int, saving: bool) -> None:
        values = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
        check_finite(values, state, done, saving, self.checkpoints)
        start, steps = self._window
        values["images_per_sec"] = steps * self.images_per_step / max(
            time.perf_counter() - start, 1e-9)
        self.writer.scalars(done, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                        img_s=f"{values['images_per_sec']:.1f}")
        self._window = (time.perf_counter(), 0)


def batch_key(batch: dict) -> tuple:
    """What tells batches apart for compiling: names, shapes and dtypes (arrays or shapes)."""
    return tuple((name, tuple(x.shape), str(x.dtype)) for name, x in sorted(batch.items()))
