"""--pretrained_vae_name_or_path and --tokenizer_name: parts of the base pipeline from elsewhere,
recorded in checkpoints so that export, generate and compare rebuild the same base."""

import numpy as np
import pytest

from sdjax import StableDiffusion
from sdjax.errors import WeightsError
from sdjax.pipeline import load_base, load_pipeline


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """The tiny model with other random weights: its VAE stands in for a fine-tuned VAE."""
    return StableDiffusion.from_config("tiny", seed=7).save_pretrained(
        str(tmp_path_factory.mktemp("other") / "pipe"))


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("vae_path", ["vae folder", "pipeline folder"])
def test_the_vae_comes_from_the_given_folder(tiny_dir, other_dir, vae_path):
    path = f"{other_dir}/vae" if vae_path == "vae folder" else other_dir
    base = load_pipeline(tiny_dir)
    swapped = load_pipeline(tiny_dir, vae=path)
    other = load_pipeline(other_dir)
    for a, b in zip(_leaves(swapped.params["vae"]), _leaves(other.params["vae"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(swapped.params["unet"]), _leaves(base.params["unet"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(swapped.params["vae"]),
                                                        _leaves(base.params["vae"])))
    # What a checkpoint records rebuilds the same base.
    again = load_base({"pretrained_model_name_or_path": tiny_dir, "vae": path})
    for a, b in zip(_leaves(again.params["vae"]), _leaves(swapped.params["vae"])):
        np.testing.assert_array_equal(a, b)


def test_the_tokenizer_comes_from_the_given_folder(tiny_dir, other_dir):
    sd = load_pipeline(tiny_dir, tokenizer=f"{other_dir}/tokenizer")
    assert sd.tokenizer("a photo of a dog").input_ids == load_pipeline(
        other_dir).tokenizer("a photo of a dog").input_ids


def test_missing_parts_are_one_line_errors(tiny_dir, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(tiny_dir, vae=str(tmp_path / "no-such-vae"))
    with pytest.raises(WeightsError, match="cannot load a CLIP tokenizer from"):
        load_pipeline(tiny_dir, tokenizer=str(tmp_path))
    with pytest.raises(WeightsError, match="needs a pretrained model"):
        load_pipeline("tiny", vae=f"{tiny_dir}/vae")
