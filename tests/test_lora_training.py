"""LoRA training end to end: the LoRA files a run writes load in diffusers (both formats, text
encoder LoRA included) with images equal to sdjax's sampling with the same LoRA; checkpoints
hold only the adapters, are kept in step with their LoRA folders, and export / generate merge
them; --resume_lora; one-line errors for bad LoRA input.

One training run (module fixture) serves most tests: the tiny diffusers-made SD 1.x-style model,
LoCon on the UNet and LoRA on the text encoder, rank 4 and alpha 8 (scale 2), the frozen base in
bfloat16, 2 steps at 32 px with a high learning rate so the adapters move far from zero.
"""

import logging
import os
import warnings

import jax
import numpy as np
import pytest
import torch

from tests.conftest import DEMO_DATA
from tests.helpers import run_cli

PROMPTS = ["a red circle on a white background", "a yellow triangle"]


def lora_args(model, out, *extra):
    return ["text_to_image_lora", f"--pretrained_model_name_or_path={model}",
            f"--train_data_dir={DEMO_DATA}", f"--output_dir={out}", "--resolution=32",
            "--train_batch_size=1", "--max_train_steps=2", "--checkpointing_steps=1",
            "--checkpoints_total_limit=1", "--learning_rate=5e-2", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--train_text_encoder", "--lora_layers=locon", "--rank=4",
            "--lora_alpha=8", "--save_lora_format=both", "--frozen_dtype=bf16", "--seed=3",
            *extra]


@pytest.fixture(scope="module")
def lora_run(sd1_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    code, stdout, stderr = run_cli(lora_args(sd1_dir, out))
    assert code == 0, stderr
    return dict(out=str(out), stdout=stdout, model=str(sd1_dir))


@pytest.mark.jax_api
def test_run_writes_lora_files_not_a_pipeline(lora_run):
    out = lora_run["out"]
    names = set(os.listdir(out))
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
            "checkpoints", "checkpoint-2"} <= names
    assert not {"unet", "model_index.json", "checkpoint-1"} & names  # LoRA only; pruned with
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint_2"]  # the Orbax step
    assert sorted(os.listdir(os.path.join(out, "checkpoint-2"))) == [
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
        "written_by_sdjax.json"]  # the marker: sdjax only ever removes or moves these folders
    assert "training LoRA rank 4 (alpha 8) on unet (" in lora_run["stdout"]
    # The frozen base held in bfloat16 while computing in float32 (--frozen_dtype bf16).
    assert "compute float32, frozen weights bfloat16" in lora_run["stdout"]


def test_checkpoints_hold_only_the_adapters(lora_run):
    """The checkpoint's arrays are the adapters and their two Adam moments (and a few
    counters): no base weights."""
    import jax
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    path = os.path.join(lora_run["out"], "checkpoints", "checkpoint_2", "state")
    metadata = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    stored = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
    adapters = load_file(os.path.join(lora_run["out"], "pytorch_lora_weights.safetensors"))
    parameters = sum(v.size for v in adapters.values())
    assert 3 * parameters <= stored <= 3 * parameters + 16


def _reference(pipe, latents):
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                latents=torch.from_numpy(latents), output_type="np").images


def _sdjax_images(model, lora_spec, latents):
    from sdjax.pipeline import load_pipeline
    from sdjax.lora.fuse import fuse_lora_files

    sd = load_pipeline(model)
    sd.params.update(fuse_lora_files(sd.params, [lora_spec]))
    return sd(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=latents,
              scheduler="pndm", output_type="np")


@pytest.mark.parametrize("file", ["pytorch_lora_weights.safetensors",
                                  "pytorch_lora_weights_kohya.safetensors"])
def test_diffusers_loads_the_lora_with_equal_images(lora_run, file, caplog):
    """`pipe.load_lora_weights` takes the file without a word about unexpected or missing keys,
    and its images (UNet and text-encoder LoRA) equal sdjax's within 1e-4, float32."""
    from diffusers import StableDiffusionPipeline

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    pipe = StableDiffusionPipeline.from_pretrained(lora_run["model"], safety_checker=None)
    base = _reference(pipe, latents)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        if file.endswith("_kohya.safetensors"):
            pipe.load_lora_weights(lora_run["out"], weight_name=file)
        else:
            pipe.load_lora_weights(lora_run["out"])
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "unexpected" in m.lower() or "missing" in m.lower()
                or "not" in m.lower() and "lora" in m.lower()], said
    theirs = _reference(pipe, latents)
    ours = _sdjax_images(lora_run["model"], os.path.join(lora_run["out"], file), latents)
    assert np.abs(theirs - base).max() > 1e-2  # the LoRA changes the images
    assert np.abs(ours - theirs).max() < 1e-4


def test_generate_from_the_checkpoint_equals_generate_with_the_lora_file(lora_run, tmp_path):
    """generate --checkpoint merges the checkpoint's adapters into the run's base; generate
    --model BASE --lora FILE merges the file's: the same weights, the same images."""
    from PIL import Image

    common = ["--prompt", PROMPTS[0], "--num_inference_steps=2", "--height=32", "--width=32"]
    a, b = tmp_path / "from-checkpoint", tmp_path / "from-file"
    checkpoint = os.path.join(lora_run["out"], "checkpoints", "checkpoint_2")
    assert run_cli(["generate", f"--checkpoint={checkpoint}", f"--output_dir={a}", *common])[0] == 0
    assert run_cli(["generate", f"--model={lora_run['model']}",
                    f"--lora={lora_run['out']}", f"--output_dir={b}", *common])[0] == 0
    c = tmp_path / "base"
    assert run_cli(["generate", f"--model={lora_run['model']}", f"--output_dir={c}", *common])[0] == 0
    image = {k: np.asarray(Image.open(f / "grid.png"), np.int16) for k, f in
             (("ckpt", a), ("file", b), ("base", c))}
    assert np.abs(image["ckpt"] - image["file"]).max() <= 1
    assert np.abs(image["ckpt"] - image["base"]).max() > 8


def test_compare_a_lora_run(lora_run, tmp_path):
    """compare on a LoRA run: a column per checkpoint and one for the final LoRA file (the
    same adapters here: equal columns); --lora fuses another LoRA into every column."""
    from PIL import Image

    common = ["compare", f"--output_dir={lora_run['out']}", "--prompts", PROMPTS[0],
              "--num_inference_steps=2", "--height=32", "--width=32"]
    code, stdout, stderr = run_cli(common + [f"--output={tmp_path / 'a.png'}"])
    assert code == 0, stderr
    assert "1 prompts x 2 checkpoints" in stdout and "final LoRA:" in stdout
    file = os.path.join(lora_run["out"], "pytorch_lora_weights.safetensors")
    code, stdout, stderr = run_cli(common + [f"--output={tmp_path / 'b.png'}",
                                             f"--lora={file}:0.5"])
    assert code == 0, stderr
    a = np.asarray(Image.open(tmp_path / "a.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "b.png"), np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() > 8  # the extra LoRA changes the images
    # The final LoRA column has the last checkpoint's weights (the same adapters).
    from sdjax.checkpoints import read_model_weights
    from sdjax.lora.fuse import fuse_lora_files
    from sdjax.pipeline import load_pipeline

    base = load_pipeline(lora_run["model"]).params
    final = fuse_lora_files({c: base[c] for c in ("unet", "text_encoder")}, [file])
    last, *_ = read_model_weights(os.path.join(lora_run["out"], "checkpoints", "checkpoint_2"),
                                  base)
    for component in ("unet", "text_encoder"):
        for got, want in zip(jax.tree_util.tree_leaves(final[component]),
                             jax.tree_util.tree_leaves(last[component])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lora_flag_fuses_files_into_the_base(lora_run, tmp_path):
    """--lora FILE[:SCALE] on a training command: the base the run trains (and validates,
    exports, generates) from has the LoRA fused in, and the checkpoints record it."""
    from sdjax.config import parse_train_args
    from sdjax.lora.fuse import fuse_lora_files
    from sdjax.pipeline import load_base, load_pipeline
    from sdjax.train.setup import base_model_spec, load_base_model

    file = os.path.join(lora_run["out"], "pytorch_lora_weights.safetensors")
    cfg, _ = parse_train_args(lora_args(lora_run["model"], str(tmp_path / "o"))[1:]
                              + ["--lora", f"{file}:0.5"], lora=True)
    cfg.validate()
    spec = base_model_spec(cfg)
    assert spec["lora"] == [f"{file}:0.5"]
    plain = load_pipeline(lora_run["model"]).params
    want = fuse_lora_files(plain, [f"{file}:0.5"])

    def to_q(params):
        return np.asarray(params["unet"]["down_blocks_0"]["attentions_0"][
            "transformer_blocks_0"]["attn1"]["to_q"]["kernel"])

    assert not np.array_equal(to_q(want), to_q(plain))
    for sd in (load_base_model(cfg), load_base(spec)):
        np.testing.assert_array_equal(to_q(sd.params), to_q(want))


def test_resume_lora_starts_from_the_file(lora_run):
    """--resume_lora: the adapters start as the file's (alpha differences folded into B)."""
    from flax.traverse_util import flatten_dict

    from sdjax.config import parse_train_args
    from sdjax.lora.files import read_lora
    from sdjax.lora.training import setup_lora
    from sdjax.pipeline import load_pipeline

    sd = load_pipeline(lora_run["model"])
    file = os.path.join(lora_run["out"], "pytorch_lora_weights.safetensors")
    cfg, _ = parse_train_args(lora_args(lora_run["model"], "/tmp/unused")[1:]
                              + [f"--resume_lora={file}", "--lora_alpha=4"], lora=True)
    run = setup_lora(cfg, sd.params)
    loaded = read_lora(file, {c: sd.params[c] for c in ("unet", "text_encoder")})
    for component in ("unet", "text_encoder"):
        ours, theirs = flatten_dict(run.adapters[component]), flatten_dict(
            loaded.adapters[component])
        assert ours.keys() == theirs.keys()
        for key in ours:  # file scale 8/4 = 2, run scale 4/4 = 1: B doubled
            factor = 2.0 if key[-1] == "up" else 1.0
            np.testing.assert_allclose(ours[key], theirs[key] * factor, rtol=1e-6)
    cfg.rank = 8
    with pytest.raises(Exception, match="has rank 4 .* give --rank 4"):
        setup_lora(cfg, sd.params)


@pytest.mark.parametrize("flags, message", [
    (["--rank=0"], "--rank=0 must be at least 1"),
    (["--rank=64"], r"--rank=64 is larger than .* choose a rank of at most"),
    (["--lora_layers=to_q,attn_9"], "--lora_layers: attn_9 match no layer"),
    (["--lora_dropout=1.5"], "--lora_dropout must be at least 0 and below 1"),
    (["--save_lora_format=ckpt"], "--save_lora_format='ckpt': choose one of"),
    (["--resume_lora=/nonexistent/lora.safetensors"], "--resume_lora /nonexistent"),
])
def test_bad_lora_input_is_one_line_and_writes_nothing(flags, message, tmp_path, sd1_dir):
    out = tmp_path / "out"
    code, _, stderr = run_cli(lora_args(sd1_dir, out, *flags))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, stderr), stderr
    assert not out.exists()


def test_lora_flags_need_a_lora_command(tmp_path, sd1_dir):
    code, _, stderr = run_cli(["text_to_image", f"--pretrained_model_name_or_path={sd1_dir}",
                               f"--train_data_dir={DEMO_DATA}", f"--output_dir={tmp_path}/o",
                               "--rank=8"])
    assert code == 2 and "--rank is a LoRA flag: run `python train_flax.py text_to_image_lora" \
        in stderr
