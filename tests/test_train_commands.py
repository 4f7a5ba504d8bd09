"""The seeds' command lines run with only the script name changed (hub ids -> local tiny models
and data, step counts cut), and their outputs are what diffusers users expect."""

import glob
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from sdjax.cli import main
from tests.conftest import DEMO_DATA, xla_flags
from tests.helpers import assert_diffusers_pipeline

NARUTO = ("--use_ema --resolution=512 --center_crop --random_flip --train_batch_size=1 "
          "--gradient_accumulation_steps=4 --gradient_checkpointing --max_train_steps=1 "
          "--learning_rate=1e-05 --max_grad_norm=1 --lr_scheduler=constant --lr_warmup_steps=0")


def run(args, capsys=None):
    code = main(args.split() if isinstance(args, str) else list(args))
    out = capsys.readouterr() if capsys else None
    return code, out


class Printed:
    def __init__(self, out, err):
        self.out, self.err = out, err


def run_with_devices(args, devices: int):
    """`python train_flax.py ARGS` in a fresh process with `devices` CPU devices."""
    import subprocess
    import sys

    from tests.tiny_torch import REPO

    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_flax.py"), *args.split()],
                            env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, Printed(result.stdout, result.stderr)


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.heavy
def test_naruto_dataset_name_and_flax_variant(tiny_dir, saved_dataset, tmp_path):
    out = tmp_path / "sd-naruto-model"
    code, printed = run_with_devices(f"--pretrained_model_name_or_path={tiny_dir} "
                                     f"--dataset_name={saved_dataset} {NARUTO} --output_dir={out}", 1)
    assert code == 0, printed.err
    assert "12 images from " + saved_dataset in printed.out
    # The Flax script's command: no EMA, no accumulation, --mixed_precision="fp16".
    out = tmp_path / "sd-naruto-model-flax"
    code, printed = run_with_devices(
        f"--pretrained_model_name_or_path={tiny_dir} --dataset_name={saved_dataset} "
        "--resolution=512 --center_crop --random_flip --train_batch_size=1 "
        "--mixed_precision=fp16 --max_train_steps=1 --learning_rate=1e-05 "
        f"--max_grad_norm=1 --output_dir={out}", 1)
    assert code == 0, printed.err
    assert "compute bfloat16" in printed.out
    pipe = assert_diffusers_pipeline(str(out))
    assert str(pipe.unet.dtype) == "torch.float32"  # master weights stay float32


@pytest.mark.slow
@pytest.mark.heavy
def test_minecraft_sd2_checkpoints_resume_and_checkpoint_to_model(tiny_v_dir, saved_dataset, tmp_path):
    """768 px: 9,216-token self-attention in the UNet's first level. Run on one device so that a
    micro-batch is one image, which keeps the attention matrices inside a CI machine's memory."""
    model_dir = tmp_path / "minecraft-model"
    common = (f"--pretrained_model_name_or_path={tiny_v_dir} --dataset_name={saved_dataset} "
              "--use_ema --resolution=768 --train_batch_size=1 --gradient_accumulation_steps=4 "
              "--gradient_checkpointing --checkpointing_steps=1 --learning_rate=1e-05 "
              "--max_grad_norm=1 --lr_scheduler=constant --lr_warmup_steps=0 "
              f"--output_dir={model_dir}")
    code, printed = run_with_devices(f"{common} --max_train_steps=2", 1)
    assert code == 0, printed.err
    assert "prediction v_prediction" in printed.out
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    final = unet_weights(str(model_dir))

    # The crash-recovery command: resume from the latest checkpoint and go on.
    code, printed = run_with_devices(
        f"{common} --max_train_steps=3 --resume_from_checkpoint latest", 1)
    assert code == 0, printed.err
    assert "training steps 2 -> 3" in printed.out

    # Turning checkpoint 1 into a model, the seed's way (the diffusers name checkpoint-N).
    code, printed = run_with_devices(
        f"{common} --max_train_steps=1 --resume_from_checkpoint checkpoint-1", 1)
    assert code == 0, printed.err
    from_checkpoint = unet_weights(str(model_dir))
    assert any(not np.array_equal(final[k], from_checkpoint[k]) for k in final)

    # ... and the same with the export command, which needs no training flags.
    code, printed = run_with_devices(
        f"export --checkpoint {model_dir}/checkpoints/checkpoint_1 --output {tmp_path / 'exported'}", 1)
    assert code == 0, printed.err
    exported = unet_weights(str(tmp_path / "exported"))
    for key in from_checkpoint:
        np.testing.assert_array_equal(exported[key], from_checkpoint[key])


@pytest.mark.slow
def test_zhihu_sd15_with_seed_and_train_data_dir(tiny_dir, tmp_path):
    """The zhihu seed's command: naruto's flags with a local folder (README's own-data
    variant of the naruto command) and --seed."""
    out = tmp_path / "sd-naruto-model"
    code, printed = run_with_devices(f"--pretrained_model_name_or_path={tiny_dir} "
                                     f"--train_data_dir={DEMO_DATA} {NARUTO} --seed=42 "
                                     f"--output_dir={out}", 1)
    assert code == 0, printed.err
    assert "per-device batch 1, global batch 1, accumulation 4, effective batch 4" in printed.out
    assert_diffusers_pipeline(str(out))
    before, after = unet_weights(tiny_dir), unet_weights(str(out))
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # it trained
    assert glob.glob(str(out / "logs" / "text2image-fine-tune" / "events.out.tfevents.*"))


def test_pytorch_only_flags_are_accepted_with_a_note(tiny_dir, tmp_path, capsys):
    code, printed = run(f"--pretrained_model_name_or_path={tiny_dir} --train_data_dir={DEMO_DATA} "
                        "--resolution=64 --train_batch_size=1 --max_train_samples=8 --num_train_epochs=1 "
                        "--enable_xformers_memory_efficient_attention --allow_tf32 "
                        f"--dataloader_num_workers=2 --output_dir={tmp_path / 'out'}", capsys)
    assert code == 0, printed.err
    assert "--enable_xformers_memory_efficient_attention: ignored" in printed.out
    assert "--allow_tf32: ignored" in printed.out
    # 8 of the 12 images, one epoch: 8 / (1 per device x 4 devices) = 2 steps.
    assert "8 images from" in printed.out and "training steps 0 -> 2" in printed.out
