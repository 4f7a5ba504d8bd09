"""train_flax.py: the embedded default runs offline; bad input is one line on stderr, exit 2."""

import os
import subprocess
import sys

from tests.conftest import xla_flags
from tests.tiny_torch import REPO


def run(*args, devices=1):
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               XLA_FLAGS=xla_flags(devices))
    return subprocess.run([sys.executable, os.path.join(REPO, "train_flax.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_demo_config_trains_checkpoints_and_exports(tmp_path):
    """README's first command (its step count cut): configs/demo.yaml as shipped."""
    out = tmp_path / "demo"
    result = run("--config", "configs/demo.yaml", f"--output_dir={out}", "--max_train_steps=20",
                 "--checkpointing_steps=5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "12 images from configs/demo_data" in result.stdout
    # demo.yaml keeps the newest two (checkpoints_total_limit: 2).
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint_15", "checkpoint_20"]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.unet.config.block_out_channels == [32, 32, 64]


def test_missing_model_is_one_line_error(tmp_path):
    result = run(f"--pretrained_model_name_or_path={tmp_path / 'missing'}",
                 "--train_data_dir=configs/demo_data", "--resolution=64", "--train_batch_size=1",
                 f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_help_and_bad_checkpoint(tmp_path):
    result = run("export", "--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "is not a checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr
