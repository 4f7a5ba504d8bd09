"""DreamBooth data: instance and class image folders (host side only: no model, no compile)."""

import os

import pytest
from PIL import Image

from sdjax.data import open_image_folder
from sdjax.errors import ConfigError

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


def _solid_images(folder, count, first_red):
    """`count` 8x8 images, image i of one colour whose red channel is first_red + 10 * i."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (first_red + 10 * i, 50, 200)).save(folder / f"{i:02d}.png")
    return str(folder)


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
