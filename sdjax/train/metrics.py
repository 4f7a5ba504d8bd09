"""Scalars and validation images to TensorBoard (output_dir/logs) and, when asked and installed, Weights & Biases."""

from __future__ import annotations

import dataclasses
import os

from sdjax.errors import ConfigError


class MetricsWriter:
    def __init__(self, cfg, enabled: bool):
        self.tensorboard = None
        self.wandb = None
        if not enabled or cfg.report_to == "none":
            return
        if cfg.report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.output_dir, cfg.logging_dir))
        if cfg.report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report_to wandb needs wandb: `pip install wandb`") from None
            self.wandb = wandb.init(project="sdjax", config=dataclasses.asdict(cfg))

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def images(self, step: int, images: list) -> None:
        """images: [(caption, (H, W, 3) uint8 array)], logged under validation/."""
        if self.tensorboard is not None:
            for i, (caption, image) in enumerate(images):
                self.tensorboard.add_image(f"validation/{i}", image, step, dataformats="HWC")
                self.tensorboard.add_text(f"validation/{i}", caption, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation": [wandb.Image(image, caption=caption)
                                           for caption, image in images]}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
