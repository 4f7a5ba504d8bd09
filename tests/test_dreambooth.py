"""The dreambooth command end to end: seed 001's flow (class images generated, then reused), the
diffusers DreamBooth README commands with only the script name changed, one-line errors for bad
input, and --pre_compute_text_embeddings with --offset_noise.

Runtime: every run is in-process (`sdjax.cli.main`), so runs whose train step is the same program
share its compile through the session's XLA cache; all runs use the tiny model at 32 px, 2 steps,
4 class images sampled in 2 steps.
"""

import contextlib
import glob
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax.cli import main
from tests.conftest import DEMO_DATA
from tests.helpers import (assert_diffusers_pipeline, changed, override, random_pngs, readme_argv,
                           run_cli, weights)

INSTANCE_IMAGES = 5
CLASS_IMAGES = 4  # one sampling call on the 4 test devices (--sample_batch_size 4 per device)
CLASS_NAMES = [f"class_{j:05d}.png" for j in range(CLASS_IMAGES)]
def class_folder_state(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    return random_pngs(tmp_path_factory.mktemp("dreambooth") / "instance-images", INSTANCE_IMAGES)


# --- 1. seed 001: DreamBooth with prior preservation and the text encoder ------------------------

def seed_001_args(model, instance_dir, class_dir, output_dir):
    """Seed 001's hyperparameters (instance/class prompts, train_batch_size 2, lr 5e-6, prior
    loss weight 1.0, max_grad_norm 1.0, text encoder trained) as the dreambooth command's flags;
    cut short: 2 steps instead of 400, 32 px, 4 class images sampled in 2 steps instead of 200
    in 50."""
    return ["dreambooth", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={instance_dir}", f"--class_data_dir={class_dir}",
            f"--output_dir={output_dir}", "--instance_prompt=photo of unqtkn dog",
            "--class_prompt=photo of a dog", "--with_prior_preservation",
            "--prior_loss_weight=1.0", "--train_text_encoder", "--learning_rate=5e-6",
            "--train_batch_size=2", "--max_grad_norm=1.0", "--max_train_steps=2",
            "--resolution=32", f"--num_class_images={CLASS_IMAGES}",
            "--class_num_inference_steps=2"]


@pytest.fixture(scope="module")
def seed_001(tiny_dir, instance_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_001")
    class_dir = root / "class-images"
    class_dir.mkdir()  # empty: every class image is generated
    out = root / "fine-tuned-model"
    code, stdout, stderr = run_cli(seed_001_args(tiny_dir, instance_dir, class_dir, out))
    assert code == 0, stderr
    return dict(class_dir=str(class_dir), out=str(out), stdout=stdout, root=root)


def test_seed_001_generates_the_class_images(seed_001):
    assert sorted(os.listdir(seed_001["class_dir"])) == CLASS_NAMES  # complete, no partial files
    for name in CLASS_NAMES:
        with Image.open(os.path.join(seed_001["class_dir"], name)) as image:
            assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")
    stdout = seed_001["stdout"]
    assert (f"class images: generated {CLASS_IMAGES} of {CLASS_IMAGES} from 'photo of a dog'"
            in stdout)
    assert "per-device batch 2, global batch 8" in stdout
    assert "dreambooth: training unet + text_encoder" in stdout
    assert f"{INSTANCE_IMAGES} instance images from " in stdout
    assert f"{CLASS_IMAGES} class images from " in stdout and "prior loss weight 1.0" in stdout


def test_seed_001_exports_a_diffusers_pipeline_with_both_models_trained(seed_001, tiny_dir):
    out = seed_001["out"]
    assert_diffusers_pipeline(out)
    assert changed(weights(tiny_dir, "unet"), weights(out, "unet"))
    assert changed(weights(tiny_dir, "text_encoder"), weights(out, "text_encoder"))
    assert not changed(weights(tiny_dir, "vae"), weights(out, "vae"))  # frozen
    # TensorBoard logs under diffusers' DreamBooth tracker name.
    assert glob.glob(os.path.join(out, "logs", "dreambooth", "events.out.tfevents.*"))


def test_seed_001_text_encoder_matches_transformers(seed_001, tiny_dir):
    """The exported text encoder computes in transformers what the trained one computes in sdjax."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdjax import StableDiffusion

    out = seed_001["out"]
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    ids = tokenizer(["photo of unqtkn dog", "photo of a dog"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="np").input_ids
    theirs = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder")).eval()
    with torch.no_grad():
        reference = theirs(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()

    def ours(folder):
        sd = StableDiffusion.from_pretrained(folder)
        return np.asarray(sd.text_encoder.apply({"params": sd.params["text_encoder"]},
                                                ids.astype(np.int32)))

    trained, base = ours(out), ours(tiny_dir)
    assert trained.dtype == np.float32 and trained.shape == reference.shape
    assert np.abs(trained - reference).max() <= 1e-4
    # Training moved the outputs by more than that tolerance: the check tells them apart.
    assert np.abs(base - reference).max() > 1e-4


def test_seed_001_second_run_reuses_the_class_images(seed_001, tiny_dir, instance_dir):
    before = class_folder_state(seed_001["class_dir"])
    out = seed_001["root"] / "second-run"
    argv = seed_001_args(tiny_dir, instance_dir, seed_001["class_dir"], out)
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert (f"class images: {seed_001['class_dir']} already holds {CLASS_IMAGES} images "
            f"(>= {CLASS_IMAGES}); none generated") in stdout
    assert "class images: generated" not in stdout and "class images:" not in stderr
    assert class_folder_state(seed_001["class_dir"]) == before  # no file written or touched
    # The same command on the same images trains the same weights.
    for component in ("unet", "text_encoder"):
        assert not changed(weights(seed_001["out"], component), weights(str(out), component))


# --- 2. the diffusers DreamBooth README commands --------------------------------------------------
# As printed in diffusers' examples/dreambooth/README.md, with $MODEL_NAME, $INSTANCE_DIR,
# $CLASS_DIR and $OUTPUT_DIR filled in. Only the script name is changed (see `readme_argv`);
# then, to fit CI, `README_OVERRIDES` cuts --resolution (512 -> 32), --max_train_steps
# (400/800 -> 2) and --num_class_images (200 -> 4), and adds --class_num_inference_steps=2
# (class images in 2 denoising steps instead of 50). Batch size, learning rate, schedule,
# accumulation, prior loss weight and the rest run as printed.
#
# Compiling a train step is most of a run's time (~40 s of CPU for the tiny model), so the runs
# are chosen to need few programs: the PyTorch and Flax commands without (and with) prior
# preservation compile to the same step and share it. The Flax text encoder command is parsed
# and validated but not run: it would be one more program, and what it runs is covered by the
# others (text encoder + prior preservation: seed 001; the same at batch 1 and lr 2e-6: the
# PyTorch text encoder command, which adds --gradient_checkpointing). Left out altogether: the
# "8 GB GPU" command (its --mixed_precision=fp16 is an `accelerate launch` flag placed before the
# script name, and it needs DeepSpeed) and the "16 GB GPU" one (its flags --use_8bit_adam and
# --gradient_checkpointing are in the text encoder command; --gradient_accumulation_steps=2 is
# tested by the text_to_image tests).

README_COMMANDS = {
    "train_dreambooth": """
accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=400 \\
  --push_to_hub
""",
    "train_dreambooth-prior_preservation": """
accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --max_train_steps=800 \\
  --push_to_hub
""",
    "train_dreambooth-text_encoder": """
accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --train_text_encoder \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --use_8bit_adam \\
  --gradient_checkpointing \\
  --learning_rate=2e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --max_train_steps=800 \\
  --push_to_hub
""",
    "train_dreambooth_flax": """
python train_dreambooth_flax.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --learning_rate=5e-6 \\
  --max_train_steps=400
""",
    "train_dreambooth_flax-prior_preservation": """
python train_dreambooth_flax.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --learning_rate=5e-6 \\
  --num_class_images=200 \\
  --max_train_steps=800
""",
    "train_dreambooth_flax-text_encoder": """
python train_dreambooth_flax.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --train_text_encoder \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --learning_rate=2e-6 \\
  --num_class_images=200 \\
  --max_train_steps=800
""",
}

SCRIPT_NAMES = {"accelerate launch train_dreambooth.py": "python train_flax.py dreambooth",
                "python train_dreambooth_flax.py": "python train_flax.py dreambooth_flax"}
README_OVERRIDES = {"resolution": "32", "max_train_steps": "2",
                    "num_class_images": str(CLASS_IMAGES)}
README_RUNS = [name for name in README_COMMANDS if name != "train_dreambooth_flax-text_encoder"]
README_VARIABLES = ("MODEL_NAME", "INSTANCE_DIR", "CLASS_DIR", "OUTPUT_DIR")


def readme_run_argv(name, model, instance_dir, class_dir, out):
    """The README command `name` for train_flax.py, with the CI overrides."""
    command = README_COMMANDS[name]
    prior = "--with_prior_preservation" in command
    argv = readme_argv(command, dict(zip(README_VARIABLES,
                                         (model, instance_dir, str(class_dir), str(out)))),
                       SCRIPT_NAMES)
    assert argv[0] == ("dreambooth_flax" if "flax" in name else "dreambooth")
    overrides = dict(README_OVERRIDES, **({"class_num_inference_steps": "2"} if prior else {}))
    return override(argv, {k: v for k, v in overrides.items() if k != "num_class_images" or prior})


@pytest.mark.parametrize("name", list(README_COMMANDS))
def test_readme_command_parses(name, instance_dir, tmp_path):
    """Every README command (the one not run included) is a valid dreambooth run as printed."""
    from sdjax.config import parse_train_args

    command = README_COMMANDS[name]
    argv = readme_argv(command, dict(zip(README_VARIABLES, (
        "tiny", instance_dir, str(tmp_path / "class-images"), str(tmp_path / "out")))),
        SCRIPT_NAMES)
    cfg, notes = parse_train_args(argv[1:], task="dreambooth")
    cfg.validate()
    assert cfg.task == "dreambooth" and cfg.resolution == 512 and cfg.train_batch_size == 1
    assert cfg.train_text_encoder == ("--train_text_encoder" in command)
    assert cfg.prior_preservation == ("--with_prior_preservation" in command)
    assert cfg.learning_rate == (2e-6 if cfg.train_text_encoder else 5e-6)
    # PyTorch-only flags are accepted with a note each.
    expected = {f"--{flag}" for flag in ("use_8bit_adam", "push_to_hub") if f"--{flag}" in command}
    assert {note.split(": ignored (", 1)[0] for note in notes} == expected
    assert all(": ignored (" in note for note in notes)


@pytest.mark.parametrize("name", README_RUNS)
def test_readme_command(name, tiny_dir, instance_dir, tmp_path, capsys):
    command = README_COMMANDS[name]
    prior = "--with_prior_preservation" in command
    class_dir, out = tmp_path / "class-images", tmp_path / "path-to-save-model"
    argv = readme_run_argv(name, tiny_dir, instance_dir, class_dir, out)

    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    text_encoder = "--train_text_encoder" in command
    trained = "unet + text_encoder" if text_encoder else "unet;"
    assert f"dreambooth: training {trained}" in printed.out
    assert "per-device batch 1, global batch 4, accumulation 1" in printed.out
    if "--push_to_hub" in command:
        assert "note: --push_to_hub: ignored" in printed.out
    if prior:
        assert sorted(os.listdir(class_dir)) == CLASS_NAMES
        assert f"class images: generated {CLASS_IMAGES} of {CLASS_IMAGES}" in printed.out
        assert "prior loss weight 1.0" in printed.out
    else:
        assert "class images" not in printed.out + printed.err
    assert_diffusers_pipeline(str(out))
    assert changed(weights(tiny_dir, "unet"), weights(str(out), "unet"))
    trained_text_encoder = changed(weights(tiny_dir, "text_encoder"),
                                   weights(str(out), "text_encoder"))
    assert trained_text_encoder == text_encoder


def test_readme_override_replaces_values_and_adds_missing_flags():
    argv = override(["dreambooth", "--resolution=512", "--train_batch_size=1", "--use_ema"],
                    {"resolution": "32", "class_num_inference_steps": "2"})
    assert argv == ["dreambooth", "--resolution=32", "--train_batch_size=1", "--use_ema",
                    "--class_num_inference_steps=2"]


# --- 3. bad input: one line, exit 2, nothing compiled, no output_dir ------------------------------

@contextlib.contextmanager
def compile_events():
    """Records JAX's tracing/lowering/compiling events while inside."""
    events = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile") or event.startswith("/jax/compilation_cache"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


BAD_INPUT = {
    "empty instance folder": (["--instance_data_dir={empty}"], "contains no images"),
    "missing instance folder": (["--instance_data_dir={tmp}/no-such-folder"],
                                "no-such-folder is not a directory"),
    "prior without class prompt": (["--with_prior_preservation", "--class_data_dir={tmp}/class"],
                                   "--with_prior_preservation needs --class_prompt"),
    "prior without class folder": (["--with_prior_preservation", "--class_prompt=a photo of dog"],
                                   "--with_prior_preservation needs --class_data_dir"),
    "class folder inside instance folder": (
        ["--with_prior_preservation", "--class_prompt=a photo of dog",
         "--class_data_dir={instance}/class"], "is inside --instance_data_dir"),
    "zero class images": (["--with_prior_preservation", "--class_prompt=a photo of dog",
                           "--class_data_dir={tmp}/class", "--num_class_images=0"],
                          "--num_class_images must be at least 1"),
    "train text encoder with pre-computed embeddings": (
        ["--train_text_encoder", "--pre_compute_text_embeddings"],
        "drop --pre_compute_text_embeddings"),
    "text encoder lr without training it": (["--text_encoder_lr=1e-6"], "add --train_text_encoder"),
    "text_to_image data flag": (["--train_data_dir={demo}"], "not --train_data_dir"),
    "dreambooth flag to text_to_image": (
        ["text_to_image", "--train_data_dir={demo}", "--instance_data_dir={instance}"],
        "--instance_data_dir is a DreamBooth flag"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line(case, tiny_dir, instance_dir, tmp_path, capsys):
    extra, message = BAD_INPUT[case]
    (tmp_path / "empty").mkdir()
    paths = dict(empty=tmp_path / "empty", tmp=tmp_path, instance=instance_dir, demo=DEMO_DATA)
    extra = [word.format(**paths) for word in extra]
    command = [extra.pop(0)] if extra[0] == "text_to_image" else ["dreambooth"]
    out = tmp_path / "out"
    argv = command + [f"--pretrained_model_name_or_path={tiny_dir}", f"--output_dir={out}",
                      "--resolution=32", "--max_train_steps=2"]
    if command == ["dreambooth"]:
        if not any(word.startswith("--instance_data_dir") for word in extra):
            argv.append(f"--instance_data_dir={instance_dir}")
        argv.append("--instance_prompt=a photo of sks dog")
    with compile_events() as events:
        code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert events == []  # failed before anything was traced or compiled
    assert not out.exists()
    assert not (tmp_path / "class").exists()
    assert not os.path.exists(os.path.join(instance_dir, "class"))


# --- class images with the model's own scheduler, whatever its class ----------------------------

def prior_preservation_args(model, instance_dir, class_dir, output_dir, *extra):
    """A short DreamBooth run with prior preservation: 32 px, batch 1, CLASS_IMAGES class images
    sampled in 2 steps."""
    return ["dreambooth", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={instance_dir}", f"--class_data_dir={class_dir}",
            f"--output_dir={output_dir}", "--instance_prompt=a photo of sks dog",
            "--class_prompt=a photo of dog", "--with_prior_preservation", "--resolution=32",
            "--train_batch_size=1", f"--num_class_images={CLASS_IMAGES}",
            "--class_num_inference_steps=2", *extra]


@pytest.mark.parametrize("scheduler_class, expected_note", [
    ("DDPMScheduler", None),  # common in pipelines written by training tools
    ("MyOwnScheduler", "MyOwnScheduler has no sdjax sampler; sampling with pndm"),
])
def test_class_images_with_the_models_scheduler(scheduler_class, expected_note, tiny_dir,
                                                 instance_dir, tmp_path, capsys, caplog):
    """A model whose scheduler_config.json names DDPMScheduler samples its class images with
    sdjax's ddpm (as diffusers' script samples them with that scheduler); a class no sampler
    reproduces samples with pndm (epsilon) and one note; the run never stops over it. (It
    stopped with "the model's scheduler DDPMScheduler has no sdjax sampler".)"""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name=scheduler_class, variance_type="fixed_small", clip_sample=False)
    config_path.write_text(json.dumps(config))
    class_dir = tmp_path / "class-images"
    code = main(prior_preservation_args(model, instance_dir, class_dir, tmp_path / "out",
                                        "--max_train_steps=1"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(os.listdir(class_dir)) == CLASS_NAMES
    notes = [r.getMessage() for r in caplog.records if "no sdjax sampler" in r.getMessage()]
    if expected_note is None:
        assert not notes
    else:
        assert len(notes) == 1 and expected_note in notes[0]


# --- 4. pre-computed text embeddings (the encoder frozen and off the devices), offset noise -------

def test_pre_computed_bf16_embeddings_compile_the_step_once(tiny_dir, instance_dir, tmp_path,
                                                            capsys, monkeypatch):
    """Under bf16 the embeddings are stored in bf16, the dtype the layout check compiled the
    step for: the step loop runs the check's executable and compiles nothing at step 1 (with
    float32 embeddings it compiled the whole step a second time)."""
    from sdjax.train import fit

    monkeypatch.setattr(fit, "device_memory", lambda device: 64 * 2 ** 30)  # a layout to choose
    code = main(["dreambooth", f"--pretrained_model_name_or_path={tiny_dir}",
                 f"--instance_data_dir={instance_dir}", f"--output_dir={tmp_path / 'out'}",
                 "--instance_prompt=a photo of sks dog", "--resolution=32",
                 "--train_batch_size=1", "--max_train_steps=2", "--mixed_precision=bf16",
                 "--pre_compute_text_embeddings"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "state replicated (chosen for 64.0 GiB per device" in printed.out
    assert "compiled the train step" not in printed.out


def test_pre_computed_text_embeddings_with_offset_noise(tiny_dir, instance_dir, tmp_path, capsys):
    from sdjax.config import parse_train_args

    # diffusers' DreamBooth --offset_noise: 0.1 x per-channel noise, as --noise_offset=0.1.
    assert parse_train_args(["--offset_noise"], task="dreambooth")[0].effective_noise_offset == 0.1
    class_dir = tmp_path / "class-images"
    out = tmp_path / "path-to-save-model"
    code = main(prior_preservation_args(tiny_dir, instance_dir, class_dir, out,
                                        "--learning_rate=5e-6", "--max_train_steps=2",
                                        "--pre_compute_text_embeddings", "--offset_noise"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "note:" not in printed.out  # --offset_noise is not one of the ignored flags
    assert "dreambooth: training unet;" in printed.out
    assert sorted(os.listdir(class_dir)) == CLASS_NAMES
    assert_diffusers_pipeline(str(out))
    assert changed(weights(tiny_dir, "unet"), weights(str(out), "unet"))
    assert not changed(weights(tiny_dir, "text_encoder"), weights(str(out), "text_encoder"))
