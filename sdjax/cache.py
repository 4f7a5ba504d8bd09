"""Building the latent and text-embedding cache: `train_flax.py cache` and `--cache_latents`.

The data set goes once through the VAE (and every distinct caption once through the text
encoder) on all devices of all hosts, batch-sharded like the train step; each host reads and
writes its own rows (layout in sdjax/data/latent_cache.py). The manifest is written last, after
all hosts are done, so an interrupted build is never used: the next run builds again.

Crop: with --center_crop the cache holds exactly what an uncached run would see. With a random
crop, each image's crop is drawn once when the cache is built (from the seed and the image), so
every epoch sees that crop; the run says so. Flip: both orientations are cached and each sample
still tosses its coin.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.data import latent_cache as lc
from sdjax.errors import ConfigError
from sdjax.models.vae import normalize_pixels
from sdjax.parallel import (batch_sharded, global_batch, hosts_agree, local_rows, replicate,
                            replicated, sync_hosts)


def cache_directory(cfg) -> str:
    return cfg.latent_cache_dir or os.path.join(cfg.output_dir, "latent_cache")


def _tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return f"{hashlib.blake2b(vocab, digest_size=8).hexdigest()}/{tokenizer.model_max_length}"


def cache_key(cfg, sd, images) -> dict:
    """Everything that decides what the cache holds; a change to any of it invalidates it."""
    return {
        "vae_weights": lc.fingerprint_tree(sd.params["vae"]),
        "text_encoder_weights": lc.fingerprint_tree(sd.params["text_encoder"]),
        "tokenizer": _tokenizer_identity(sd.tokenizer),
        "data": lc.data_fingerprint(images),
        "images": len(images),
        "resolution": cfg.resolution,
        "crop": "center" if cfg.center_crop else f"random, drawn once (seed {cfg.run_seed})",
        "random_flip": bool(cfg.random_flip),
        "interpolation": cfg.image_interpolation_mode,
        "buckets": (f"{cfg.min_bucket_reso}-{cfg.max_bucket_reso} step {cfg.bucket_reso_steps}"
                    if cfg.enable_bucket else "off"),
        "dtype": cfg.compute_dtype_name,
    }


def open_or_build(cfg, sd, images, loader, buckets, mesh, is_main: bool, rebuild: bool = False):
    """The cache for this run: reused when it matches, built when there is none (or when
    `rebuild`), refused with a message naming what changed otherwise."""
    directory = cache_directory(cfg)
    key = cache_key(cfg, sd, images)
    if not rebuild:
        cache = _open_on_every_host(directory, key)
        if cache is not None:
            if is_main:
                print(f"latent cache: using {directory} ({len(cache)} images)")
            return cache
    else:
        _agree(directory, key, "to be rebuilt")
    if is_main and not cfg.center_crop:
        print("note: with a random crop, the latent cache holds one crop per image, drawn when "
              "the cache is built (pass --center_crop for the crop an uncached run sees)")
    build(directory, key, cfg, sd, images, loader, buckets, mesh, is_main)
    return lc.LatentCache.open(directory, key)


def _open_on_every_host(directory: str, key: dict):
    """The cache, when every host finds the same one for the same key. Hosts that disagree
    (other data or flags on one host, or a folder that is not shared) all stop with the same
    error rather than some building while the others wait for them."""
    mismatch = None
    try:
        cache = lc.LatentCache.open(directory, key)
        found = "ready" if cache is not None else "absent"
    except lc.CacheMismatch as e:
        cache, mismatch, found = None, e, f"refused ({e})"
    _agree(directory, key, found)
    if mismatch is not None:
        raise mismatch
    return cache


def _agree(directory: str, key: dict, found: str) -> None:
    if not hosts_agree(json.dumps([key, found], sort_keys=True)):
        raise lc.CacheMismatch(
            f"the hosts disagree about the latent cache in {directory}: process "
            f"{jax.process_index()} has {lc.describe_key(key)} and finds the cache {found}; "
            "give every host the same data, model and flags, and a --latent_cache_dir that all "
            "of them share")



def _encoders(sd, mesh, dtype):
    from sdjax.models.build import build_models

    models = build_models(sd.configs, dtype, "xla")
    vae, text_encoder = models["vae"], models["text_encoder"]
    repl, rows = replicated(mesh), batch_sharded(mesh)

    def encode_images(params, pixels):  # uint8 (rows, views, H, W, 3) -> (rows, views, 2, C, h, w)
        r, v = pixels.shape[:2]
        images = normalize_pixels(pixels.reshape((r * v,) + pixels.shape[2:]))
        dist = vae.apply({"params": params}, images, method="encode_nhwc")
        moments = jnp.stack([dist.mean, dist.std], axis=1)
        return moments.reshape((r, v) + moments.shape[1:])

    def encode_text(params, ids):
        return text_encoder.apply({"params": params}, ids)

    params = replicate({c: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                                  sd.params[c]) for c in ("vae", "text_encoder")},
                       mesh)
    images_fn = jax.jit(encode_images, in_shardings=(repl, rows), out_shardings=rows)
    text_fn = jax.jit(encode_text, in_shardings=(repl, rows), out_shardings=rows)
    return (lambda x: images_fn(params["vae"], x)), (lambda x: text_fn(params["text_encoder"], x))


def _run_job(chunks, read_local, encode, mesh, write, bar) -> None:
    """Reads chunk c+1 on the host while the devices encode chunk c."""
    with ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(read_local, chunks[0])
        for c in range(len(chunks)):
            local = pending.result()
            if c + 1 < len(chunks):
                pending = ahead.submit(read_local, chunks[c + 1])
            out = encode(global_batch({"x": local}, mesh)["x"])
            write(c, local_rows(out))
            bar.update(1)


def build(directory, key, cfg, sd, images, loader, buckets, mesh, is_main: bool) -> None:
    from tqdm.auto import tqdm

    host, hosts = jax.process_index(), jax.process_count()
    global_rows = cfg.train_batch_size * jax.device_count()
    dtype = jnp.dtype(cfg.compute_dtype_name)
    if is_main:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create --latent_cache_dir {directory}: {e.strerror}") from None
        for stale in (lc.MANIFEST, "samples.npy", "captions.json"):
            if os.path.exists(os.path.join(directory, stale)):  # the old cache is invalid from here
                os.remove(os.path.join(directory, stale))
    sync_hosts("sdjax-cache-start")

    groups = (np.asarray(buckets.assignment) if buckets is not None
              else np.zeros(len(images), np.int64))
    sizes = (list(buckets.sizes) if buckets is not None else [(cfg.resolution, cfg.resolution)])
    used = [g for g in range(len(sizes)) if np.any(groups == g)]
    captions = lc.distinct_captions(images)
    caption_chunks = lc.padded_chunks(np.arange(len(captions)), global_rows)
    jobs = {g: lc.padded_chunks(np.flatnonzero(groups == g), global_rows) for g in used}
    encode_images, encode_text = _encoders(sd, mesh, dtype)
    views = 2 if cfg.random_flip else 1
    workers = loader.workers
    bar = tqdm(total=sum(len(c) for c in jobs.values()) + len(caption_chunks), disable=not is_main,
               desc="caching", dynamic_ncols=True)
    t0 = time.perf_counter()

    with ThreadPoolExecutor(workers) as pool:
        for g in used:
            size = sizes[g]

            def read_one(index, size=size):
                rng = np.random.default_rng([cfg.run_seed, 2, int(index)])
                source, pixels = loader.read_pixels(index, size, rng, random_flip=False)
                pixels = np.stack([pixels, pixels[:, ::-1]])[:views]  # (H, W, 3): W flipped
                return source, pixels

            sources = []

            def read_local(chunk):
                read = list(pool.map(read_one, lc.host_rows(chunk, host, hosts)))
                sources.extend(s for s, _ in read)
                return np.stack([p for _, p in read])

            writer = _ShardWriter(os.path.join(directory, lc.latent_file(size, host)), len(jobs[g]))
            _run_job(jobs[g], read_local, encode_images, mesh, writer.write, bar)
            writer.close()
            np.save(os.path.join(directory, lc.sources_file(size, host)),
                    np.asarray(sources, np.int64))

        def read_captions(chunk):
            return loader.tokenize([captions[i] for i in lc.host_rows(chunk, host, hosts)])

        writer = _ShardWriter(os.path.join(directory, lc.text_file(host)), len(caption_chunks))
        _run_job(caption_chunks, read_captions, encode_text, mesh, writer.write, bar)
        writer.close()
    bar.close()
    sync_hosts("sdjax-cache-written")

    if is_main:
        samples = np.zeros((len(images), 3), np.int64)
        for g in used:
            members = np.flatnonzero(groups == g)
            where_host, where_row = lc.placement(len(members), global_rows, hosts)
            samples[members] = np.stack([np.full(len(members), g), where_host, where_row], 1)
        np.save(os.path.join(directory, "samples.npy"), samples)
        lc.write_json(os.path.join(directory, "captions.json"), captions)
        lc.write_json(os.path.join(directory, lc.MANIFEST), {
            "format": lc.FORMAT, "version": lc.VERSION, "key": key, "dtype": dtype.name,
            "views": views, "sizes": [list(s) for s in sizes], "hosts": hosts,
            "global_rows": global_rows, "images": len(images), "captions": len(captions)})
        print(f"latent cache: encoded {len(images)} images ({views} view(s) each) and "
              f"{len(captions)} captions into {directory} in {time.perf_counter() - t0:.1f} s")
    sync_hosts("sdjax-cache-done")


class _ShardWriter:
    """Fills one host's .npy file chunk by chunk (memory-mapped) under a temporary name, and
    gives it its real name when complete."""

    def __init__(self, path: str, chunks: int):
        self.path, self.partial, self.chunks = path, path + ".partial", chunks
        self.array = None

    def write(self, chunk: int, rows: np.ndarray) -> None:
        rows = lc.to_storage(rows)
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=rows.dtype,
                                                   shape=(self.chunks * len(rows),) + rows.shape[1:])
        self.array[chunk * len(rows):(chunk + 1) * len(rows)] = rows

    def close(self) -> None:
        self.array.flush()
        self.array = None
        os.replace(self.partial, self.path)
