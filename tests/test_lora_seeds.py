"""The LoRA commands of the seeds with only the script name changed: seed 002's three
(`train_text_to_image_lora.py` on 15 cat photos, `train_dreambooth_lora.py` without and with
prior preservation) and seed 003's (`train_text_to_image_lora.py` on a hub data set), each run
to its end and its LoRA file loaded by diffusers.

As in tests/test_dreambooth.py, the shell variables point at local stand-ins (the tiny model,
the demo images with their metadata.jsonl for the cats, a saved data set for the Narutos) and,
to fit CI, `OVERRIDES` cut the resolution (512 -> 32), the steps (1500 -> 2), the class images
(200 -> 4, sampled in 2 steps) and the validation sampling (2 steps; diffusers' LoRA scripts
use the pipeline's default of 50), and seed 003's epochs (100 -> 2 steps). `--report_to=wandb`
logs to a stand-in for wandb (a module that records the calls): the service is not reachable
from CI.
"""

import importlib.machinery
import sys
import types

import pytest

from sdjax.cli import main
from tests.conftest import DEMO_DATA
from tests.helpers import override, random_pngs, readme_argv

SEED_002_TEXT_TO_IMAGE = """
accelerate launch --mixed_precision="fp16"  train_text_to_image_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATA_DIR \\
  --dataloader_num_workers=8 \\
  --resolution=512 --center_crop --random_flip \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --max_train_steps=1500 \\
  --learning_rate=1e-04 \\
  --max_grad_norm=1 \\
  --lr_scheduler="cosine" --lr_warmup_steps=0 \\
  --output_dir=${OUTPUT_DIR} \\
  --checkpointing_steps=500 \\
  --validation_prompt="A photo of a cat in a bucket" \\
  --validation_epochs=10 \\
  --seed=42 \\
  --report_to=wandb
"""

SEED_002_DREAMBOOTH = """
accelerate launch train_dreambooth_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks cat" \\
  --resolution=512 --center_crop \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --checkpointing_steps=100 \\
  --learning_rate=1e-4 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=1500 \\
  --validation_prompt="A photo of a sks cat in a bucket" \\
  --validation_epochs=10 \\
  --seed=42 \\
  --report_to="wandb"
"""

SEED_002_DREAMBOOTH_PRIOR = """
accelerate launch train_dreambooth_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks cat" \\
  --class_prompt="a photo of a cat" \\
  --with_prior_preservation --prior_loss_weight=0.5 \\
  --resolution=512 \\
  --train_batch_size=2 \\
  --gradient_accumulation_steps=1 \\
  --checkpointing_steps=100 \\
  --learning_rate=1e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=1500 \\
  --validation_prompt="A photo of sks cat in a bucket" \\
  --num_class_images=200 \\
  --validation_epochs=10 \\
  --seed=42
"""

SEED_003 = """
accelerate launch --mixed_precision="fp16" train_text_to_image_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --dataset_name=$DATASET_NAME --caption_column="text" \\
  --resolution=512 --random_flip \\
  --train_batch_size=1 \\
  --num_train_epochs=100 --checkpointing_steps=5000 \\
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --seed=42 \\
  --output_dir="sd-naruto-model-lora" \\
  --validation_prompt="cute dragon creature" --report_to="wandb"
"""

COMMANDS = {"seed_002-text_to_image_lora": SEED_002_TEXT_TO_IMAGE,
            "seed_002-dreambooth_lora": SEED_002_DREAMBOOTH,
            "seed_002-dreambooth_lora-prior": SEED_002_DREAMBOOTH_PRIOR,
            "seed_003-text_to_image_lora": SEED_003}
OVERRIDES = {"resolution": "32", "max_train_steps": "2", "validation_num_inference_steps": "2"}


def argv_for(command, variables):
    # `accelerate launch [--mixed_precision=...] train_X.py` -> `python train_flax.py X`: the
    # accelerate flag is the launcher's, not the script's (fp16 runs as bf16: docs/training.md).
    for script in ("train_text_to_image_lora", "train_dreambooth_lora"):
        for launcher in ('accelerate launch --mixed_precision="fp16"  ',
                         'accelerate launch --mixed_precision="fp16" ', "accelerate launch "):
            command = command.replace(f"{launcher}{script}.py",
                                      f"python train_flax.py {script[len('train_'):]}")
    for name in variables:  # the shell's ${NAME} is $NAME
        command = command.replace("${%s}" % name, "$" + name)
    return readme_argv(command, variables)


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append((step, sorted(values)))

        def finish(self):
            calls.append("finished")

    def init(project, config, dir=None):
        calls.append(("init", project))
        return Run()

    class Image:
        def __init__(self, image, caption):
            self.caption = caption

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe for it
    wandb.init, wandb.Image = init, Image
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_seed_lora_command(name, tiny_dir, saved_dataset, tmp_path, fake_wandb, monkeypatch,
                           capsys):
    from diffusers import StableDiffusionPipeline

    monkeypatch.chdir(tmp_path)  # seed 003's output_dir is relative
    instance = random_pngs(tmp_path / "cat", 5)
    variables = {"MODEL_NAME": tiny_dir, "DATA_DIR": DEMO_DATA, "INSTANCE_DIR": instance,
                 "CLASS_DIR": str(tmp_path / "cat-class"), "OUTPUT_DIR": str(tmp_path / "miles"),
                 "DATASET_NAME": saved_dataset}
    argv = argv_for(COMMANDS[name], variables)
    assert argv[0] == ("dreambooth_lora" if "dreambooth" in name else "text_to_image_lora")
    values = dict(OVERRIDES)
    if "prior" in name:
        values.update(num_class_images="4", class_num_inference_steps="2")
    code = main(override(argv, values))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = tmp_path / ("sd-naruto-model-lora" if name.startswith("seed_003") else "miles")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "unet").exists()
    project = "dreambooth-lora" if "dreambooth" in name else "text2image-fine-tune"
    assert fake_wandb[0] == ("init", project) and fake_wandb[-1] == "finished"
    assert any(step == 2 and "validation" in keys for step, keys in fake_wandb[1:-1])
    if "prior" in name:
        assert len(list((tmp_path / "cat-class").iterdir())) == 4
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(out))
    assert any("lora" in n for n, _ in pipe.unet.named_modules())
