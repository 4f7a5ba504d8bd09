"""Captioned image data sets, whatever layout the user brings.

- Hugging Face datasets: a hub name (`--dataset_name`), a folder saved with `save_to_disk`, or an
  imagefolder (`--train_data_dir` with metadata.jsonl/csv/parquet).
- A plain folder of images with same-name caption files (`a/b/0001.png` + `a/b/0001.txt`,
  nested folders included), the layout most community trainers use.
- A folder of images sharing one prompt (DreamBooth's instance and class images).
- TensorFlow Datasets: `--dataset_name tfds:NAME[/CONFIG][:SPLIT]` (+ `--tfds_data_dir`), a
  prepared array_record data set read with random access, without TensorFlow.

Everything is checked when the data set is opened, before any model is compiled: the columns
exist, there are images, every image has a caption (unless empty captions are allowed).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional

from PIL import Image

from sdjax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_SUFFIXES = (".txt", ".caption")


class CaptionedImages:
    """Random access to images (PIL) and their captions (a string or a list of strings)."""

    where: str
    captions: list

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def caption(self, index: int):
        return self.captions[int(index)]

    def name(self, index: int) -> str:
        """How to name sample `index` in a message (a file path where there is one)."""
        return f"image {int(index)} of {self.where}"

    def contents(self) -> list:
        """One string per sample that changes when its image does and is the same on every
        host holding a copy of the data (no absolute paths, no modification times)."""
        return [f"{getattr(self, 'identity', '')}#{i}" for i in range(len(self))]


class HFImages(CaptionedImages):
    def __init__(self, dataset, image_column: str, caption_column: str, where: str):
        self.dataset = dataset
        self.image_column = image_column
        self.where = where
        self.captions = dataset[caption_column]  # text is small; images are read on demand

    def image(self, index: int) -> Image.Image:
        return self.dataset[int(index)][self.image_column]

    def contents(self) -> list:
        """Read from the Arrow column without decoding: the embedded bytes (size and sampled
        digest), or for an imagefolder the file it points to. The dataset's own fingerprint
        is not used: for local files it includes their modification times."""
        column = self.dataset.features.get(self.image_column)
        if type(column).__name__ != "Image":
            return [f"{self.dataset._fingerprint}#{i}" for i in range(len(self))]
        table = self.dataset.with_format("arrow")
        found = []
        for start in range(0, len(self), 1024):
            values = table[start:start + 1024].column(self.image_column).combine_chunks()
            data, paths = values.field("bytes"), values.field("path")
            for i in range(len(values)):
                blob = data[i].as_buffer() if data[i].is_valid else None
                if blob is not None:
                    found.append(sampled_digest(memoryview(blob)))
                else:
                    found.append(file_identity(paths[i].as_py(), self.where))
        return found


class TFDSImages(CaptionedImages):
    """A prepared TFDS data set through `tfds.data_source` (random access, no TensorFlow).
    Images come undecoded and are decoded here, like every other source's (PIL)."""

    def __init__(self, source, image_column: str, captions: list, where: str):
        self.source = source
        self.image_column = image_column
        self.captions = captions
        self.where = where
        info = getattr(source, "dataset_info", None)
        self.identity = f"tfds:{getattr(info, 'full_name', where)}:{getattr(source, 'split', '')}"

    def image(self, index: int) -> Image.Image:
        import io

        value = self.source[int(index)][self.image_column]
        if isinstance(value, bytes):
            return Image.open(io.BytesIO(value))
        return Image.fromarray(value)


class FolderImages(CaptionedImages):
    def __init__(self, paths: list, captions: list, where: str):
        self.paths = paths
        self.captions = captions
        self.where = where

    def image(self, index: int) -> Image.Image:
        image = Image.open(self.paths[int(index)])
        image.load()
        return image

    def name(self, index: int) -> str:
        return self.paths[int(index)]

    def contents(self) -> list:
        return [file_identity(path, self.where) for path in self.paths]

    def first(self, count: int) -> "FolderImages":
        """The first `count` images (diffusers' DreamBooth reads at most --num_class_images)."""
        return FolderImages(self.paths[:count], self.captions[:count], self.where)


_SAMPLE = 1 << 16


def sampled_digest(data) -> str:
    """Size and a digest of the first and last 64 KiB: cheap for any data set size, and an
    edited or re-encoded image changes it."""
    size = len(data)
    head = bytes(data[:_SAMPLE])
    tail = bytes(data[max(_SAMPLE, size - _SAMPLE):])
    return f"{size}:{hashlib.blake2b(head + tail, digest_size=10).hexdigest()}"


def file_identity(path: str, root: str) -> str:
    """The file's path below `root` (the same for every copy of the data) and its content."""
    relative = os.path.relpath(path, root) if root and os.path.isdir(root) else os.path.basename(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SAMPLE)
            f.seek(max(_SAMPLE, size - _SAMPLE))
            tail = f.read(_SAMPLE)
    except OSError:
        return f"{relative}|unreadable"
    digest = hashlib.blake2b(head + tail, digest_size=10).hexdigest()
    return f"{relative}|{size}:{digest}"


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json"))
        and os.path.isfile(os.path.join(path, "dataset_info.json")))


def _load_hf(dataset_name: Optional[str], dataset_config_name: Optional[str],
             train_data_dir: Optional[str], cache_dir: Optional[str]):
    import datasets

    datasets.disable_progress_bars()
    where = dataset_name or train_data_dir
    try:
        if dataset_name and os.path.isdir(dataset_name) and _is_saved_dataset(dataset_name):
            data = datasets.load_from_disk(dataset_name)
        elif dataset_name:
            data = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        else:
            data = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types; the user needs the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load the data set {where}: {first}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"data set {where} has no 'train' split (it has {', '.join(data)})")
        data = data["train"]
    return data


def _walk_images(folder: str) -> tuple:
    """(sorted image paths, whether a metadata file is present) under `folder`, recursively."""
    images, has_metadata = [], False
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            lower = name.lower()
            if lower.endswith(IMAGE_SUFFIXES):
                images.append(os.path.join(root, name))
            has_metadata |= lower in METADATA_FILES
    return images, has_metadata


def _read_caption_file(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    if len(lines) > 1:
        return lines  # several captions: one is picked at random per sample
    return lines[0] if lines else ""


def _open_folder(folder: str, images: list, caption_extension: Optional[str],
                 allow_empty_captions: bool) -> FolderImages:
    suffixes = (caption_extension,) if caption_extension else CAPTION_SUFFIXES
    suffixes = tuple(s if s.startswith(".") else "." + s for s in suffixes)
    captions = []
    for path in images:
        stem = os.path.splitext(path)[0]
        found = next((stem + s for s in suffixes if os.path.isfile(stem + s)), None)
        if found is None and not allow_empty_captions:
            raise ConfigError(f"{path} has no caption file ({' or '.join(stem + s for s in suffixes)}): "
                              "add one, or pass --allow_empty_captions to train it unconditioned")
        captions.append(_read_caption_file(found) if found else "")
    return FolderImages(images, captions, folder)


def open_image_folder(folder: str, prompt: str, flag: str) -> FolderImages:
    """The images directly in `folder` (not its sub-folders, like diffusers' DreamBooth), sorted,
    every one captioned `prompt`: DreamBooth's instance or class images. `flag` names the
    option the folder came from, for the message."""
    if not os.path.exists(folder):
        raise ConfigError(f"{flag} {folder} does not exist")
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {folder} is not a folder")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, name)))
    if not paths:
        raise ConfigError(f"{flag} {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return FolderImages(paths, [prompt] * len(paths), folder)


TFDS_PREFIX = "tfds:"


def parse_tfds_name(spec: str) -> tuple:
    """'tfds:NAME[/CONFIG][:SPLIT]' -> ('NAME[/CONFIG]', SPLIT); the split defaults to train."""
    rest = spec[len(TFDS_PREFIX):]
    name, _, split = rest.partition(":")
    if not name or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ConfigError(f"--dataset_name {spec}: write tfds:NAME, tfds:NAME/CONFIG or "
                          "tfds:NAME/CONFIG:SPLIT (e.g. tfds:coco_captions:train[:90%])")
    return name, split or "train"


def _caption_text(value):
    """TFDS text comes as bytes, several captions as a list (or array) of them."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_caption_text(v) for v in value]
    return value


def _nested(record: dict, column: str):
    """`column` of a record; 'captions/text' reaches into nested features."""
    value = record
    for part in column.split("/"):
        if not isinstance(value, dict) or part not in value:
            return KeyError(part)
        value = value[part]
    return value


def _open_tfds(spec: str, data_dir: Optional[str], image_column: str,
               caption_column: str) -> TFDSImages:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError("reading tfds: data sets needs tensorflow-datasets: "
                          "pip install tensorflow-datasets") from None
    name, split = parse_tfds_name(spec)
    where = f"{spec} in {data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')}"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                  decoders={image_column: tfds.decode.SkipDecoding()})
    except NotImplementedError:
        raise ConfigError(f"{where} is stored as tfrecord; sdjax reads TFDS data sets with random "
                          f"access, which needs array_record: prepare it again with `tfds build "
                          f"{name} --file_format=array_record`") from None
    except Exception as e:  # tfds raises many types; its messages run to hundreds of lines
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if type(e).__name__ == "DatasetNotFoundError" or "not found" in first.lower():
            first = f"no prepared data set {name} (give --tfds_data_dir, or `tfds build {name} --file_format=array_record`)"
        raise ConfigError(f"cannot open the TFDS data set {where}: {first[:300]}") from None
    if len(source) == 0:
        raise ConfigError(f"the TFDS data set {where} has no images")
    first = source[0]
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if isinstance(_nested(first, column), KeyError):
            raise ConfigError(f"{flag} '{column}' is not a feature of {where}; its features are "
                              f"{', '.join(_feature_names(first))}")
    captions = []
    for start in range(0, len(source), 256):  # one pass over the records; images stay encoded
        records = source.__getitems__(list(range(start, min(start + 256, len(source)))))
        captions += [_caption_text(_nested(r, caption_column)) for r in records]
    return TFDSImages(source, image_column, captions, where)


def _feature_names(record: dict, prefix: str = "") -> list:
    names = []
    for key, value in record.items():
        names += (_feature_names(value, f"{prefix}{key}/") if isinstance(value, dict)
                  else [prefix + key])
    return names


def open_dataset(dataset_name=None, dataset_config_name=None, train_data_dir=None,
                 image_column="image", caption_column="text", max_train_samples=None,
                 cache_dir=None, seed: int = 0, caption_extension: Optional[str] = None,
                 allow_empty_captions: bool = False,
                 tfds_data_dir: Optional[str] = None) -> CaptionedImages:
    if dataset_name and dataset_name.startswith(TFDS_PREFIX):
        data = _open_tfds(dataset_name, tfds_data_dir, image_column, caption_column)
    elif train_data_dir and not dataset_name:
        paths, has_metadata = _walk_images(train_data_dir)
        if not paths:
            raise ConfigError(f"--train_data_dir {train_data_dir} contains no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        if has_metadata:
            data = _hf_images(_load_hf(None, None, train_data_dir, cache_dir), image_column,
                              caption_column, train_data_dir)
        else:
            data = _open_folder(train_data_dir, paths, caption_extension, allow_empty_captions)
    else:
        data = _hf_images(_load_hf(dataset_name, dataset_config_name, None, cache_dir),
                          image_column, caption_column, dataset_name)
    if max_train_samples is not None and max_train_samples < len(data):
        data = _subset(data, max_train_samples, seed)
    if not allow_empty_captions:
        for i, caption in enumerate(data.captions):
            if not _has_text(caption):
                raise ConfigError(f"{data.name(i)} has no caption: give every image a caption, or "
                                  "pass --allow_empty_captions")
    return data


def _hf_images(data, image_column, caption_column, where) -> HFImages:
    columns = list(data.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ConfigError(f"{flag} '{column}' is not a column of {where}; its columns are "
                              f"{', '.join(columns)}")
    if len(data) == 0:
        raise ConfigError(f"the data set {where} has no images")
    return HFImages(data, image_column, caption_column, where)


def _subset(data: CaptionedImages, count: int, seed: int) -> CaptionedImages:
    """`count` samples picked by a seeded shuffle, as diffusers' --max_train_samples does."""
    import numpy as np

    keep = [int(i) for i in np.random.default_rng(seed).permutation(len(data))[:count]]
    if isinstance(data, TFDSImages):
        return _Subset(data, keep)
    if isinstance(data, HFImages):
        subset = HFImages.__new__(HFImages)
        subset.dataset, subset.image_column, subset.where = (data.dataset.select(keep),
                                                              data.image_column, data.where)
        subset.captions = [data.captions[i] for i in keep]
        return subset
    return FolderImages([data.paths[i] for i in keep], [data.captions[i] for i in keep], data.where)


def _has_text(caption) -> bool:
    if isinstance(caption, str):
        return bool(caption.strip())
    if isinstance(caption, (list, tuple)):
        return any(isinstance(c, str) and c.strip() for c in caption)
    return False


class _Subset(CaptionedImages):
    """Some samples of another source, by index."""

    def __init__(self, data: CaptionedImages, keep: list):
        self.data, self.keep = data, keep
        self.captions = [data.captions[i] for i in keep]
        self.where = data.where

    def image(self, index: int) -> Image.Image:
        return self.data.image(self.keep[int(index)])

    def name(self, index: int) -> str:
        return self.data.name(self.keep[int(index)])

    def contents(self) -> list:
        inner = self.data.contents()
        return [inner[i] for i in self.keep]
