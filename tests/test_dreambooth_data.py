"""DreamBooth data: instance and class image folders, their pairing, repeats and hosts (host side
only: no model, no compile)."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdjax.data import Loader, open_image_folder
from sdjax.data.buckets import BucketPlan
from sdjax.data.loader import tokenize
from sdjax.errors import ConfigError
from tests.tiny_torch import TINY_TOKENIZER

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER)


def _solid_images(folder, count, first_red):
    """`count` 8x8 images, image i of one colour whose red channel is first_red + 10 * i."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (first_red + 10 * i, 50, 200)).save(folder / f"{i:02d}.png")
    return str(folder)


def _noise_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def _loader(instances, tokenizer, **kwargs):
    options = dict(global_batch=2, accumulation_steps=1, process_index=0, process_count=1, seed=0,
                   resolution=8, center_crop=True, random_flip=False)
    options.update(kwargs)
    return Loader(instances, tokenizer, **options)


def _batch(loader, step):
    with ThreadPoolExecutor(2) as pool:
        return loader.step_batch(pool, step)


def _red(pixels):
    """The red channel of solid uint8 images (rows, h, w, 3)."""
    return pixels[:, 0, 0, 0].astype(int)


def test_open_image_folder_captions_only_the_images_directly_in_it(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    Image.new("RGB", (8, 8)).save(folder / "a.JPG")
    (folder / "notes.txt").write_text("not an image")
    _solid_images(folder / "sub", 2, 0)  # diffusers reads the folder with iterdir: not these
    data = open_image_folder(str(folder), INSTANCE_PROMPT, "--instance_data_dir")
    assert [os.path.basename(data.name(i)) for i in range(len(data))] == ["a.JPG", "b.png"]
    assert data.captions == [INSTANCE_PROMPT] * 2 and data.caption(1) == INSTANCE_PROMPT
    contents = data.contents()  # what the latent cache key reads: relative names and content
    assert [c.split("|")[0] for c in contents] == ["a.JPG", "b.png"]
    assert all("unreadable" not in c for c in contents)


def test_open_image_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--class_data_dir .*missing does not exist$"):
        open_image_folder(str(tmp_path / "missing"), CLASS_PROMPT, "--class_data_dir")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^--instance_data_dir .*file\.png is not a folder$"):
        open_image_folder(str(tmp_path / "file.png"), INSTANCE_PROMPT, "--instance_data_dir")
    _solid_images(tmp_path / "empty" / "sub", 1, 0)
    (tmp_path / "empty" / "a.txt").write_text("text")
    with pytest.raises(ConfigError, match=r"^--instance_data_dir .*empty contains no images"):
        open_image_folder(str(tmp_path / "empty"), INSTANCE_PROMPT, "--instance_data_dir")


def test_pairs_cover_every_class_image_once_per_epoch(tmp_path, tokenizer):
    """3 instance and 7 class images: an epoch of 7 pairs, sample v pairing instance v % 3 with
    class v % 7, interleaved rows, and each row captioned with its own prompt."""
    instances = open_image_folder(_solid_images(tmp_path / "i", 3, 0), INSTANCE_PROMPT, "--i")
    classes = open_image_folder(_solid_images(tmp_path / "c", 7, 100), CLASS_PROMPT, "--c")
    loader = _loader(instances, tokenizer, global_batch=7, prior=classes)
    assert loader.epoch_length == 7 and loader.batches_per_epoch == 1
    assert loader.steps_per_epoch == 1.0
    virtual = loader.virtual_indices(0)
    assert sorted(virtual) == list(range(7))
    np.testing.assert_array_equal(loader.step_plan(0)[1][0], virtual % 3)
    batch = _batch(loader, 0)
    assert set(batch) == {"pixel_values", "input_ids", "prior_mask"}
    assert batch["pixel_values"].shape == (1, 14, 8, 8, 3)
    assert batch["input_ids"].shape == (1, 14, tokenizer.model_max_length)
    assert batch["prior_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["prior_mask"], [[0.0, 1.0] * 7])
    red = _red(batch["pixel_values"][0])
    np.testing.assert_array_equal(red[0::2], 10 * (virtual % 3))
    np.testing.assert_array_equal(red[1::2], 100 + 10 * (virtual % 7))
    assert sorted(red[1::2]) == [100 + 10 * i for i in range(7)]  # every class image once
    ids = batch["input_ids"][0]
    expected = tokenize(tokenizer, [INSTANCE_PROMPT, CLASS_PROMPT])
    assert (ids[0::2] == expected[0]).all() and (ids[1::2] == expected[1]).all()


def test_pairs_over_several_micro_batches(tmp_path, tokenizer):
    """Accumulation: a step of k micro-batches, each with its mask row; epochs reshuffle."""
    instances = open_image_folder(_solid_images(tmp_path / "i", 2, 0), INSTANCE_PROMPT, "--i")
    classes = open_image_folder(_solid_images(tmp_path / "c", 4, 100), CLASS_PROMPT, "--c")
    loader = _loader(instances, tokenizer, global_batch=2, accumulation_steps=2, prior=classes)
    assert loader.batches_per_epoch == 2 and loader.steps_per_epoch == 1.0
    batch = _batch(loader, 0)
    assert batch["pixel_values"].shape == (2, 4, 8, 8, 3)
    np.testing.assert_array_equal(batch["prior_mask"], [[0.0, 1.0, 0.0, 1.0]] * 2)
    classes_seen = _red(batch["pixel_values"].reshape(8, 8, 8, 3))[1::2]
    assert sorted(classes_seen) == [100, 110, 120, 130]
    orders = [np.concatenate([loader.virtual_indices(2 * e + j) for j in range(2)])
              for e in range(4)]
    assert any(list(o) != list(orders[0]) for o in orders[1:])


def test_repeat_to_fills_a_global_batch(tmp_path, tokenizer):
    instances = open_image_folder(_solid_images(tmp_path / "i", 2, 0), INSTANCE_PROMPT, "--i")
    assert _loader(instances, tokenizer, global_batch=4).batches_per_epoch == 0
    loader = _loader(instances, tokenizer, global_batch=4, repeat_to=4)
    assert loader.batches_per_epoch == 1 and loader.steps_per_epoch == 1.0
    assert sorted(loader.sample_indices(0)) == [0, 0, 1, 1]
    batch = _batch(loader, 0)
    assert set(batch) == {"pixel_values", "input_ids"}
    assert batch["pixel_values"].shape == (1, 4, 8, 8, 3)
    assert sorted(_red(batch["pixel_values"][0])) == [0, 0, 10, 10]


def test_two_hosts_split_the_pairs_and_repeat_themselves(tmp_path, tokenizer):
    """Random crops and flips: host 0 then host 1 equals one host, step after step; the class
    sample's draws are its own (same image, same position, other crops); a step read twice is
    the same."""
    instances = open_image_folder(_noise_images(tmp_path / "i", 3), INSTANCE_PROMPT, "--i")
    classes = open_image_folder(_noise_images(tmp_path / "c", 3), CLASS_PROMPT, "--c")
    common = dict(global_batch=2, accumulation_steps=2, center_crop=False, random_flip=True,
                  prior=classes, repeat_to=8, seed=3)
    single = _loader(instances, tokenizer, **common)
    hosts = [_loader(instances, tokenizer, process_index=i, process_count=2, **common)
             for i in range(2)]
    assert single.steps_per_epoch == 2.0
    differ = 0
    for step in range(3):  # into the second epoch
        whole = _batch(single, step)
        parts = [_batch(host, step) for host in hosts]
        for name in whole:
            assert parts[0][name].shape[1] == whole[name].shape[1] // 2
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts], axis=1),
                                          whole[name])
        again = _batch(hosts[1], step)
        for name in again:
            np.testing.assert_array_equal(again[name], parts[1][name])
        pixels = whole["pixel_values"]
        differ += int(np.sum(np.any(pixels[:, 0::2] != pixels[:, 1::2], axis=(2, 3, 4))))
    assert differ > 0  # instance and class images are the same files here, cropped differently


def test_unreadable_class_images_are_skipped_by_name(tmp_path, tokenizer, caplog):
    instances = open_image_folder(_solid_images(tmp_path / "i", 2, 0), INSTANCE_PROMPT, "--i")
    folder = tmp_path / "c"
    _solid_images(folder, 3, 100)
    (folder / "01.png").write_bytes(b"not a png")
    classes = open_image_folder(str(folder), CLASS_PROMPT, "--c")
    loader = _loader(instances, tokenizer, global_batch=3, prior=classes, max_bad_images=1)
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        batch = _batch(loader, 0)
    assert list(loader.bad_prior_images) == [1] and loader.bad_images == {}
    assert "skipped unreadable" in caplog.text and "01.png" in caplog.text
    class_red = sorted(_red(batch["pixel_values"][0])[1::2])
    assert class_red == [100, 120, 120]  # class image 2 stands in for 1
    strict = _loader(instances, tokenizer, global_batch=3, prior=classes, max_bad_images=0)
    with pytest.raises(ConfigError, match=r"more than --max_bad_images=0.*01\.png"):
        _batch(strict, 0)


def test_class_images_refuse_buckets_and_a_latent_cache(tmp_path, tokenizer):
    instances = open_image_folder(_solid_images(tmp_path / "i", 2, 0), INSTANCE_PROMPT, "--i")
    classes = open_image_folder(_solid_images(tmp_path / "c", 2, 100), CLASS_PROMPT, "--c")
    plan = BucketPlan.build([(8, 8)] * 2, 64, 32, 128, 32)
    with pytest.raises(ValueError, match="buckets"):
        _loader(instances, tokenizer, prior=classes, buckets=plan)
    with pytest.raises(ValueError, match="buckets"):
        _loader(instances, tokenizer, repeat_to=4, buckets=plan)
    cache = object()  # stands in for a LatentCache: the guard does not read it
    with pytest.raises(ValueError, match="latent cache"):
        _loader(instances, tokenizer, prior=classes, cache=cache)
    loader = _loader(instances, tokenizer, prior=classes)
    loader.cache = cache  # as the trainer sets it, after construction
    with pytest.raises(ValueError, match="latent cache"):
        _batch(loader, 0)
