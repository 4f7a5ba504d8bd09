"""Aspect-ratio bucketing: fixed shapes, every batch from one bucket, bounded compiles."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdjax.cli import main
from sdjax.data import Loader, open_dataset
from sdjax.data.buckets import BucketPlan, bucket_sizes, image_sizes
from tests.tiny_torch import TINY_TOKENIZER


def test_bucket_sizes():
    sizes = bucket_sizes(512, 256, 1024, 64)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
    assert sizes == sorted(set(sizes)) and all((h, w) in sizes for w, h in sizes)


def test_images_go_to_the_closest_aspect_ratio():
    plan = BucketPlan.build([(1000, 500), (500, 1000), (700, 700), (640, 360)], 512, 256, 1024, 64)
    got = [plan.sizes[b] for b in plan.assignment]
    assert got[0][0] > got[0][1] and got[1][0] < got[1][1] and got[2] == (512, 512)
    assert abs(np.log(got[3][0] / got[3][1]) - np.log(640 / 360)) < 0.2


@pytest.fixture
def mixed(tmp_path):
    """4 wide (2:1) and 4 square images with captions."""
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(8):
        size = (128, 64) if i < 4 else (64, 64)
        Image.new("RGB", size, (30 * i, 100, 200)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"{'wide' if i < 4 else 'square'} picture {i}")
    return root


def test_every_batch_comes_from_one_bucket(mixed):
    from transformers import CLIPTokenizer

    data = open_dataset(train_data_dir=str(mixed))
    plan = BucketPlan.build(image_sizes(data), 64, 32, 128, 32)
    assert len(plan.used()) == 2
    loader = Loader(data, CLIPTokenizer.from_pretrained(TINY_TOKENIZER), global_batch=2,
                    accumulation_steps=2, process_index=0, process_count=1, seed=0, resolution=64,
                    center_crop=True, random_flip=False, buckets=plan)
    assert loader.steps_per_epoch == 2  # one group of 2 x 2 per bucket
    seen = []
    with ThreadPoolExecutor(2) as pool:
        for step in range(2):
            size, indices = loader.step_plan(step)
            batch = loader.step_batch(pool, step)
            assert batch["pixel_values"].shape == (2, 2, size[1], size[0], 3)
            assert batch["pixel_values"].dtype == np.uint8
            assert {plan.sizes[plan.assignment[i]] for i in indices.ravel()} == {size}
            seen += list(indices.ravel())
    assert sorted(seen) == list(range(8))  # one epoch: each image once


@pytest.mark.slow
def test_training_with_buckets(mixed, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(f"--pretrained_model_name_or_path=tiny --train_data_dir={mixed} --resolution=64 "
                "--enable_bucket --min_bucket_reso=32 --max_bucket_reso=128 --bucket_reso_steps=32 "
                "--train_batch_size=1 --max_train_steps=4 --learning_rate=1e-4 "
                f"--output_dir={out}".split())
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.count("compiled the train step") == 2  # two buckets, two programs
    lines = [json.loads(line) for line in (out / "buckets.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {(x["width"], x["height"]) for x in lines} == {(64, 64), (96, 32)}
    assert os.path.exists(out / "model_index.json")
