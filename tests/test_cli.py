"""train_flax.py: the embedded default runs offline; bad input is one line on stderr, exit 2."""

import os
import subprocess
import sys

from tests.tiny_torch import REPO


def run(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_flax.py"), *args], cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)


def test_default_command_exports_tiny_model(tmp_path):
    result = run("--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "random weights from configs/models/tiny" in result.stdout
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.unet.config.block_out_channels == [32, 32, 64]


def test_missing_model_is_one_line_error(tmp_path):
    result = run("--pretrained_model_name_or_path", str(tmp_path / "missing"),
                 "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
