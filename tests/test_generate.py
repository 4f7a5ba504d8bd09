"""Validation images while training, and the generate and compare commands, on one short run:
what validation shows at step N is what `generate --checkpoint` and `compare` show for step N."""

import contextlib
import gc
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax.cli import main
from tests.conftest import DEMO_DATA

# Every test here trains, checkpoints, restores or samples.
pytestmark = pytest.mark.jax_api

PROMPTS = ["a red cube", "a blue ball"]
# The run's validation settings; generate and compare are given the same ones.
SAMPLING = ["--num_inference_steps", "3", "--guidance_scale", "4.0", "--scheduler", "euler_a",
            "--seed", "3", "--height", "32", "--width", "32"]


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps of the tiny (epsilon) model trained for v-prediction from the latent cache, EMA
    on, checkpoints and validation every 2 steps (euler_a, 2 images per prompt, 32 px)."""
    out = str(tmp_path_factory.mktemp("gen") / "run")
    code, stdout, _ = run_main([
        "--pretrained_model_name_or_path", "tiny", "--train_data_dir", DEMO_DATA,
        "--resolution", "32", "--center_crop", "--train_batch_size", "1", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--use_ema", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--cache_latents", "--seed", "3", "--output_dir", out,
        "--prediction_type", "v_prediction",
        "--validation_prompts", *PROMPTS, "--validation_steps", "2", "--num_validation_images", "2",
        "--validation_num_inference_steps", "3", "--validation_guidance_scale", "4.0",
        "--validation_scheduler", "euler_a"])
    assert code == 0
    return out, stdout


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_validation_images_every_n_steps(run):
    out, stdout = run
    grids = {step: pixels(os.path.join(out, "validation", f"step-{step:07d}.png")) for step in (2, 4)}
    assert grids[2].shape == (2 * 32, 2 * 32, 3)  # a row per prompt, a column per image
    assert np.abs(grids[2].astype(int) - grids[4]).max() > 0  # the weights moved
    assert np.abs(grids[2][:, :32].astype(int) - grids[2][:, 32:]).max() > 0  # images differ
    assert "validation at step 2: 4 images (EMA weights) in" in stdout
    assert "validation at step 4: 4 images (EMA weights) in" in stdout
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["step-0000002.png",
                                                                   "step-0000004.png"]
    # The exported scheduler says what the UNet was trained to predict.
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler["prediction_type"] == "v_prediction"


def test_validation_images_in_tensorboard(run):
    from tests.tensorboard_events import summary_values

    out, _ = run
    images, scalars = {}, set()
    for step, value in summary_values(os.path.join(out, "logs", "text2image-fine-tune")):
        if value.HasField("image"):
            images[(step, value.tag)] = value.image
        elif value.HasField("simple_value"):
            scalars.add(value.tag)
    assert sorted(images) == [(2, "validation/0"), (2, "validation/1"), (4, "validation/0"),
                              (4, "validation/1")]
    row = Image.open(io.BytesIO(images[(4, "validation/1")].encoded_image_string))
    grid = pixels(os.path.join(out, "validation", "step-0000004.png"))
    np.testing.assert_array_equal(np.asarray(row.convert("RGB")), grid[32:])  # prompt 1's row
    assert "validation/seconds" in scalars


def test_generate_from_a_checkpoint_shows_what_validation_showed(run, tmp_path):
    out, _ = run
    target = str(tmp_path / "images")
    code, stdout, _ = run_main(["generate", "--checkpoint", os.path.join(out, "checkpoints",
                                                                       "checkpoint_2"),
                                "--prompt", *PROMPTS, "--num_images", "2", "--output_dir", target,
                                *SAMPLING])
    assert code == 0, stdout
    assert sorted(os.listdir(target)) == ["000-000.png", "000-001.png", "001-000.png",
                                          "001-001.png", "generate.json", "grid.png"]
    validation = pixels(os.path.join(out, "validation", "step-0000002.png"))
    np.testing.assert_array_equal(pixels(os.path.join(target, "grid.png")), validation)
    np.testing.assert_array_equal(pixels(os.path.join(target, "001-000.png")), validation[32:, :32])
    record = json.load(open(os.path.join(target, "generate.json")))
    assert record["checkpoint_step"] == 2 and record["ema"] is True and record["model"] == "tiny"
    assert "from checkpoint step 2 (EMA), euler_a 3 steps" in stdout

    raw = str(tmp_path / "raw")
    assert run_main(["generate", "--checkpoint", os.path.join(out, "checkpoints", "checkpoint_2"),
                     "--no_ema", "--prompt", *PROMPTS, "--num_images", "2", "--output_dir", raw,
                     *SAMPLING])[0] == 0
    assert np.abs(pixels(os.path.join(raw, "grid.png")).astype(int) - validation).max() > 0


def test_compare_grid_of_every_checkpoint(run):
    from sdjax.sampling.images import HEADER, column_lefts

    out, _ = run
    code, stdout, _ = run_main(["compare", "--output_dir", out, "--prompts", *PROMPTS, *SAMPLING])
    assert code == 0
    sheet = pixels(os.path.join(out, "compare.png"))
    labels = ["step 2 EMA", "step 4 EMA", "final"]
    _, lefts = column_lefts(labels, 32)

    def cell(row, column):
        x, y = lefts[column][1], HEADER + row * 32
        return sheet[y:y + 32, x:x + 32]

    for step, column in ((2, 0), (4, 1)):
        validation = pixels(os.path.join(out, "validation", f"step-{step:07d}.png"))
        for row in range(2):  # image 0 of each prompt, as validation made it at that step
            np.testing.assert_array_equal(cell(row, column), validation[row * 32:(row + 1) * 32, :32])
    np.testing.assert_array_equal(cell(1, 2), cell(1, 1))  # the export holds step 4's EMA weights
    assert "2 prompts x 3 checkpoints" in stdout


def test_compare_chosen_steps_and_bad_steps(run, tmp_path):
    out, _ = run
    chosen = str(tmp_path / "two.png")
    assert run_main(["compare", "--output_dir", out, "--prompts", "a red cube", "--steps", "2",
                     "--output", chosen, *SAMPLING])[0] == 0
    assert pixels(chosen).shape[0] == 28 + 32
    code, _, err = run_main(["compare", "--output_dir", out, "--prompts", "x", "--steps", "3"])
    assert code == 2 and "no checkpoint for step 3" in err and "complete checkpoints: 2, 4" in err
    code, _, err = run_main(["compare", "--output_dir", str(tmp_path), "--prompts", "x"])
    assert code == 2 and "no complete checkpoints in" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--prompt", "x", "--height", "36"], "height=36 must be a positive multiple of 8"),
    (["--model", "tiny", "--prompt", "x", "--num_inference_steps", "0"],
     "num_inference_steps=0 must be a whole number of at least 1"),
    (["--model", "tiny", "--prompt", "x", "--ema"], "--ema/--no_ema pick the weights of a --checkpoint"),
    (["--prompt", "x"], "give --model (a diffusers folder or hub id) or --checkpoint"),
    (["--model", "tiny", "--prompt", "x", "--scheduler", "UniPC"],
     "unknown scheduler 'UniPC': choose one of ddim, pndm, ddpm"),
])
def test_generate_bad_input_is_one_line(argv, message, tmp_path):
    code, _, err = run_main(["generate", "--output_dir", str(tmp_path / "o"), *argv])
    assert code == 2
    assert err.strip() == f"error: {err.strip()[7:]}" and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")


def validation_for(flags, sd=None):
    from sdjax.config import parse_train_args
    from sdjax.pipeline import StableDiffusion
    from sdjax.models.build import build_models
    from sdjax.train.metrics import MetricsWriter
    from sdjax.train.validation import Validation

    cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "tiny", "--train_data_dir",
                               DEMO_DATA, "--report_to", "none", *flags])
    cfg.validate()
    sd = sd or StableDiffusion.from_config("tiny", seed=0)
    return Validation(cfg, sd, build_models(sd.configs), sd.sampler().mesh,
                      MetricsWriter(cfg, False), False, steps_per_epoch=1.5), sd


def test_scheduler_flags_take_diffusers_class_names():
    from sdjax.config import parse_train_args

    cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "tiny", "--train_data_dir",
                               DEMO_DATA, "--validation_prompts", "a", "--validation_scheduler",
                               "UniPCMultistepScheduler"])
    cfg.validate()
    assert cfg.validation_scheduler == "unipc"


def test_validation_schedule_and_early_checks():
    every = validation_for(["--validation_prompt", "a cat", "--validation_epochs", "2"])[0]
    assert every.every == 3 and every.due(3, 10) and not every.due(4, 10) and every.due(10, 10)
    default = validation_for(["--validation_prompts", "a", "--checkpointing_steps", "7"])[0]
    assert default.every == 7
    from sdjax.errors import ConfigError

    with pytest.raises(ConfigError, match="--resolution=36 must be a positive multiple of 8"):
        validation_for(["--validation_prompts", "a", "--resolution", "36"])


@pytest.mark.parametrize("flags, message", [
    (["--validation_steps", "5"], "--validation_steps needs prompts"),
    (["--validation_prompts", "a", "--validation_scheduler", "lmsx"],
     "unknown --validation_scheduler 'lmsx': choose one of ddim"),
    (["--validation_prompts", "a", "--validation_steps", "2", "--validation_epochs", "1"],
     "give --validation_steps or --validation_epochs, not both"),
    (["--validation_prompts", "a", "--num_validation_images", "0"],
     "--num_validation_images must be at least 1"),
])
def test_bad_validation_flags(flags, message):
    from sdjax.config import parse_train_args
    from sdjax.errors import ConfigError

    cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "tiny", "--train_data_dir",
                               DEMO_DATA, *flags])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg.validate()


def test_repeated_validation_holds_no_device_memory(run, tmp_path):
    # The run's validation settings: its compiled program comes from the compilation cache.
    validation, sd = validation_for(["--validation_prompts", *PROMPTS, "--resolution", "32",
                                     "--num_validation_images", "2", "--seed", "3",
                                     "--validation_num_inference_steps", "3",
                                     "--validation_guidance_scale", "4.0",
                                     "--validation_scheduler", "euler_a",
                                     "--output_dir", str(tmp_path)])
    params = sd.sampler().place(sd.params)

    def device_bytes():
        gc.collect()
        arrays = jax.live_arrays()
        return len(arrays), sum(a.nbytes for a in arrays)

    validation.run(1, params)
    after_first = device_bytes()
    for step in (2, 3):
        validation.run(step, params)
    assert device_bytes() == after_first
