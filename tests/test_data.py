"""Data layouts, captions, image modes and broken files (host side only: no model, no compile)."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdjax.data import Loader, open_dataset
from sdjax.data.loader import to_rgb, transform_image
from sdjax.errors import ConfigError
from tests.conftest import DEMO_DATA
from tests.tiny_torch import TINY_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER)


def _image(path, color, size=(40, 32), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """A community-trainer layout: nested folders, .txt and .caption files, a multi-line caption."""
    root = tmp_path / "photos"
    _image(root / "a" / "001.png", (255, 0, 0))
    (root / "a" / "001.txt").write_text("a red square\n")
    _image(root / "a" / "deeper" / "002.jpg", (0, 255, 0))
    (root / "a" / "deeper" / "002.caption").write_text("a green square")
    _image(root / "b" / "003.webp", (0, 0, 255))
    (root / "b" / "003.txt").write_text("a blue square\nblue, square, plain\n\n")
    _image(root / "004.png", (255, 255, 0))
    (root / "004.txt").write_text("a yellow square")
    return root


def test_plain_folder_with_caption_files(folder):
    data = open_dataset(train_data_dir=str(folder))
    assert len(data) == 4
    names = [os.path.relpath(data.name(i), folder) for i in range(4)]
    assert names == ["004.png", "a/001.png", "a/deeper/002.jpg", "b/003.webp"]
    assert data.caption(1) == "a red square" and data.caption(2) == "a green square"
    assert data.caption(3) == ["a blue square", "blue, square, plain"]
    assert data.image(0).size == (40, 32)


def test_caption_extension_and_missing_captions(folder):
    with pytest.raises(ConfigError, match=r"002\.jpg has no caption file .*002\.txt"):
        open_dataset(train_data_dir=str(folder), caption_extension=".txt")
    os.remove(folder / "004.txt")
    with pytest.raises(ConfigError, match=r"004\.png has no caption file.*--allow_empty_captions"):
        open_dataset(train_data_dir=str(folder))
    data = open_dataset(train_data_dir=str(folder), allow_empty_captions=True)
    assert data.caption(0) == ""


def test_max_train_samples_on_folder(folder):
    data = open_dataset(train_data_dir=str(folder), max_train_samples=2, seed=1)
    assert len(data) == 2 and len(set(data.paths)) == 2


def _loader(data, tokenizer, **kwargs):
    options = dict(global_batch=2, accumulation_steps=1, process_index=0, process_count=1, seed=0,
                   resolution=32, center_crop=True, random_flip=False)
    options.update(kwargs)
    return Loader(data, tokenizer, **options)


def _captions_seen(loader, steps):
    """Decoded captions of the first `steps` steps (the tokenizer's round trip)."""
    seen = []
    with ThreadPoolExecutor(2) as pool:
        for step in range(steps):
            ids = loader.step_batch(pool, step)["input_ids"][0]
            seen += [loader.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return seen


def test_several_captions_and_caption_dropout(folder, tokenizer):
    data = open_dataset(train_data_dir=str(folder))
    seen = _captions_seen(_loader(data, tokenizer), 40)
    blue = {c for c in seen if "blue" in c}
    assert blue == {"a blue square", "blue , square , plain"}  # both lines of the file are used
    dropped = _captions_seen(_loader(data, tokenizer, caption_dropout_probability=0.5), 40)
    empty = sum(1 for c in dropped if c == "")
    assert 20 <= empty <= 60  # about half of 80
    assert dropped == _captions_seen(_loader(data, tokenizer, caption_dropout_probability=0.5), 40)
    assert "" not in seen


def test_image_modes_become_upright_rgb(tmp_path):
    grey16 = Image.fromarray(np.full((4, 6), 65535, np.uint16))
    assert np.asarray(to_rgb(grey16)).tolist()[0][0] == [255, 255, 255]
    assert to_rgb(Image.new("L", (3, 2), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("RGBA", (3, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (3, 2), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("CMYK", (3, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("RGB", (3, 2), (1, 2, 3)).convert("P")).mode == "RGB"
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): width and height swap.
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 20), (10, 20, 30)).save(path, exif=exif)
    assert to_rgb(Image.open(path)).size == (20, 60)


def test_interpolation_modes_differ():
    rng_image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    out = {mode: transform_image(rng_image, 32, True, False, np.random.default_rng(0), mode)
           for mode in ("lanczos", "bilinear", "nearest")}
    assert out["lanczos"].shape == (32, 32, 3) and out["lanczos"].dtype == np.uint8
    assert not np.array_equal(out["lanczos"], out["bilinear"])
    # Nearest-neighbour 4x upscaling repeats each source pixel in a 4x4 block.
    assert np.all(out["nearest"][:4, :4] == out["nearest"][:1, :1])


def test_broken_files_are_skipped_counted_and_limited(folder, tokenizer, caplog):
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("empty file")
    good = (folder / "004.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "cut.txt").write_text("truncated")
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "text.txt").write_text("not an image")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    data = open_dataset(train_data_dir=str(folder))
    assert len(data) == 7
    loader = _loader(data, tokenizer, global_batch=7, max_bad_images=3)
    with ThreadPoolExecutor(2) as pool:
        batch = loader.step_batch(pool, 0)
    assert batch["pixel_values"].shape == (1, 7, 32, 32, 3)
    assert sorted(os.path.basename(data.name(i)) for i in loader.bad_images) == [
        "cut.png", "text.jpg", "zero.png"]
    assert "skipped unreadable" in caplog.text and "zero.png" in caplog.text
    strict = _loader(data, tokenizer, global_batch=7, max_bad_images=2)
    with ThreadPoolExecutor(2) as pool, pytest.raises(ConfigError, match="more than --max_bad_images=2"):
        strict.step_batch(pool, 0)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # untouched


def test_tfds_by_name_config_and_split(tfds_dir):
    """tfds:NAME[/CONFIG][:SPLIT] from --tfds_data_dir: the images and captions, in order, one
    caption or several per image, without TensorFlow."""
    import sys

    data = open_dataset("tfds:tiny_demo_captions", tfds_data_dir=tfds_dir, caption_column="caption")
    records = [json.loads(line) for line in open(os.path.join(DEMO_DATA, "metadata.jsonl"))]
    assert len(data) == 12 and data.captions[1] == records[1]["text"]
    demo = Image.open(os.path.join(DEMO_DATA, records[1]["file_name"])).convert("RGB")
    np.testing.assert_array_equal(np.asarray(data.image(1)), np.asarray(demo))
    several = open_dataset("tfds:tiny_demo_captions/half:train[2:5]", tfds_data_dir=tfds_dir,
                           caption_column="captions")
    assert len(several) == 3 and several.captions[1] == [data.captions[3], "another caption 3"]
    assert "tensorflow" not in sys.modules


def test_tfds_bad_names_and_columns(tfds_dir):
    with pytest.raises(ConfigError, match="no prepared data set no_such_set"):
        open_dataset("tfds:no_such_set", tfds_data_dir=tfds_dir)
    with pytest.raises(ConfigError, match="'text' is not a feature of .* its features are "
                                          "caption, captions, image"):
        open_dataset("tfds:tiny_demo_captions", tfds_data_dir=tfds_dir)
    with pytest.raises(ConfigError, match="write tfds:NAME"):
        open_dataset("tfds:", tfds_data_dir=tfds_dir)
