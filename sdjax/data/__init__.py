"""Training data: sources (what the user has) and the loader (per-host batches)."""

from sdjax.data.loader import Loader, transform_image
from sdjax.data.sources import CaptionedImages, open_dataset, open_image_folder

__all__ = ["CaptionedImages", "Loader", "open_dataset", "open_image_folder", "transform_image"]
