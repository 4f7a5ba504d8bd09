"""The latent and text-embedding cache: what it holds equals what the step would compute, its
key refuses a changed run, an unfinished build is never used, training reads it."""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax.cache import cache_directory, cache_key
from sdjax.cli import main
from sdjax.config import parse_train_args
from sdjax.data import Loader, open_dataset
from sdjax.data.latent_cache import CacheMismatch, LatentCache
from sdjax.schedule import NoiseSchedule
from sdjax.pipeline import load_pipeline
from sdjax.train.step import LossConfig, make_loss_fn
from tests.conftest import DEMO_DATA


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    """The demo images as a caption-file folder; every third image has two captions."""
    root = tmp_path_factory.mktemp("cache_data") / "images"
    root.mkdir()
    for i, line in enumerate(open(os.path.join(DEMO_DATA, "metadata.jsonl"))):
        record = json.loads(line)
        shutil.copy(os.path.join(DEMO_DATA, record["file_name"]), root / record["file_name"])
        text = record["text"] + (f"\nanother caption {i}" if i % 3 == 0 else "")
        (root / record["file_name"]).with_suffix(".txt").write_text(text)
    return root


def _args(folder, out, extra=""):
    return (f"--pretrained_model_name_or_path=tiny --train_data_dir={folder} --resolution=32 "
            "--center_crop --random_flip --caption_dropout_probability=0.3 --train_batch_size=1 "
            f"--seed=5 --output_dir={out} {extra}").split()


def _run_parts(args):
    cfg, _ = parse_train_args(args)
    images = open_dataset(train_data_dir=cfg.train_data_dir, seed=cfg.run_seed)
    sd = load_pipeline(cfg.pretrained_model_name_or_path, cfg.run_seed)
    return cfg, images, sd


@pytest.fixture(scope="module")
def built(caption_folder, tmp_path_factory):
    """A cache built with the `cache` command (4 devices: global batches of 4)."""
    out = tmp_path_factory.mktemp("cache_run") / "run"
    assert main(["cache"] + _args(caption_folder, out)) == 0
    cfg, images, sd = _run_parts(_args(caption_folder, out))
    return cfg, images, sd, cache_directory(cfg)


def test_cached_batches_equal_what_the_step_computes(built):
    """Batch by batch, the cached latent moments and text embeddings (flips, multi-caption
    choice and caption dropout included) equal the VAE and text encoder run on the uncached
    batch, and so does the loss."""
    cfg, images, sd, directory = built
    cache = LatentCache.open(directory, cache_key(cfg, sd, images))
    assert cache is not None and cache.views == 2
    common = dict(global_batch=4, accumulation_steps=1, process_index=0, process_count=1,
                  seed=cfg.run_seed, resolution=32, center_crop=True, random_flip=True,
                  caption_dropout_probability=0.3)
    plain = Loader(images, sd.tokenizer, **common)
    cached = Loader(images, sd.tokenizer, cache=cache, **common)
    encode = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x, method="encode"))
    embed = jax.jit(lambda p, ids: sd.text_encoder.apply({"params": p}, ids))
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    loss_fn = jax.jit(make_loss_fn(sd.unet, sd.vae, sd.text_encoder, schedule, LossConfig()))
    frozen = {"vae": sd.params["vae"], "text_encoder": sd.params["text_encoder"]}
    flipped = 0
    with ThreadPoolExecutor(2) as pool:
        for step in range(3):  # one epoch of 12 images
            a = jax.tree_util.tree_map(lambda x: x[0], plain.step_batch(pool, step))
            b = jax.tree_util.tree_map(lambda x: x[0], cached.step_batch(pool, step))
            # The VAE's NCHW `encode` of the pixels as the loader normalised them on the host
            # before that moved to the device: the cache holds what it did then.
            host = a["pixel_values"].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
            dist = encode(sd.params["vae"], host)
            np.testing.assert_allclose(b["latent_mean"], dist.mean, atol=2e-5)
            np.testing.assert_allclose(b["latent_std"], dist.std, rtol=2e-5)
            np.testing.assert_allclose(b["text_embeddings"],
                                       embed(sd.params["text_encoder"], a["input_ids"]), atol=2e-5)
            key = jax.random.key(step)
            np.testing.assert_allclose(loss_fn({"unet": sd.params["unet"]}, {}, b, key, 0),
                                       loss_fn({"unet": sd.params["unet"]}, frozen, a, key, 0), rtol=1e-5)
            indices = plain.step_plan(step)[1][0]
            views = [cache.latent(i, 1)[0] for i in indices]
            flipped += sum(np.allclose(v[0], m, atol=2e-5) for v, m in zip(views, b["latent_mean"]))
    assert 0 < flipped < 12  # both orientations were drawn, as in the uncached run
    assert not np.allclose(cache.latent(0, 0)[0], cache.latent(0, 1)[0])


def test_a_changed_run_is_refused_then_rebuilt(built, caption_folder, tmp_path, capsys):
    cfg, images, sd, directory = built
    changes = {"--resolution=40": "resolution", "--center_crop=false": "crop",
               "--random_flip=false": "random_flip", "--mixed_precision=bf16": "dtype",
               "--image_interpolation_mode=bicubic": "interpolation",
               "--enable_bucket --min_bucket_reso=32": "buckets",
               "--seed=6": "vae_weights"}  # 'tiny' weights are drawn from the seed
    for flag, field in changes.items():
        args = _args(caption_folder, cfg.output_dir, flag)
        c, i, s = _run_parts(args)
        with pytest.raises(CacheMismatch, match=f"{field}=.*--rebuild_cache"):
            LatentCache.open(directory, cache_key(c, s, i))

    # A caption edited after the cache was built: the data changed.
    edited = tmp_path / "edited"
    shutil.copytree(caption_folder, edited)
    copy = tmp_path / "copy"
    assert main(["cache"] + _args(edited, tmp_path / "run", f"--latent_cache_dir={copy}")) == 0
    first = sorted(edited.glob("*.txt"))[0]
    first.write_text("a different caption")
    assert main(["cache"] + _args(edited, tmp_path / "run", f"--latent_cache_dir={copy}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the first build's progress bar
    assert err.startswith("error: the latent cache in") and "data=" in err and "\n" not in err
    assert main(["cache"] + _args(edited, tmp_path / "run",
                                  f"--latent_cache_dir={copy} --rebuild_cache")) == 0
    c, i, s = _run_parts(_args(edited, tmp_path / "run"))
    cache = LatentCache.open(str(copy), cache_key(c, s, i))
    assert "a different caption" in cache._caption_row


def test_an_unfinished_build_is_never_used(caption_folder, tmp_path, capsys):
    """A build that stops half-way (here: an unreadable image past --max_bad_images) leaves no
    manifest, even over an old cache, so nothing reads it; the user's files are untouched."""
    folder = tmp_path / "data"
    shutil.copytree(caption_folder, folder)
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    assert main(["cache"] + _args(folder, out, f"--latent_cache_dir={cache_dir}")) == 0
    victim = sorted(folder.glob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = main(["cache"] + _args(folder, out, f"--latent_cache_dir={cache_dir} --rebuild_cache "
                                               "--max_bad_images=0"))
    assert code == 2 and "unreadable" in capsys.readouterr().err
    assert not (cache_dir / "manifest.json").exists()
    cfg, images, sd = _run_parts(_args(folder, out))
    assert LatentCache.open(str(cache_dir), cache_key(cfg, sd, images)) is None
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_buckets_are_cached_per_shape(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (64, 32) if i < 4 else (32, 32), (30 * i, 90, 200)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    args = (f"--pretrained_model_name_or_path=tiny --train_data_dir={root} --resolution=32 "
            "--enable_bucket --min_bucket_reso=16 --max_bucket_reso=64 --bucket_reso_steps=16 "
            f"--center_crop --train_batch_size=1 --output_dir={tmp_path / 'run'}").split()
    assert main(["cache"] + args) == 0
    cfg, images, sd = _run_parts(args)
    from sdjax.data.buckets import BucketPlan, image_sizes

    plan = BucketPlan.build(image_sizes(images), 32, 16, 64, 16)
    cache = LatentCache.open(cache_directory(cfg), cache_key(cfg, sd, images))
    for i in range(8):
        w, h = plan.sizes[plan.assignment[i]]
        moments, source = cache.latent(i, 0)
        assert moments.shape[-2:] == (h // 8, w // 8) and source == i


@pytest.mark.slow
def test_training_from_the_cache(built, capsys):
    """`--cache_latents` trains from the cache (no VAE or text encoder in the step) and exports."""
    cfg, _, _, directory = built
    args = _args(cfg.train_data_dir, cfg.output_dir, "--cache_latents --max_train_steps=2")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"latent cache: using {directory} (12 images)" in out
    assert "cached latents" in out
    assert os.path.exists(os.path.join(cfg.output_dir, "model_index.json"))


def test_cache_from_a_tfds_data_set(tfds_dir, tmp_path):
    """The whole command path on a TFDS source: tfds:NAME with --tfds_data_dir."""
    args = (f"--pretrained_model_name_or_path=tiny --dataset_name=tfds:tiny_demo_captions "
            f"--tfds_data_dir={tfds_dir} --caption_column=caption --resolution=32 --center_crop "
            f"--train_batch_size=1 --output_dir={tmp_path / 'run'}").split()
    assert main(["cache"] + args) == 0
    cfg, _ = parse_train_args(args)
    images = open_dataset(cfg.dataset_name, tfds_data_dir=tfds_dir, caption_column="caption")
    sd = load_pipeline("tiny", 0)
    cache = LatentCache.open(cache_directory(cfg), cache_key(cfg, sd, images))
    assert len(cache) == 12 and images.captions[0] in cache._caption_row


def _copy_with_new_times(source, destination):
    """A host's own copy of the data: another path, other modification times."""
    copy = shutil.copytree(source, destination)
    for name in os.listdir(copy):
        os.utime(copy / name, (1_000_000_000, 1_000_000_000))
    return copy


@pytest.mark.parametrize("layout", ["imagefolder", "caption_files", "saved_dataset"])
def test_the_data_key_is_the_same_for_every_copy_of_the_data(layout, tmp_path, caption_folder):
    from sdjax.data.latent_cache import data_fingerprint

    source = caption_folder if layout == "caption_files" else DEMO_DATA
    if layout == "saved_dataset":
        import datasets

        datasets.load_dataset("imagefolder", data_dir=DEMO_DATA, split="train").save_to_disk(
            str(tmp_path / "saved"))
        source = tmp_path / "saved"
    host0 = _copy_with_new_times(source, tmp_path / "host0" / "data")
    host1 = _copy_with_new_times(source, tmp_path / "elsewhere" / "host1-data")
    os.utime(next(p for p in host1.iterdir() if p.suffix in (".png", ".arrow")), (7, 7))
    flag = "dataset_name" if layout == "saved_dataset" else "train_data_dir"
    keys = [data_fingerprint(open_dataset(**{flag: str(h)})) for h in (host0, host1)]
    assert keys[0] == keys[1]
    # ... and a changed image changes it.
    if layout == "saved_dataset":
        import datasets

        data = datasets.load_from_disk(str(host1)).map(
            lambda row, i: {"image": row["image"].rotate(90) if i == 3 else row["image"]},
            with_indices=True)
        host1 = tmp_path / "changed"
        data.save_to_disk(str(host1))
    else:
        image = next(p for p in sorted(host1.iterdir()) if p.suffix == ".png")
        Image.open(image).rotate(90).save(image)
    assert data_fingerprint(open_dataset(**{flag: str(host1)})) != keys[0]
