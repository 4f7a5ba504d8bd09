"""Per-host batches: a deterministic sample order, image transforms, tokenization, prefetch.

The order of samples is a pure function of (seed, position): epoch e is the permutation
`default_rng([seed, e])` of the epoch's samples, cut into global micro-batches (the last partial
one is dropped); each host takes its own contiguous rows of every global micro-batch, so no
sample is read by two hosts and a resumed run continues at exactly the sample it stopped at.
Random crop, flip and caption choice are seeded by the sample's global position, so they do not
depend on how many hosts or workers there are.

An epoch has as many samples as the data set, or more where a DreamBooth run asks for them
(`repeat_to`, or more class images than instance images): sample v reads image v % len(images),
and with class images (prior preservation) also class image v % len(prior), as diffusers'
DreamBoothDataset pairs them.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps

from sdjax.data.buckets import BucketPlan
from sdjax.data.sources import CaptionedImages
from sdjax.errors import ConfigError

log = logging.getLogger("sdjax")

INTERPOLATION = {
    "lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
# What a broken file raises when PIL (or datasets through PIL) decodes it.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation) 8-bit RGB from any mode: L, P, RGBA/LA (on white), CMYK,
    16-bit and 32-bit grey."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def transform_image(image: Image.Image, resolution, center_crop: bool, random_flip: bool,
                    rng: np.random.Generator, interpolation: str = "lanczos") -> np.ndarray:
    """Scale to cover `resolution` (a side, or (width, height) of a bucket), crop to it, optional
    flip -> uint8 (height, width, 3), as decoded: the step makes it [-1, 1] on the device
    (`sdjax.models.vae.normalize_pixels`). For a square size this is diffusers' shorter-side
    resize."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    image = to_rgb(image)
    w, h = image.size
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    image = image.resize(size, INTERPOLATION[interpolation])
    w, h = image.size
    if center_crop:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left, top = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
    image = image.crop((left, top, left + width, top + height))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # 6x faster than numpy's
    return np.asarray(image, np.uint8)


def choose_caption(caption, rng: np.random.Generator, dropout: float) -> str:
    """One of several captions at random (as diffusers does), or the empty prompt with
    probability `dropout` (for classifier-free guidance)."""
    if not isinstance(caption, str):
        options = [c for c in caption if isinstance(c, str) and c.strip()] or [""]
        caption = options[int(rng.integers(len(options)))]
    if dropout and rng.random() < dropout:
        caption = ""
    return caption


def tokenize(tokenizer, texts: list) -> np.ndarray:
    """Token ids (len(texts), model_max_length) int32: padded, and truncated like diffusers."""
    return tokenizer(texts, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length,
                     return_tensors="np").input_ids.astype(np.int32)


class Loader:
    """Yields this host's part of each optimizer step's batch: arrays shaped (k, rows, ...);
    images as uint8 (k, rows, height, width, 3).

    With a latent cache the images are not read: the cached latent moments of the sample (in
    the orientation its flip draw picks) and the cached embedding of its caption are.

    With class images (`prior`) each of the host's rows is a pair, an instance sample followed
    by its class sample, so arrays are shaped (k, 2 * rows, ...) and a pair never straddles two
    devices; `prior_mask` (k, 2 * rows) is 1.0 on the class rows."""

    def __init__(self, images: CaptionedImages, tokenizer, *, global_batch: int,
                 accumulation_steps: int, process_index: int, process_count: int, seed: int,
                 resolution: int, center_crop: bool, random_flip: bool, num_workers: int = 0,
                 prefetch: int = 2, interpolation: str = "lanczos",
                 caption_dropout_probability: float = 0.0, max_bad_images: Optional[int] = None,
                 buckets: Optional[BucketPlan] = None, cache=None,
                 prior: Optional[CaptionedImages] = None, repeat_to: int = 0):
        if global_batch % process_count:
            raise ValueError("the global batch must divide evenly among hosts")
        if buckets is not None and (prior is not None or repeat_to > len(images)):
            raise ValueError("buckets do not work with class images or repeat_to")
        self.images = images
        self.tokenizer = tokenizer
        self.global_batch = global_batch
        self.k = accumulation_steps
        self.rows = global_batch // process_count
        self.first_row = process_index * self.rows
        self.seed = seed
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.workers = max(1, num_workers or 4)
        self.prefetch = prefetch
        self.interpolation = interpolation
        self.caption_dropout = caption_dropout_probability
        self.prior = prior  # DreamBooth class images, for prior preservation
        prior_count = len(prior) if prior is not None else 0
        # Unreadable files are skipped (a neighbour stands in) up to this many, then the run stops.
        self.max_bad_images = (max(1, (len(images) + prior_count) // 100) if max_bad_images is None
                               else max_bad_images)
        self.bad_images: dict = {}  # index in `images` -> why it was skipped
        self.bad_prior_images: dict = {}  # index in `prior` -> why it was skipped
        self._bad_lock = threading.Lock()
        self.epoch_length = max(len(images), prior_count, repeat_to)
        self.batches_per_epoch = self.epoch_length // global_batch
        self.buckets = buckets
        self.cache = cache  # a LatentCache: batches of latent moments and text embeddings
        self.cached_text = True  # False: the cache's latents with token ids (text encoder trained)
        self.text_embeddings = None  # pre-computed caption embeddings (.embeddings(captions))
        self._refuse_prior_with_cache()
        if buckets is not None:
            self._groups = {}
            self.batches_per_epoch = len(self._epoch_groups(0)) * self.k

    @property
    def supplies_text_embeddings(self) -> bool:
        """Whether batches carry text embeddings instead of token ids."""
        return (self.cache is not None and self.cached_text) or self.text_embeddings is not None

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.k

    def _refuse_prior_with_cache(self) -> None:
        """The trainer refuses the flags with a message first; the cache is set after __init__,
        so this runs again before each batch."""
        if self.prior is not None and self.cache is not None:
            raise ValueError("a latent cache does not work with class images")

    def _epoch_groups(self, epoch: int) -> list:
        if epoch not in self._groups:
            self._groups = {epoch: self.buckets.epoch_groups(self.seed, epoch,
                                                             self.k * self.global_batch)}
        return self._groups[epoch]

    def step_plan(self, step: int) -> tuple:
        """((width, height), this host's data set indices shaped (k, rows)) of step `step`."""
        if self.buckets is None:
            size = (self.resolution, self.resolution)
            return size, np.stack([self.sample_indices(step * self.k + j) for j in range(self.k)])
        epoch, g = divmod(step, self.batches_per_epoch // self.k)
        bucket, indices = self._epoch_groups(epoch)[g]
        rows = indices.reshape(self.k, self.global_batch)[:, self.first_row:self.first_row + self.rows]
        return self.buckets.sizes[bucket], rows

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.epoch_length)

    def virtual_indices(self, micro_batch: int) -> np.ndarray:
        """Epoch sample numbers v of this host's rows of global micro-batch `micro_batch`: each
        reads image v % len(images) (and class image v % len(prior))."""
        epoch, b = divmod(micro_batch, self.batches_per_epoch)
        start = b * self.global_batch + self.first_row
        return self._order(epoch)[start:start + self.rows]

    def sample_indices(self, micro_batch: int) -> np.ndarray:
        """Data set indices of this host's rows of global micro-batch number `micro_batch`."""
        return self.virtual_indices(micro_batch) % len(self.images)

    def prior_indices(self, micro_batch: int) -> np.ndarray:
        """Class image indices paired with this host's rows of `micro_batch`."""
        return self.virtual_indices(micro_batch) % len(self.prior)

    def read_pixels(self, index: int, size: tuple, rng: np.random.Generator,
                    random_flip: Optional[bool] = None, source: Optional[CaptionedImages] = None
                    ) -> tuple:
        """(the image read, its transformed pixels): image `index` of `source` (the instance
        images unless given), or the next readable one if it cannot be read."""
        random_flip = self.random_flip if random_flip is None else random_flip
        source = self.images if source is None else source
        bad = self._bad_of(source)
        n = len(source)
        for attempt in range(n):
            candidate = (int(index) + attempt) % n
            if candidate in bad:
                continue
            try:
                image = source.image(candidate)
                return candidate, transform_image(image, size, self.center_crop, random_flip,
                                                  rng, self.interpolation)
            except DECODE_ERRORS as e:
                self._record_bad(source, candidate, e)
        raise ConfigError(f"no readable image in {source.where}")

    def _bad_of(self, source: CaptionedImages) -> dict:
        return self.bad_prior_images if source is self.prior else self.bad_images

    def _record_bad(self, source: CaptionedImages, index: int, error: Exception) -> None:
        """Counts the skipped files of instance and class images together against the limit."""
        bad = self._bad_of(source)
        with self._bad_lock:
            if index in bad:
                return
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            bad[index] = reason
            count = len(self.bad_images) + len(self.bad_prior_images)
        log.warning("skipped unreadable %s: %s (%d skipped so far)", source.name(index),
                    reason, count)
        if count > self.max_bad_images:
            names = [self.images.name(i) for i in list(self.bad_images)[:3]]
            if self.prior is not None:
                names += [self.prior.name(i) for i in list(self.bad_prior_images)[:3]]
            raise ConfigError(f"{count} unreadable images (more than --max_bad_images="
                              f"{self.max_bad_images}), e.g. {', '.join(names[:3])}: fix or "
                              "remove them")

    def _sample(self, micro_batch: int, size: tuple, row: int, index: int):
        position = micro_batch * self.global_batch + self.first_row + row
        rng = np.random.default_rng([self.seed, 1, position])
        if self.cache is None:
            index, data = self.read_pixels(index, size, rng)
        else:
            # The flip coin is the draw transform_image makes (it is its first with a center
            # crop), so a cached run flips the samples an uncached one would.
            view = int(self.random_flip and rng.random() < 0.5)
            data, index = self.cache.latent(index, view)
        return data, choose_caption(self.images.caption(index), rng, self.caption_dropout)

    def _class_sample(self, micro_batch: int, size: tuple, row: int, index: int):
        """Like _sample, from its own random stream: the class image's crop and flip do not
        follow its instance image's."""
        position = micro_batch * self.global_batch + self.first_row + row
        rng = np.random.default_rng([self.seed, 2, position])
        index, data = self.read_pixels(index, size, rng, source=self.prior)
        return data, choose_caption(self.prior.caption(index), rng, self.caption_dropout)

    def _micro_batch(self, pool, micro_batch: int, size: tuple, indices: np.ndarray) -> dict:
        samples = list(pool.map(lambda a: self._sample(micro_batch, size, *a), enumerate(indices)))
        captions = [c for _, c in samples]
        data = np.stack([d for d, _ in samples])
        if self.cache is not None:
            batch = {"latent_mean": data[:, 0], "latent_std": data[:, 1]}
        else:
            batch = {"pixel_values": data}
        return dict(batch, **self._text(captions))

    def _text(self, captions: list) -> dict:
        if self.cache is not None and self.cached_text:
            return {"text_embeddings": self.cache.embeddings(captions)}
        if self.text_embeddings is not None:
            return {"text_embeddings": self.text_embeddings.embeddings(captions)}
        return {"input_ids": self.tokenize(captions)}

    def _paired_micro_batch(self, pool, micro_batch: int, size: tuple) -> dict:
        """Rows [instance 0, class 0, instance 1, class 1, ...] and the mask of class rows."""
        instances = pool.map(lambda a: self._sample(micro_batch, size, *a),
                             enumerate(self.sample_indices(micro_batch)))
        classes = pool.map(lambda a: self._class_sample(micro_batch, size, *a),
                           enumerate(self.prior_indices(micro_batch)))
        samples = [s for pair in zip(list(instances), list(classes)) for s in pair]
        return {"pixel_values": np.stack([d for d, _ in samples]),
                "prior_mask": np.tile(np.array([0.0, 1.0], np.float32), self.rows),
                **self._text([c for _, c in samples])}

    def tokenize(self, captions: list) -> np.ndarray:
        return tokenize(self.tokenizer, captions)

    def step_batch(self, pool, step: int) -> dict:
        """This host's rows of step `step`: pixels and token ids, or cached latent moments and
        text embeddings, each shaped (k, rows, ...); with class images pixels, token ids and
        prior_mask shaped (k, 2 * rows, ...)."""
        self._refuse_prior_with_cache()
        size, indices = self.step_plan(step)
        if self.prior is not None:
            parts = [self._paired_micro_batch(pool, step * self.k + j, size) for j in range(self.k)]
        else:
            parts = [self._micro_batch(pool, step * self.k + j, size, indices[j])
                     for j in range(self.k)]
        return {name: np.stack([part[name] for part in parts]) for name in parts[0]}

    def iterate(self, start_step: int) -> Iterator[dict]:
        """Batches for optimizer steps start_step, start_step + 1, ... built ahead in a thread."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            with ThreadPoolExecutor(self.workers) as pool:
                step = start_step
                while not stop.is_set():
                    try:
                        item = self.step_batch(pool, step)
                    except BaseException as e:  # surfaces in the consumer
                        item = e
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if isinstance(item, BaseException):
                        return
                    step += 1

        thread = threading.Thread(target=produce, daemon=True, name="sdjax-data")
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
