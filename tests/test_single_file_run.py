"""A run trained from a single-file checkpoint: its checkpoints record how the base was read
(file and --original_config), so export rebuilds the same base, as a folder or a single file."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from sdjax import StableDiffusion
from sdjax.cli import main
from tests.conftest import DEMO_DATA

pytestmark = pytest.mark.slow


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_tree_equal(a, b, what):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys(), what
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]),
                                      err_msg=f"{what} {path}")


def test_train_from_a_single_file_then_export_both_formats(tiny_dir, tmp_path):
    base = StableDiffusion.from_pretrained(tiny_dir)
    single = base.save_single_file(str(tmp_path / "tiny.safetensors"))
    out = str(tmp_path / "run")
    code, _, err = run_main([
        "--pretrained_model_name_or_path", single, "--original_config", tiny_dir,
        "--train_data_dir", DEMO_DATA, "--resolution", "32", "--center_crop",
        "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--output_dir", out])
    assert code == 0, err
    checkpoint = os.path.join(out, "checkpoints", "checkpoint_2")
    from sdjax.checkpoints import read_meta

    spec = read_meta(checkpoint)["base_model"]
    assert spec["pretrained_model_name_or_path"] == single
    assert spec["original_config"] == tiny_dir

    exported = str(tmp_path / "export.safetensors")
    code, stdout, err = run_main(["export", "--checkpoint", checkpoint, "--output", exported])
    assert code == 0, err
    trained = StableDiffusion.from_pretrained(out)  # the run's final diffusers pipeline
    back = StableDiffusion.from_single_file(exported, original_config=tiny_dir)
    assert_tree_equal(back.params["unet"], trained.params["unet"], "unet")
    for component in ("vae", "text_encoder"):
        assert_tree_equal(back.params[component], base.params[component], component)
    with open(os.path.join(tiny_dir, "scheduler", "scheduler_config.json")) as f:
        assert back.scheduler_config["prediction_type"] == json.load(f).get(
            "prediction_type", "epsilon")

    folder = str(tmp_path / "export-folder")
    code, _, err = run_main(["export", "--checkpoint", checkpoint, "--output", folder])
    assert code == 0, err
    assert_tree_equal(StableDiffusion.from_pretrained(folder).params["unet"],
                      trained.params["unet"], "unet")
