"""Scalars and validation images to TensorBoard and, when asked and installed, Weights & Biases.

Both carry --tracker_project_name as diffusers' scripts do through accelerate: the W&B project,
and the TensorBoard run folder `output_dir/logs/<tracker_project_name>`."""

from __future__ import annotations

import dataclasses

from sdjax import storage
from sdjax.errors import ConfigError


def tensorboard_dir(cfg) -> str:
    return storage.join(cfg.output_dir, cfg.logging_dir, cfg.tracker_project_name)


class MetricsWriter:
    def __init__(self, cfg, enabled: bool):
        self.tensorboard = None
        self.wandb = None
        if not enabled or cfg.report_to == "none":
            return
        if cfg.report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir(cfg))
        if cfg.report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report_to wandb needs wandb: `pip install wandb`") from None
            self.wandb = wandb.init(project=cfg.tracker_project_name, config=dataclasses.asdict(cfg),
                                    dir=None if storage.is_remote(cfg.output_dir) else cfg.output_dir)

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
