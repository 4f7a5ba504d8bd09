"""Host input pipeline throughput: JPEG decode + resize + crop + flip + tokenize + batch.

    python bench/data_pipeline.py --images 64 --resolution 512 --workers 1 2

Writes a folder of random-content JPEGs (768x640, a typical photo-sized source) with caption
files, then times sdjax's Loader building batches exactly as training does, with 1, 2, ...
decode threads. Reports images/s, batches/s, images/s per thread, how many host cores that
means for the published 128 images/s per H100 (DESIGN.md), the bytes of one batch (what is
copied to the devices each step; images are uint8 (H, W, 3)), and how long placing one batch on
this machine's devices takes (`global_batch` and the copy, waited for). `--cached` also builds a latent cache of the
folder (tiny model: SD's latent shape, 4 x res/8 x res/8, both flips; its text embeddings are
32 wide where SD's are 768) and times the batches read from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from sdjax.data import Loader, open_dataset  # noqa: E402

TARGET_IMAGES_PER_S = 128  # NVIDIA NeMo MLPerf v4.0, SD at 512 px, per H100


def make_images(folder: str, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        # Smooth random content compresses like a photo, unlike white noise.
        small = rng.integers(0, 255, (24, 20, 3), np.uint8)
        Image.fromarray(small).resize((768, 640), Image.Resampling.BICUBIC).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(f"a photo number {i}")


def build_cache(folder: str, args):
    """The latent cache of `folder` as `train_flax.py cache` builds it (tiny model)."""
    from sdjax.cache import cache_directory, cache_key
    from sdjax.cli import main as cli
    from sdjax.config import parse_train_args
    from sdjax.data.latent_cache import LatentCache
    from sdjax.pipeline import load_pipeline

    flags = (f"--pretrained_model_name_or_path=tiny --train_data_dir={folder} --resolution="
             f"{args.resolution} --center_crop --random_flip --train_batch_size=8 "
             f"--output_dir={os.path.join(folder, 'run')}").split()
    if cli(["cache"] + flags) != 0:
        raise SystemExit("building the cache failed")
    cfg, _ = parse_train_args(flags)
    return LatentCache.open(cache_directory(cfg), cache_key(cfg, load_pipeline("tiny", 0),
                                                            open_dataset(train_data_dir=folder)))


def place_ms(batch: dict, repeats: int = 5) -> float:
    """Milliseconds to place one host batch on this machine's devices, as the step loop does."""
    import jax

    from sdjax.parallel import global_batch, make_mesh

    mesh = make_mesh()
    if batch[next(iter(batch))].shape[1] % mesh.devices.size:
        return float("nan")
    jax.block_until_ready(global_batch(batch, mesh, sample_axis=1))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(global_batch(batch, mesh, sample_axis=1))
    return round((time.perf_counter() - t0) / repeats * 1e3, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cached", action="store_true", help="also time reading the latent cache")
    args = p.parse_args()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models", "tiny",
        "tokenizer"))
    results = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "source": "768x640 JPEG (quality 90)", "resolution": args.resolution, "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        make_images(folder, args.images)
        data = open_dataset(train_data_dir=folder)
        steps = args.images // args.batch
        cache = build_cache(folder, args) if args.cached else None
        for workers, cached in [(w, False) for w in args.workers] + (
                [(w, True) for w in args.workers] if cache else []):
            loader = Loader(data, tokenizer, global_batch=args.batch, accumulation_steps=1,
                            process_index=0, process_count=1, seed=0, resolution=args.resolution,
                            center_crop=True, random_flip=True, num_workers=workers,
                            cache=cache if cached else None)
            with ThreadPoolExecutor(workers) as pool:
                batch = loader.step_batch(pool, 0)  # warm caches
                t0 = time.perf_counter()
                for step in range(steps):
                    loader.step_batch(pool, step)
                elapsed = time.perf_counter() - t0
            rate = steps * args.batch / elapsed
            results["runs"].append({
                "source": "latent cache" if cached else "JPEG", "threads": workers, "images_per_s": round(rate, 1),
                "batches_per_s": round(steps / elapsed, 2),
                "images_per_s_per_thread": round(rate / workers, 1),
                "host_cores_for_128_images_per_s": round(TARGET_IMAGES_PER_S / (rate / workers), 1),
                "batch": {name: f"{x.dtype} {list(x.shape)}" for name, x in batch.items()},
                "batch_bytes": sum(x.nbytes for x in batch.values()),
                "place_ms": place_ms(batch)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
