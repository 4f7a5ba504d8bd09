"""DreamBooth class images: the missing ones made by the base model, resumable, on every device
of every host, with nothing left on the devices."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdjax import class_images
from sdjax.class_images import ensure_class_images
from sdjax.errors import ConfigError
from tests.class_images_worker import SETTINGS
from tests.helpers import free_port, host_env, wait_all
from tests.tiny_torch import REPO

NAMES = [f"class_{j:05d}.png" for j in range(6)]


@pytest.fixture(scope="module")
def sd():
    from sdjax import StableDiffusion
    from sdjax.train.setup import enable_compilation_cache

    enable_compilation_cache()  # as the trainer does: each call compiles the same program
    return StableDiffusion.from_config("tiny", seed=0)


def make(sd, folder, count=6, **overrides):
    settings = dict(SETTINGS, count=count)
    settings.update(overrides)
    return ensure_class_images(sd, str(folder), **settings)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def made(sd, tmp_path_factory):
    """6 class images made into a folder that did not exist (4 devices: batches of 4 and 2)."""
    folder = tmp_path_factory.mktemp("made") / "class"
    return folder, make(sd, folder)


def test_missing_images_are_generated(made, sd, tmp_path, capsys, monkeypatch):
    folder, result = made
    assert sorted(os.listdir(folder)) == NAMES == result.written
    assert (result.existing, result.generated) == (0, 6) and result.images_per_sec > 0
    first = [pixels(folder / name) for name in NAMES]
    for name, image in zip(NAMES, first):
        with Image.open(folder / name) as png:
            assert (png.format, png.size, png.mode) == ("PNG", (64, 64), "RGB")  # native size
    assert not all((image == first[0]).all() for image in first[1:])  # every slot its own noise

    # Complete: nothing placed on the devices, nothing compiled, no file touched.
    monkeypatch.setattr(class_images, "Sampler", None)
    mtimes = {name: os.stat(folder / name).st_mtime_ns for name in NAMES}
    before = {id(a) for a in jax.live_arrays()}
    again = make(sd, folder)
    assert (again.existing, again.generated, again.written) == (6, 0, [])
    assert {name: os.stat(folder / name).st_mtime_ns for name in NAMES} == mtimes
    assert {id(a) for a in jax.live_arrays()} == before
    assert "already holds 6 images (>= 6); none generated" in capsys.readouterr().out
    monkeypatch.undo()

    # The user's own images count toward the total; only images directly in the folder count.
    own = tmp_path / "own"
    (own / "sub").mkdir(parents=True)
    for name in ("dog.JPG", "b.png", "sub/deep.png"):
        Image.new("RGB", (32, 32), "red").save(own / name, format="PNG")
    (own / "notes.txt").write_text("not an image")
    filled = make(sd, own, count=5)
    assert (filled.existing, filled.generated) == (2, 3)
    assert filled.written == NAMES[:3]
    for name in NAMES[:3]:  # the same seed and slot: the same image as in the first folder
        assert (pixels(own / name) == first[NAMES.index(name)]).all()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"class images: generated 3 of 5 from 'a photo of a dog' into {own} "
                              "(2 were there) in ") and out[-1].endswith(" images/s")


def test_resume_makes_what_an_uninterrupted_run_makes(made, sd, tmp_path):
    folder = shutil.copytree(made[0], tmp_path / "class")
    before = {name: pixels(folder / name) for name in NAMES}
    for name in (NAMES[1], NAMES[4]):
        os.remove(folder / name)
    # What an interrupted write leaves: a temporary file, not counted, and removed.
    stale = folder / f".{NAMES[1]}.host0.partial"
    stale.write_bytes(b"half a png")
    resumed = make(sd, folder)
    assert (resumed.existing, resumed.generated, resumed.written) == (4, 2, [NAMES[1], NAMES[4]])
    assert sorted(os.listdir(folder)) == NAMES
    # Made in one batch of 2, at other batch positions than before: the same pixels.
    for name in NAMES:
        assert (pixels(folder / name) == before[name]).all(), name


def test_nothing_stays_on_the_devices(sd, tmp_path, monkeypatch):
    """bfloat16 sampling (as under mixed precision); afterwards the same arrays are live as
    before, and the sampler with its compiled programs is gone."""
    samplers = []

    class KeptSampler(class_images.Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(weakref.ref(self))

    monkeypatch.setattr(class_images, "Sampler", KeptSampler)
    training_state = jnp.arange(3.0)  # something of the trainer's already on the devices
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    result = make(sd, tmp_path / "bf16", count=2, dtype=jnp.bfloat16)
    assert result.written == NAMES[:2]
    gc.collect()
    assert {id(a) for a in jax.live_arrays()} == before
    assert len(samplers) == 1 and samplers[0]() is None
    assert float(training_state.sum()) == 3.0


def _a_file(tmp_path):
    path = tmp_path / "file.png"
    path.write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("change, message", [
    (dict(count=0), "--num_class_images=0 must be a whole number of at least 1"),
    (dict(count=2.5), "--num_class_images=2.5 must be a whole number of at least 1"),
    (dict(prompt=""), "--class_prompt is empty"),
    (dict(prompt="  "), "--class_prompt is empty"),
    (dict(sample_batch_size=0), "--sample_batch_size=0 must be a whole number of at least 1"),
    (dict(folder=_a_file), "exists and is not a folder"),
    (dict(folder=lambda tmp_path: "gs://bucket/class"), "--class_data_dir 'gs://bucket/class': "
                                                        "give a local folder"),
])
def test_bad_input_is_one_line(sd, tmp_path, change, message):
    settings = dict(SETTINGS, folder=str(tmp_path / "class"))
    settings.update(change)
    if callable(settings["folder"]):
        settings["folder"] = settings["folder"](tmp_path)
    with pytest.raises(ConfigError) as info:
        ensure_class_images(sd, **settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_prompt_indices(sd):
    with pytest.raises(ConfigError, match=r"prompt_indices must hold one whole number from 0 to "
                                          r"2\*\*31-1 per prompt \(2 prompts\); got shape \(1,\)"):
        sd.sampler().sample({}, ["a", "b"], prompt_indices=[1])
    with pytest.raises(ConfigError, match="prompt_indices must hold"):
        sd.sampler().sample({}, ["a", "b"], prompt_indices=[1, -1])


@pytest.mark.slow
@pytest.mark.hosts
def test_two_hosts(sd, made, tmp_path):
    """2 processes x 2 devices: the images of 1 process x 4 devices with the same seed. (a) One
    folder both share: each host writes its own files, together the set. (b) A folder per
    host, host 1's with a picture of the user's: each ends complete. (c) Host 1 cannot use its
    folder: both stop, neither waits for the other."""
    shared, own, bad = tmp_path / "shared", tmp_path / "own", tmp_path / "bad"
    (own / "host1").mkdir(parents=True)
    Image.new("RGB", (64, 64), "blue").save(own / "host1" / "mine.png")
    (bad / "host1").parent.mkdir()
    (bad / "host1").write_text("a file where the folder should be")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.class_images_worker", str(tmp_path / f"host{i}.json"),
         f"localhost:{port}", str(i), str(shared), str(own / f"host{i}"), str(bad / f"host{i}")],
        env=host_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = wait_all(procs)
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    assert [h["process"] for h in hosts] == [0, 1]
    assert "class images: generated 5 of 5" in outputs[0][0]
    assert "class images:" not in outputs[1][0]
    reference = made[0]  # 1 process x 4 devices, the same settings

    def same_images(folder, names):
        for name in names:
            assert np.abs(pixels(folder / name) - pixels(reference / name)).max() <= 2, name

    # (a) One folder: the hosts' files are disjoint and together the whole set.
    names = NAMES[:5]
    assert sorted(os.listdir(shared)) == names
    written = [set(h["shared"]["written"]) for h in hosts]
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == set(names)
    assert all(h["shared"]["generated"] == 5 for h in hosts)
    same_images(shared, names)
    # (b) A folder each: host 1 needed 4 (it had 1), all 5 were sampled, each folder is complete.
    assert sorted(os.listdir(own / "host0")) == names
    assert sorted(os.listdir(own / "host1")) == sorted(names[:4] + ["mine.png"])
    assert [h["own"]["written"] for h in hosts] == [names, names[:4]]
    same_images(own / "host0", names)
    same_images(own / "host1", names[:4])
    # (c) Host 1's folder is a file: every host stops with a one-line error.
    assert "exists and is not a folder" in hosts[1]["bad_error"]
    assert "process 1 cannot use its --class_data_dir" in hosts[0]["bad_error"]
