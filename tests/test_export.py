"""save_pretrained writes a folder that current diffusers loads exactly, and that generates."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sdjax import StableDiffusion

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module")
def exported(sd2, tmp_path_factory):
    return sd2.save_pretrained(str(tmp_path_factory.mktemp("export") / "pipe"))


def test_export_files_are_bit_identical_to_source(sd2_dir, exported):
    for component, rel in WEIGHTS.items():
        source = load_file(os.path.join(sd2_dir, rel))
        written = load_file(os.path.join(exported, rel))
        assert written.keys() == source.keys(), component
        for key, value in source.items():
            assert written[key].dtype == value.dtype
            np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_export_loads_in_diffusers_without_missing_or_unexpected_keys(exported):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for cls, sub in [(UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")]:
        _, info = cls.from_pretrained(os.path.join(exported, sub), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    _, info = CLIPTextModel.from_pretrained(os.path.join(exported, "text_encoder"),
                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_export_model_index_names_pytorch_classes(exported):
    with open(os.path.join(exported, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_exported_pipeline_generates(exported):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_export_of_random_init_matches_our_forward(tmp_path):
    """A model that never came from PyTorch (random init from a shipped config) exports to
    diffusers weights that compute what our model computes."""
    from diffusers import UNet2DConditionModel

    sd = StableDiffusion.from_config("tiny", seed=3)
    out = sd.save_pretrained(str(tmp_path / "tiny"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 6, 32)).astype(np.float32)
    ours = np.asarray(sd.unet.apply({"params": sd.params["unet"]}, sample, 7, context))
    with torch.no_grad():
        ref = unet(torch.from_numpy(sample), 7, torch.from_numpy(context)).sample.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_export_replaces_params_and_converts_dtype(sd2, tmp_path):
    import jax

    bumped = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.0, sd2.params["unet"])
    out = sd2.save_pretrained(str(tmp_path / "half"), params={"unet": bumped}, dtype=np.float16)
    written = load_file(os.path.join(out, WEIGHTS["unet"]))
    assert all(v.dtype == np.float16 for v in written.values())
    bias = written["conv_in.bias"].astype(np.float32)
    expected = (np.asarray(sd2.params["unet"]["conv_in"]["bias"]) + 1.0).astype(np.float16)
    np.testing.assert_array_equal(bias, expected.astype(np.float32))


def test_export_keeps_other_files_in_directory(sd2, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "keep.txt").write_text("user data")
    sd2.save_pretrained(str(run))
    assert (run / "checkpoints" / "keep.txt").read_text() == "user data"
    assert not [p for p in run.rglob("*.tmp-*")]
