"""Training data: sources (what the user has) and the loader (per-host batches)."""

from sdjax.data.loader import Loader, transform_image
from sdjax.data.sources import CaptionedImages, open_dataset

__all__ = ["CaptionedImages", "Loader", "open_dataset", "transform_image"]
