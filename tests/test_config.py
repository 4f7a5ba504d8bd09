"""Run configuration: diffusers flags, YAML files, overrides, and one-line errors."""

import pytest

from sdjax.config import parse_train_args
from sdjax.errors import ConfigError


def test_yaml_file_and_flag_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pretrained_model_name_or_path: tiny\ntrain_data_dir: data\n"
                    "learning_rate: 1e-5\nuse_ema: true\ntrain_batch_size: 4\n")
    cfg, notes = parse_train_args(["--config", str(path), "--train_batch_size=2", "--use_ema=false"])
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.train_batch_size == 2 and cfg.use_ema is False
    assert cfg.pretrained_model_name_or_path == "tiny" and notes == []


def test_diffusers_switches_and_values():
    cfg, _ = parse_train_args(["--use_ema", "--center_crop", "--lr_scheduler=cosine",
                               "--snr_gamma", "5.0", "--mixed_precision=bf16"])
    assert cfg.use_ema and cfg.center_crop and not cfg.random_flip
    assert cfg.lr_scheduler == "cosine" and cfg.snr_gamma == 5.0
    assert cfg.compute_dtype_name == "bfloat16"
    assert parse_train_args(["--mixed_precision=fp16"])[0].compute_dtype_name == "bfloat16"
    assert parse_train_args([])[0].compute_dtype_name == "float32"


@pytest.mark.parametrize("argv,expected", [
    (["--learning_rat=1e-4"], "did you mean --learning_rate?"),
    (["--gradient_acumulation_steps", "2"], "did you mean --gradient_accumulation_steps?"),
])
def test_unknown_flag_names_the_closest(argv, expected):
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?")):
        parse_train_args(argv)


def test_unknown_yaml_key_and_bad_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resoluton: 512\n")
    with pytest.raises(ConfigError, match="unknown key 'resoluton'.*did you mean --resolution"):
        parse_train_args(["--config", str(path)])
    path.write_text("resolution: large\n")
    with pytest.raises(ConfigError, match="resolution: expected int"):
        parse_train_args(["--config", str(path)])


@pytest.mark.parametrize("flag,message", [
    ("--resolution=500", "multiple of 8"),
    ("--lr_scheduler=polynomial_decay", "--lr_scheduler='polynomial_decay'"),
    ("--mixed_precision=fp8", "choose no, fp16 or bf16"),
    ("--resume_from_checkpoint=yesterday", "give latest, checkpoint-N"),
    ("--gradient_accumulation_steps=0", "at least 1"),
])
def test_validation(flag, message, tmp_path):
    cfg, _ = parse_train_args(["--pretrained_model_name_or_path=tiny",
                               f"--train_data_dir={tmp_path}", flag])
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_model_and_data():
    with pytest.raises(ConfigError) as e:
        parse_train_args([])[0].validate()
    assert "--pretrained_model_name_or_path is required" in str(e.value)
    assert "--dataset_name or --train_data_dir" in str(e.value)


def test_every_flag_has_one_line_of_help_in_one_section():
    """Every TrainConfig field is a flag with help, in exactly one `--help` section."""
    import dataclasses

    from sdjax.config import TrainConfig
    from sdjax.flag_help import SECTIONS

    placed = [name for _, section in SECTIONS for name in section]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(placed) == len(set(placed))
    for _, section in SECTIONS:
        for name, text in section.items():
            assert text and "\n" not in text and len(text) < 110, name


def test_top_level_help_starts_with_the_commands(capsys):
    from sdjax.cli import COMMANDS, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    listed = text.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in listed] == [
        "text_to_image", "dreambooth", "text_to_image_lora", "dreambooth_lora", "cache",
        "export", "generate", "compare", "merge"]
    assert set(c for c in COMMANDS if not c.endswith("_flax") and c != "train") <= {
        line.split()[0] for line in listed}
    assert text.index("commands:") < text.index("--pretrained_model_name_or_path")
    flat = " ".join(text.split())  # argparse wraps lines at the terminal's width
    assert "--learning_rate X the peak learning rate (default 0.0001)" in flat
    for title in ("what is trained", "LoRA (the *_lora commands)", "model", "data", "loss",
                  "validation images", "JAX: devices, hosts and memory"):
        assert f"\n{title}:\n" in text
