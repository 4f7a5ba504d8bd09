"""A run whose output_dir is a bucket (gs://), against a local Google Cloud Storage emulator:
checkpoints, logs, validation images, buckets.jsonl and the exported pipeline land in the
bucket; resume, export, generate and compare read checkpoints from it."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from sdjax.config import parse_train_args
from sdjax.errors import ConfigError
from tests.conftest import DEMO_DATA, xla_flags
from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (fixtures)
from tests.tiny_torch import REPO


def _run(cwd, *args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_flax.py"), *args], cwd=cwd,
                            env=dict(os.environ, XLA_FLAGS=xla_flags(2)),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _train_args(out, steps, *extra):
    return ["--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
            "--resolution=32", "--center_crop", "--train_batch_size=1", "--use_ema",
            "--learning_rate=1e-3", "--checkpointing_steps=2", f"--max_train_steps={steps}",
            "--seed=4", f"--output_dir={out}", *extra]


@pytest.mark.slow
def test_a_run_on_a_bucket(gcs_bucket, tmp_path):
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    run = f"{gcs_bucket}/run"
    _run(tmp_path, *_train_args(run, 4, "--enable_bucket", "--min_bucket_reso=16", "--bucket_reso_steps=16",
                                "--max_bucket_reso=32", "--validation_prompts", "a red cube",
                                "--num_validation_images=1", "--validation_num_inference_steps=2"))
    objects = {name[len(run) - len("gs://"):].lstrip("/") for name in fs.find(run[len("gs://"):])}
    for expected in ("checkpoints/checkpoint_2/commit_success.txt",
                     "checkpoints/checkpoint_4/commit_success.txt", "buckets.jsonl",
                     "validation/step-0000002.png", "validation/step-0000004.png",
                     "model_index.json", "unet/diffusion_pytorch_model.safetensors",
                     "tokenizer/tokenizer_config.json", "text_encoder/config.json"):
        assert expected in objects, sorted(objects)
    assert any(n.startswith("logs/text2image-fine-tune/events.out.tfevents") for n in objects)
    assert os.listdir(tmp_path) == []  # nothing local: no folder named "gs:"

    # export reads a checkpoint from the bucket: the run's final (EMA) weights at step 4.
    _run(tmp_path, "export", "--checkpoint", f"{run}/checkpoints/checkpoint_4", "--output",
         str(tmp_path / "exported"))
    final = load(fs.cat(f"{run[5:]}/unet/diffusion_pytorch_model.safetensors"))
    exported = load_file(str(tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors"))
    for key in final:
        np.testing.assert_array_equal(final[key], exported[key])

    # Back to step 2 by path: the old branch's step 4 is moved aside within the bucket.
    out = _run(tmp_path, *_train_args(run, 3, "--checkpointing_steps=1",
                                      f"--resume_from_checkpoint={run}/checkpoints/checkpoint_2"))
    assert "training steps 2 -> 3" in out and "were moved to" in out
    (branch,) = fs.ls(f"{run[5:]}/abandoned_checkpoints")
    assert fs.exists(f"{branch}/checkpoint_4/commit_success.txt")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{run[5:]}/checkpoints")) == [
        "checkpoint_2", "checkpoint_3"]

    # generate and compare read bucket checkpoints and write into the bucket.
    _run(tmp_path, "generate", "--checkpoint", f"{run}/checkpoints/checkpoint_3", "--prompt",
         "a red cube", "--num_inference_steps=2", f"--output_dir={gcs_bucket}/gen")
    assert fs.exists(f"{gcs_bucket[5:]}/gen/grid.png") and fs.exists(f"{gcs_bucket[5:]}/gen/generate.json")
    out = _run(tmp_path, "compare", f"--output_dir={run}", "--prompts", "a red cube",
               "--num_inference_steps=2")
    assert "final" in out and fs.exists(f"{run[5:]}/compare.png")
    assert os.listdir(tmp_path) == ["exported"]


def test_the_latent_cache_is_refused_on_a_bucket():
    base = ["--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
            "--output_dir=gs://bucket/run"]
    cfg, _ = parse_train_args(base + ["--cache_latents"])
    with pytest.raises(ConfigError, match="give a local --latent_cache_dir"):
        cfg.validate()
    cfg, _ = parse_train_args(base + ["--cache_latents", "--latent_cache_dir=/tmp/x"])
    cfg.validate()
