"""Streaming Hugging Face data sets (`--streaming`): for sets too large for local disk.

The set is read as a stream (`load_dataset(..., streaming=True)`), reshuffled every epoch
through a buffer (`--shuffle_buffer_size`, seeded by seed and epoch), and split among hosts
with `datasets.distributed.split_dataset_by_node`, so hosts read disjoint shares. Each host
reads its share epoch after epoch without pause: a step may span two epochs, and nothing is
dropped at an epoch's end. Images arrive undecoded and are decoded here like every other
source's; a record that cannot be decoded is replaced by another sample of its micro-batch,
so each step still consumes exactly k x rows records per host.

Resume is exact: the position is the number of records each host has consumed (the same on
every host, step x k x rows), and the resumed run replays its share of the stream up to there,
reading but not decoding the records it skips.
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
from PIL import Image

from sdjax.data.loader import DECODE_ERRORS, Loader, choose_caption, transform_image
from sdjax.errors import ConfigError

log = logging.getLogger("sdjax")

DEFAULT_MAX_BAD_IMAGES = 100  # the length of a stream is unknown: a count, not a fraction


def open_stream(dataset_name: Optional[str], dataset_config_name: Optional[str],
                train_data_dir: Optional[str], image_column: str, caption_column: str,
                cache_dir: Optional[str] = None):
    """The training split as an IterableDataset with undecoded images; columns checked."""
    import datasets

    datasets.disable_progress_bars()
    where = dataset_name or train_data_dir
    try:
        if dataset_name:
            stream = datasets.load_dataset(dataset_name, dataset_config_name, split="train",
                                           streaming=True, cache_dir=cache_dir)
        else:
            stream = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split="train",
                                           streaming=True, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types; the user needs the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot stream the data set {where}: {first}") from None
    columns = list(stream.features or {}) or list(next(iter(stream)).keys())
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ConfigError(f"{flag} '{column}' is not a column of {where}; its columns are "
                              f"{', '.join(columns)}")
    if isinstance((stream.features or {}).get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream, where


def _decode(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


class StreamLoader(Loader):
    """Loader over this host's share of a stream; the same batches, seeds and prefetch as
    Loader, with the sample order coming from the stream instead of a permutation."""

    def __init__(self, stream, where: str, image_column: str, caption_column: str, tokenizer, *,
                 global_batch: int, accumulation_steps: int, process_index: int,
                 process_count: int, seed: int, resolution: int, center_crop: bool,
                 random_flip: bool, num_workers: int = 0, prefetch: int = 2,
                 interpolation: str = "lanczos", caption_dropout_probability: float = 0.0,
                 max_bad_images: Optional[int] = None, shuffle_buffer_size: int = 1000):
        from datasets.distributed import split_dataset_by_node

        if global_batch % process_count:
            raise ValueError("the global batch must divide evenly among hosts")
        self.where = where
        self.image_column, self.caption_column = image_column, caption_column
        self.tokenizer = tokenizer
        self.global_batch, self.k = global_batch, accumulation_steps
        self.rows = global_batch // process_count
        self.first_row = process_index * self.rows
        self.seed = seed
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.workers = max(1, num_workers or 4)
        self.prefetch = prefetch
        self.interpolation = interpolation
        self.caption_dropout = caption_dropout_probability
        self.max_bad_images = DEFAULT_MAX_BAD_IMAGES if max_bad_images is None else max_bad_images
        self.bad_count = 0
        self.buckets, self.cache = None, None
        self.cached_text, self.text_embeddings = True, None
        self.batches_per_epoch = None  # unknown for a stream
        shuffled = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.share = split_dataset_by_node(shuffled, rank=process_index, world_size=process_count)
        self._records = None

    @property
    def steps_per_epoch(self):
        return None

    def records(self, skip: int = 0):
        """This host's records, epoch after epoch, after the first `skip`."""
        epoch, seen = 0, 0
        while True:
            self.share.set_epoch(epoch)
            count = 0
            for record in self.share:
                count += 1
                if seen < skip:
                    seen += 1
                    continue
                yield record
            if count == 0:
                raise ConfigError(f"this host's share of the stream {self.where} is empty: use "
                                  "fewer hosts or a data set with more records")
            epoch += 1

    def _decode_sample(self, position: int, record: dict):
        rng = np.random.default_rng([self.seed, 1, position])
        try:
            pixels = transform_image(_decode(record[self.image_column]), self.resolution,
                                     self.center_crop, self.random_flip, rng, self.interpolation)
        except DECODE_ERRORS as e:
            return None, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return pixels, choose_caption(record[self.caption_column], rng, self.caption_dropout)

    def _stream_micro_batch(self, pool, micro_batch: int) -> dict:
        records = [next(self._records) for _ in range(self.rows)]
        first = micro_batch * self.global_batch + self.first_row
        samples = list(pool.map(lambda a: self._decode_sample(first + a[0], a[1]),
                                enumerate(records)))
        good = [s for s in samples if s[0] is not None]
        for s in samples:
            if s[0] is None:
                self.bad_count += 1
                log.warning("skipped an unreadable image in %s: %s (%d skipped so far)",
                            self.where, s[1], self.bad_count)
                if self.bad_count > self.max_bad_images:
                    raise ConfigError(f"{self.bad_count} unreadable images in {self.where} (more "
                                      f"than --max_bad_images={self.max_bad_images})")
        if not good:
            raise ConfigError(f"a whole micro-batch of {self.where} is unreadable")
        # An unreadable record is stood in for by a readable sample of the same micro-batch.
        samples = [s if s[0] is not None else good[i % len(good)] for i, s in enumerate(samples)]
        return {"pixel_values": np.stack([p for p, _ in samples]),
                "input_ids": self.tokenize([c for _, c in samples])}

    def step_batch(self, pool, step: int) -> dict:
        parts = [self._stream_micro_batch(pool, step * self.k + j) for j in range(self.k)]
        return {name: np.stack([part[name] for part in parts]) for name in parts[0]}

    def iterate(self, start_step: int):
        self._records = self.records(start_step * self.k * self.rows)
        return super().iterate(start_step)
