"""`train_flax.py merge`: A1111's weighted sum and add difference, exact against numpy on tiny
models, from any mix of diffusers folders and single files."""

import contextlib
import io
import os

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from sdjax import ConfigError, SdjaxError, StableDiffusion, WeightsError
from sdjax.cli import main
from sdjax.merge import merge_models

COMPONENTS = ("unet", "vae", "text_encoder")


def _shifted(params, seed):
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [
        np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def models(sd1, sd1_dir, tmp_path_factory):
    """A: the tiny SD 1.x folder; B: a diffusers folder; C: a single file (same architecture)."""
    folder = tmp_path_factory.mktemp("merge-inputs")
    b = {c: _shifted(sd1.params[c], 1) for c in COMPONENTS}
    c = {c: _shifted(sd1.params[c], 2) for c in COMPONENTS}
    return {"A": (str(sd1_dir), sd1.params),
            "B": (sd1.save_pretrained(str(folder / "b"), params=b), b),
            "C": (sd1.save_single_file(str(folder / "c.safetensors"), params=c), c)}


def expect(trees, formula):
    return {c: jax.tree_util.tree_map(lambda *xs: formula(*[np.asarray(x) for x in xs]),
                                      *[t[c] for t in trees]) for c in COMPONENTS}


def assert_equal(got, want):
    for component in COMPONENTS:
        g, w = flatten_dict(got[component]), flatten_dict(want[component])
        assert g.keys() == w.keys()
        for path in w:
            np.testing.assert_array_equal(np.asarray(g[path]), w[path], err_msg=str(path))


def test_weighted_sum_of_folders_is_exact_and_loads_in_diffusers(models, tmp_path):
    (a, pa), (b, pb) = models["A"], models["B"]
    out = merge_models([a, b], str(tmp_path / "out"), weights=[0.3, 0.7], log=lambda _: None)
    want = expect([pa, pb], lambda x, y: np.float32(0.3) * x + np.float32(0.7) * y)
    assert_equal(StableDiffusion.from_pretrained(out).params, want)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer is not None and pipe.unet.config.block_out_channels == [32, 64, 64]


def test_add_difference_with_a_single_file_to_a_single_file(models, sd1_dir, tmp_path):
    (a, pa), (b, pb), (c, pc) = models["A"], models["B"], models["C"]
    out = merge_models([a, b, c], str(tmp_path / "out.safetensors"), method="add_difference",
                       multiplier=0.5, original_config=str(sd1_dir), log=lambda _: None)
    want = expect([pa, pb, pc], lambda x, y, z: x + np.float32(0.5) * (y - z))
    back = StableDiffusion.from_single_file(out, original_config=str(sd1_dir))
    assert_equal(back.params, want)


def test_three_model_default_weights_from_the_command_line(models, sd1_dir, tmp_path):
    (a, pa), (b, pb), (c, pc) = models["A"], models["B"], models["C"]
    out = str(tmp_path / "out")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["merge", "--models", c, a, b, "--output", out, "--original_config",
                     str(sd1_dir), "--dtype", "float16"])
    assert code == 0, err.getvalue()
    third = np.float32(1 / 3)
    want = expect([pc, pa, pb], lambda x, y, z: (third * x + third * y + third * z).astype(
        np.float16).astype(np.float32))
    assert_equal(StableDiffusion.from_pretrained(out).params, want)
    unet = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet.values()} == {np.dtype(np.float16)}


def test_different_architectures_are_refused_naming_a_key(models, sd2_dir, tmp_path):
    with pytest.raises(WeightsError) as e:
        merge_models([models["A"][0], str(sd2_dir)], str(tmp_path / "out"))
    message = str(e.value)
    assert "\n" not in message and "different architectures" in message
    assert "unet " in message and str(sd2_dir) in message
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="add_difference"), "exactly three models"),
    (dict(weights=[1.0]), "1 weights for 2 models"),
    (dict(multiplier=0.3), "--multiplier is for add_difference"),
    (dict(format="single_file"), "name --output FILE.safetensors"),
    (dict(fuse_lora=["/nonexistent/style.safetensors:0.8"]), "/nonexistent/style.safetensors"),
])
def test_bad_requests(models, tmp_path, kwargs, message):
    with pytest.raises(SdjaxError, match=message.replace("(", r"\(")):
        merge_models([models["A"][0], models["B"][0]], str(tmp_path / "out"),
                     log=lambda _: None, **kwargs)


def test_command_line_errors_are_one_line(models, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["merge", "--models", models["A"][0], models["B"][0], "--output",
                     str(tmp_path / "x.safetensors"), "--method", "add_difference"])
    assert code == 2
    assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
    with pytest.raises(ConfigError):
        merge_models([models["A"][0]], str(tmp_path / "out"))


def test_fuse_lora_into_a_merge_and_a_plain_fuse(models, sd1, tmp_path):
    """--fuse_lora folds LoRA files into the result: after a weighted sum, and into one model
    alone (a plain fuse), equal to sdjax.lora.fuse on the same weights."""
    from sdjax.lora.adapters import init_adapters
    from sdjax.lora.files import write_lora
    from sdjax.lora.fuse import fuse_lora_files
    from sdjax.lora.targets import find_targets, layer_names

    paths, _ = find_targets(sd1.params["unet"], "unet", layer_names("attention")["unet"])
    adapters = init_adapters(jax.random.key(0), sd1.params["unet"], paths, 2)
    adapters = jax.tree_util.tree_map(lambda x: x + np.float32(0.1), adapters)  # B != 0
    lora = write_lora(str(tmp_path / "lora"), {"unet": adapters}, 2, 4.0)
    (a, pa), (b, pb) = models["A"], models["B"]
    merged = merge_models([a, b], str(tmp_path / "merged"), weights=[0.5, 0.5],
                          fuse_lora=[f"{lora}:0.7"], log=lambda _: None)
    want = expect([pa, pb], lambda x, y: np.float32(0.5) * x + np.float32(0.5) * y)
    assert_equal(StableDiffusion.from_pretrained(merged).params,
                 fuse_lora_files(want, [f"{lora}:0.7"]))
    fused = merge_models([a], str(tmp_path / "fused"), fuse_lora=[lora], log=lambda _: None)
    got = StableDiffusion.from_pretrained(fused).params
    assert_equal(got, fuse_lora_files({c: pa[c] for c in COMPONENTS}, [lora]))
    assert not np.array_equal(got["unet"]["down_blocks_0"]["attentions_0"][
        "transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
        pa["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"][
            "kernel"])
