"""Bad single-file input: one clear line (exit status 2 from the command line)."""

import contextlib
import io
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdjax import ConfigError, StableDiffusion, WeightsError
from sdjax.cli import main
from tests.conftest import DEMO_DATA


@pytest.fixture(scope="module")
def good_file(sd1, tmp_path_factory):
    return sd1.save_single_file(str(tmp_path_factory.mktemp("good") / "sd1.safetensors"))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_truncated_safetensors(good_file, tmp_path):
    data = open(good_file, "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(str(path))
    assert "damaged or incomplete" in one_line(e)
    code, err = run_main(["generate", "--model", str(path), "--prompt", "x", "--output_dir",
                          str(tmp_path / "out")])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "damaged or incomplete" in err


def test_sdxl_file_is_named(tmp_path):
    path = str(tmp_path / "xl.safetensors")
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
               np.ones(4, np.float32),
               "model.diffusion_model.input_blocks.0.0.weight": np.ones(4, np.float32)}, path)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(path)
    assert "SDXL" in one_line(e) and "conditioner.embedders" in str(e.value)


def test_file_of_something_else_names_what_it_holds(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               np.ones((4, 4), np.float32)}, path)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(path)
    message = one_line(e)
    assert "not a Stable Diffusion 1.x/2.x single-file checkpoint" in message
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down" in message


def test_ckpt_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(str(path))
    assert "needs torch" in one_line(e) and "pip install torch" in str(e.value)


def test_ckpt_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(str(path))
    assert "weights_only=True" in one_line(e)


def test_missing_original_config(good_file, tmp_path):
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(good_file, original_config=str(tmp_path / "v1.yaml"))
    assert "v1.yaml does not exist" in one_line(e)
    from sdjax.config import parse_train_args

    cfg, _ = parse_train_args(["--pretrained_model_name_or_path", good_file,
                               "--original_config", str(tmp_path / "v1.yaml"),
                               "--train_data_dir", DEMO_DATA])
    with pytest.raises(ConfigError, match="--original_config .*v1.yaml does not exist"):
        cfg.validate()
    code, err = run_main(["--pretrained_model_name_or_path", good_file, "--original_config",
                          str(tmp_path / "v1.yaml"), "--train_data_dir", DEMO_DATA,
                          "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_original_config_that_is_not_an_ldm_yaml(good_file, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\n")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(good_file, original_config=str(path))
    assert "not an LDM config" in one_line(e)


def test_original_config_with_a_folder_model(sd1_dir, tmp_path):
    with pytest.raises(WeightsError, match="is not a file: drop --original_config"):
        from sdjax.pipeline import load_pipeline

        load_pipeline(str(sd1_dir), original_config=str(sd1_dir))


def test_export_single_file_needs_a_safetensors_name(tmp_path):
    code, err = run_main(["export", "--checkpoint", str(tmp_path), "--output",
                          str(tmp_path / "model.ckpt"), "--format", "single_file"])
    assert code == 2 and "FILE.safetensors" in err and err.count("\n") == 1
