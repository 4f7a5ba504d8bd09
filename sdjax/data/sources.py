"""Captioned image data sets: Hugging Face datasets (hub name, saved dataset, imagefolder).

Everything is checked when the data set is opened, before any model is compiled: the columns
exist, there are images, every image has a caption.
"""

from __future__ import annotations

import os
from typing import Optional

from sdjax.errors import ConfigError


class CaptionedImages:
    """Random access to (PIL image, caption or list of captions) pairs."""

    def __init__(self, dataset, image_column: str, caption_column: str, where: str):
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.where = where

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int):
        return self.dataset[int(index)][self.image_column]

    def caption(self, index: int):
        return self.captions[int(index)]

    def load_captions(self) -> None:
        """Reads the whole caption column once (text is small; images are read on demand)."""
        self.captions = self.dataset[self.caption_column]


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json"))
        and os.path.isfile(os.path.join(path, "dataset_info.json")))


def _load(dataset_name: Optional[str], dataset_config_name: Optional[str],
          train_data_dir: Optional[str], cache_dir: Optional[str]):
    import datasets

    datasets.disable_progress_bars()
    try:
        if dataset_name and os.path.isdir(dataset_name) and _is_saved_dataset(dataset_name):
            data = datasets.load_from_disk(dataset_name)
        elif dataset_name:
            data = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        else:
            data = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types; the user needs the first line
        where = dataset_name or train_data_dir
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load the data set {where}: {first}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"data set {dataset_name or train_data_dir} has no 'train' split "
                              f"(it has {', '.join(data)})")
        data = data["train"]
    return data


def open_dataset(dataset_name=None, dataset_config_name=None, train_data_dir=None,
                 image_column="image", caption_column="text", max_train_samples=None,
                 cache_dir=None, seed: int = 0) -> CaptionedImages:
    where = dataset_name or train_data_dir
    if train_data_dir and not dataset_name:
        _check_image_folder(train_data_dir)
    data = _load(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    columns = list(data.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ConfigError(f"{flag} '{column}' is not a column of {where}; its columns are "
                              f"{', '.join(columns)}")
    if len(data) == 0:
        raise ConfigError(f"the data set {where} has no images")
    if max_train_samples is not None:
        # As diffusers: shuffle with the seed, then keep the first max_train_samples.
        data = data.shuffle(seed=seed).select(range(min(max_train_samples, len(data))))
    images = CaptionedImages(data, image_column, caption_column, where)
    images.load_captions()
    for i, caption in enumerate(images.captions):
        if not _has_text(caption):
            raise ConfigError(f"image {i} of {where} has no caption in column '{caption_column}': "
                              "give every image a caption (empty captions are not allowed)")
    return images


def _has_text(caption) -> bool:
    if isinstance(caption, str):
        return bool(caption.strip())
    if isinstance(caption, (list, tuple)):
        return any(isinstance(c, str) and c.strip() for c in caption)
    return False


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _check_image_folder(folder: str) -> None:
    """An imagefolder needs images and a metadata file with captions; say which is missing."""
    has_image = has_metadata = False
    for _, _, files in os.walk(folder):
        for name in files:
            lower = name.lower()
            has_image |= lower.endswith(IMAGE_SUFFIXES)
            has_metadata |= lower in ("metadata.jsonl", "metadata.csv", "metadata.parquet")
    if not has_image:
        raise ConfigError(f"--train_data_dir {folder} contains no images "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    if not has_metadata:
        raise ConfigError(f"--train_data_dir {folder} has no metadata.jsonl: add one line per image, "
                          'e.g. {"file_name": "0001.png", "text": "a caption"}')
