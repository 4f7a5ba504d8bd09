"""Aspect-ratio buckets: a fixed set of training shapes, and each image's place among them.

The shapes are fixed before training (so the number of compiled step programs is bounded by
the number of buckets in use): every (width, height) made of multiples of `step` between
`min_reso` and `max_reso` whose area is at most resolution^2, the largest such height for each
width. An image goes to the bucket whose aspect ratio is closest to its own (in log space, so
2:1 and 1:2 are equally far from 1:1); it is then scaled to cover the bucket and cropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from sdjax.errors import ConfigError


def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list:
    if min_reso > max_reso or step <= 0 or min_reso % 8 or step % 8:
        raise ConfigError("bucket sizes need min_bucket_reso <= max_bucket_reso and multiples of 8 "
                          "for min_bucket_reso and bucket_reso_steps")
    max_area = resolution * resolution
    sizes = set()
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
    if not sizes:
        raise ConfigError(f"no bucket fits: with --resolution={resolution} every size between "
                          f"{min_reso} and {max_reso} is too large; lower --min_bucket_reso")
    return sorted(sizes)


@dataclasses.dataclass
class BucketPlan:
    sizes: list           # (width, height) per bucket
    assignment: np.ndarray  # bucket index per image

    @classmethod
    def build(cls, image_sizes: list, resolution: int, min_reso: int, max_reso: int,
              step: int) -> "BucketPlan":
        sizes = bucket_sizes(resolution, min_reso, max_reso, step)
        ratios = np.log([w / h for w, h in sizes])
        assignment = np.array([int(np.argmin(np.abs(ratios - math.log(w / h))))
                               for w, h in image_sizes], np.int32)
        return cls(sizes, assignment)

    def used(self) -> dict:
        """{(width, height): number of images} for the buckets that hold images."""
        counts = np.bincount(self.assignment, minlength=len(self.sizes))
        return {self.sizes[b]: int(c) for b, c in enumerate(counts) if c}

    def write_log(self, path: str, names: list) -> None:
        """One line per image with its bucket, written once per run."""
        from sdjax import storage

        lines = []
        for name, bucket in zip(names, self.assignment):
            w, h = self.sizes[bucket]
            lines.append(json.dumps({"image": name, "width": w, "height": h}) + "\n")
        storage.write_text(path, "".join(lines))

    def epoch_groups(self, seed: int, epoch: int, group: int) -> list:
        """This epoch's (bucket, indices) groups of `group` images each: every bucket's images
        shuffled and cut into whole groups (the rest waits for another epoch's shuffle), then
        the groups of all buckets shuffled together."""
        rng = np.random.default_rng([seed, epoch, 7])
        groups = []
        for bucket in range(len(self.sizes)):
            members = rng.permutation(np.flatnonzero(self.assignment == bucket))
            for start in range(0, len(members) - group + 1, group):
                groups.append((bucket, members[start:start + group]))
        order = rng.permutation(len(groups))
        return [groups[i] for i in order]


def image_sizes(images) -> list:
    """(width, height) of every image, upright, read from headers where the source has files."""
    from PIL import Image

    sizes = []
    for i in range(len(images)):
        path = images.name(i)
        try:
            image = Image.open(path) if os.path.isfile(path) else images.image(i)
            w, h = image.size
            if _rotated(image):
                w, h = h, w
        except Exception:  # unreadable files are dealt with (skipped) when they are loaded
            w, h = 1, 1
        sizes.append((w, h))
    return sizes


def _rotated(image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False
