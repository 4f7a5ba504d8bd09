"""The latent and text-embedding cache on disk: its layout, its key, and reading it.

A cache folder holds, for every training image, the VAE's latent distribution (mean and std,
in the dtype the VAE ran in) of the image as the trainer would crop it -- both orientations
when `--random_flip` is on, so flipping stays a per-sample coin toss -- and the text encoder's
output for every distinct caption (plus the empty one, for caption dropout).

    manifest.json                        key, shapes, dtype; written last: no manifest, no cache
    samples.npy                          (N, 3) int64: group, host, row of every sample
    captions.json                        the distinct captions, in row order of the text shards
    latents-WxH-hostNNN.npy              (rows, views, 2, C, h, w): mean and std per view
    latents-WxH-hostNNN.sources.npy      (rows,) the image each row was read from
    text-hostNNN.npy                     (rows, tokens, width)

Every host encodes its rows of each global batch and writes its own files, so the folder must
be shared by all hosts (one machine, NFS, a mounted bucket). The layout is a pure function of
(group sizes, global rows, hosts), so any host finds any row without asking the others.
bfloat16 is stored as its raw 16 bits (numpy has no bfloat16 of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from sdjax.errors import ConfigError

FORMAT = "sdjax-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"


class CacheMismatch(ConfigError):
    """The cache on disk was built from something else than this run asks for."""


# --- identity --------------------------------------------------------------------------------

def fingerprint_tree(tree) -> str:
    """A digest of a parameter tree's names, shapes, dtypes and values."""
    import jax

    digest = hashlib.blake2b(digest_size=12)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def data_fingerprint(images) -> str:
    """A digest of the data set: every image's content identity (its path below the data
    folder, size and sampled bytes: the same on every host holding a copy of the files, also
    when their modification times differ) and every caption."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{getattr(images, 'identity', '')};".encode())
    for content, caption in zip(images.contents(), images.captions):
        digest.update(f"{content}|{json.dumps(caption)};".encode())
    return digest.hexdigest()


def distinct_captions(images) -> list:
    """Every caption a sample can get (all options of multi-caption images, and the empty
    prompt of caption dropout), sorted."""
    found = {""}
    for caption in images.captions:
        if isinstance(caption, str):
            found.add(caption)
        else:
            found.update(c for c in caption if isinstance(c, str))
    return sorted(found)


def describe_key(key: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in key.items())


# --- layout ----------------------------------------------------------------------------------

def latent_file(size: tuple, host: int) -> str:
    return f"latents-{size[0]}x{size[1]}-host{host:03d}.npy"


def sources_file(size: tuple, host: int) -> str:
    return latent_file(size, host)[:-len(".npy")] + ".sources.npy"


def text_file(host: int) -> str:
    return f"text-host{host:03d}.npy"


def padded_chunks(items: np.ndarray, global_rows: int) -> np.ndarray:
    """`items` cut into (chunks, global_rows), the last chunk padded by repeating its first item
    (padding rows are encoded and written but never read)."""
    chunks = -(-len(items) // global_rows)
    padded = np.full(chunks * global_rows, items[0] if len(items) else 0, np.int64)
    padded[:len(items)] = items
    return padded.reshape(chunks, global_rows)


def placement(count: int, global_rows: int, hosts: int) -> tuple:
    """(host, row in that host's file) of items 0..count-1 of a job cut into global batches."""
    rows = global_rows // hosts
    position = np.arange(count)
    chunk, column = divmod(position, global_rows)
    return column // rows, chunk * rows + column % rows


def host_rows(chunk: np.ndarray, host: int, hosts: int) -> np.ndarray:
    rows = len(chunk) // hosts
    return chunk[host * rows:(host + 1) * rows]


# --- storage dtype -----------------------------------------------------------------------------

def to_storage(array: np.ndarray) -> np.ndarray:
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16)
    return array


def from_storage(array: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "bfloat16":
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


def write_json(path: str, data) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)


# --- reading ---------------------------------------------------------------------------------

class LatentCache:
    """Random access to a finished cache: `latent(index, view)`, `embeddings(captions)`."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.dtype = manifest["dtype"]
        self.views = manifest["views"]
        self.sizes = [tuple(s) for s in manifest["sizes"]]
        self.samples = np.load(os.path.join(directory, "samples.npy"))
        self._latents, self._sources = {}, {}
        for g in np.unique(self.samples[:, 0]):
            size = self.sizes[int(g)]
            for host in range(manifest["hosts"]):
                self._latents[g, host] = self._open(latent_file(size, host))
                self._sources[g, host] = np.load(os.path.join(directory, sources_file(size, host)))
        with open(os.path.join(directory, "captions.json")) as f:
            captions = json.load(f)
        self._caption_row = {c: i for i, c in enumerate(captions)}
        text_host, text_row = placement(len(captions), manifest["global_rows"], manifest["hosts"])
        self._text_place = (text_host, text_row)
        self._text = [self._open(text_file(host)) for host in range(manifest["hosts"])]

    def _open(self, name: str) -> np.ndarray:
        return from_storage(np.load(os.path.join(self.directory, name), mmap_mode="r"), self.dtype)

    @classmethod
    def open(cls, directory: str, key: dict) -> Optional["LatentCache"]:
        """The cache in `directory` if it is complete and was built for `key`; None if there is
        none (or only an unfinished one); CacheMismatch if it was built for something else."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CacheMismatch(f"{directory} is not an sdjax {VERSION} latent cache: pass "
                                "--rebuild_cache to replace it, or choose another --latent_cache_dir")
        check_key(manifest["key"], key, directory)
        return cls(directory, manifest)

    def __len__(self) -> int:
        return len(self.samples)

    def latent(self, index: int, view: int) -> tuple:
        """(mean and std stacked, shape (2, C, h, w); the image they were encoded from)."""
        group, host, row = (int(v) for v in self.samples[int(index)])
        return (np.asarray(self._latents[group, host][row, view]),
                int(self._sources[group, host][row]))

    def embeddings(self, captions: list) -> np.ndarray:
        rows = [self._caption_row[c] for c in captions]
        hosts, places = self._text_place
        return np.stack([np.asarray(self._text[hosts[r]][places[r]]) for r in rows])


def check_key(built: dict, wanted: dict, directory: str) -> None:
    changed = [name for name in sorted(set(built) | set(wanted)) if built.get(name) != wanted.get(name)]
    if changed:
        was = ", ".join(f"{n}={built.get(n)}" for n in changed)
        now = ", ".join(f"{n}={wanted.get(n)}" for n in changed)
        raise CacheMismatch(f"the latent cache in {directory} was built with {was}, but this run "
                            f"has {now}: pass --rebuild_cache to rebuild it, or choose another "
                            "--latent_cache_dir")
