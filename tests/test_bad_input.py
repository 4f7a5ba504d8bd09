"""Every bad input ends in one clear WeightsError/ConfigError naming what and where."""

import json
import os
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from sdjax import ConfigError, StableDiffusion, WeightsError


@pytest.fixture
def folder(sd1_dir, tmp_path):
    return shutil.copytree(sd1_dir, tmp_path / "pipe")


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path():
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained("./no/such/folder")
    assert "./no/such/folder does not exist" in _one_line(e)


def test_hub_id_not_in_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained("someone/not-cached")
    message = _one_line(e)
    assert "someone/not-cached" in message and "HF_HUB_OFFLINE=1" in message


def test_invalid_hub_id():
    with pytest.raises(WeightsError, match="neither an existing folder nor a valid hub id"):
        StableDiffusion.from_pretrained("bad id with spaces")


def test_missing_subfolder(folder):
    shutil.rmtree(folder / "vae")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    assert "has no vae/ subfolder" in _one_line(e)


def test_missing_config(folder):
    os.remove(folder / "unet" / "config.json")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    assert "unet config not found" in _one_line(e)


def test_missing_weights_file(folder):
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    message = _one_line(e)
    assert f"no weights file in {folder / 'unet'}" in message
    assert "diffusion_pytorch_model.safetensors" in message and "found config.json" not in message


def test_missing_variant(folder):
    with pytest.raises(WeightsError, match="no 'fp16' variant"):
        StableDiffusion.from_pretrained(str(folder), variant="fp16")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(folder, keep):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    message = _one_line(e)
    assert str(path) in message and "damaged or incomplete" in message


def test_shape_mismatch_names_key_and_both_shapes(folder):
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config["cross_attention_dim"] = 48
    path.write_text(json.dumps(config))
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    message = _one_line(e)
    assert "wrong shapes" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight: expected (32, 48), found (32, 32)" in message


def test_missing_and_unexpected_keys_are_listed(folder):
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["encoder.layers.9.extra.weight"] = state["final_layer_norm.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(str(folder))
    message = _one_line(e)
    assert "1 missing (e.g. encoder.layers.1.mlp.fc2.bias)" in message
    assert "1 unexpected (e.g. encoder.layers.9.extra.weight)" in message
    assert str(path) in message


def test_unknown_math_option_in_config(folder):
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config["class_embed_type"] = "timestep"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        StableDiffusion.from_pretrained(str(folder))
    assert "class_embed_type='timestep'" in _one_line(e)


def test_corrupt_config_json(folder):
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read vae config"):
        StableDiffusion.from_pretrained(str(folder))


def test_unknown_shipped_config():
    with pytest.raises(WeightsError, match="unknown model config 'sd99'.*sd15"):
        StableDiffusion.from_config("sd99")
