"""Validation images while training: fixed prompts and seeds, sampled from the current weights
(the EMA weights when EMA is on) every --validation_steps steps and at the end.

Each validation writes output_dir/validation/step-XXXXXXX.png (a row per prompt, a column per
image) and logs each prompt's row to TensorBoard / W&B. The sampling program is compiled once
for the run; only numpy images leave the devices, so repeated validations hold no device memory.
"""

from __future__ import annotations

import io
import math

import numpy as np
from tqdm.auto import tqdm

from sdjax import storage
from sdjax.sampling.images import grid, to_pil
from sdjax.sampling.sampler import Sampler
from sdjax.sampling.schedulers import default_scheduler_name, make_scheduler


class Validation:
    def __init__(self, cfg, sd, models, mesh, writer, is_main: bool, steps_per_epoch):
        self.prompts = cfg.all_validation_prompts
        self.per_prompt = cfg.num_validation_images
        self.settings = dict(num_inference_steps=cfg.validation_num_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale,
                             height=cfg.resolution, width=cfg.resolution,
                             num_images_per_prompt=self.per_prompt, seed=cfg.run_seed,
                             scheduler=cfg.validation_scheduler)
        if cfg.validation_steps:
            self.every = cfg.validation_steps
        elif cfg.validation_epochs:
            self.every = max(1, math.ceil(cfg.validation_epochs * steps_per_epoch))
        else:
            self.every = cfg.checkpointing_steps
        self.sampler = Sampler(models, sd.configs, sd.scheduler_config, sd.tokenizer, mesh)
        # Refuse a bad scheduler or image size now, before hours of training.
        make_scheduler(cfg.validation_scheduler or default_scheduler_name(sd.scheduler_config),
                       sd.scheduler_config, cfg.validation_num_inference_steps)
        self.sampler.check_size(cfg.resolution, "--resolution")
        self.writer = writer
        self.is_main = is_main
        self.folder = storage.join(cfg.output_dir, "validation")
        self.use_ema = cfg.use_ema

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def path(self, step: int) -> str:
        return storage.join(self.folder, f"step-{step:07d}.png")

    def run(self, step: int, params: dict) -> str:
        """Samples the prompts with `params` (every model's weights on the devices: the trained
        ones, EMA when kept, and the frozen ones) and writes the grid; -> its path."""
        out = self.sampler.sample(params, self.prompts, **self.settings)
        images = to_pil(out.images)
        path = self.path(step)
        if self.is_main:
            storage.makedirs(self.folder)
            png = io.BytesIO()
            grid(images, self.per_prompt).save(png, format="PNG")
            storage.write_bytes(path, png.getvalue())
            rows = [grid(images[i * self.per_prompt:(i + 1) * self.per_prompt], self.per_prompt)
                    for i in range(len(self.prompts))]
            self.writer.images(step, [(p, np.asarray(r)) for p, r in zip(self.prompts, rows)])
            self.writer.scalars(step, {"seconds": out.seconds}, prefix="validation")
            compiled = " (including compilation)" if out.compiled else ""
            tqdm.write(f"validation at step {step}: {len(images)} images "
                  f"({'EMA' if self.use_ema else 'raw'} weights) in {out.seconds:.1f} s"
                  f"{compiled} -> {path}")
        return path
