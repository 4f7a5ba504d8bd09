"""Command line of train_flax.py. `accelerate launch train_X.py <flags>` (and
`python train_X_flax.py <flags>`) becomes `python train_flax.py X <flags>`:

    python train_flax.py [text_to_image] --pretrained_model_name_or_path ... --train_data_dir ...
    python train_flax.py dreambooth --instance_data_dir ... --instance_prompt ... [...]
    python train_flax.py text_to_image_lora | dreambooth_lora <the same flags> [--rank 4 ...]
    python train_flax.py cache <the text_to_image flags>  (encode the data set into the latent cache)
    python train_flax.py export --checkpoint OUT/checkpoints/checkpoint_N --output DIR
    python train_flax.py generate --model DIR_OR_ID [--checkpoint ...] --prompt ... --output_dir DIR
    python train_flax.py compare --output_dir OUT --prompts P1 P2 ... [--steps all|N,M]
    python train_flax.py merge --models A B [C ...] --output OUT [--weights ...]

Errors a user can fix are printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdjax.errors import SdjaxError

# Training commands, named after the diffusers scripts (and their Flax twins), -> the task.
TRAIN_COMMANDS = {"train": "text_to_image", "text_to_image": "text_to_image",
                  "text_to_image_flax": "text_to_image", "dreambooth": "dreambooth",
                  "dreambooth_flax": "dreambooth", "text_to_image_lora": "text_to_image",
                  "dreambooth_lora": "dreambooth"}
COMMANDS = tuple(TRAIN_COMMANDS) + ("cache", "export", "generate", "compare", "merge")


def _quiet_libraries() -> None:
    # transformers announces at import that torch is missing; sdjax only uses its tokenizer.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sdjax.parallel import quiet_libtpu_without_tpu

    quiet_libtpu_without_tpu()


def _quiet_orbax() -> None:
    # Reading checkpoints read-only makes Orbax log notices about its own options.
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_flax.py export", allow_abbrev=False,
                                     description="Write a checkpoint as a diffusers pipeline.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder: OUTPUT_DIR/checkpoints/checkpoint_N")
    parser.add_argument("--output", required=True,
                        help="folder for the diffusers pipeline (FILE.safetensors with "
                             "--format single_file)")
    parser.add_argument("--format", choices=("diffusers", "single_file"),
                        help="a diffusers pipeline folder (the default) or one .safetensors file "
                             "in the original LDM layout (A1111, ComfyUI; the default for an "
                             "--output ending in .safetensors)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="export the EMA weights (the default when the run kept EMA)")
    ema.add_argument("--no_ema", dest="ema", action="store_false", help="export the raw weights")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (default float32)")
    return parser


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    from sdjax.sampling.schedulers import SCHEDULERS

    parser.add_argument("--negative_prompt", nargs="+", metavar="TEXT",
                        help="one negative prompt for all prompts, or one per prompt")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5,
                        help="classifier-free guidance scale (1 or less: no guidance)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i of prompt p draws its noise from (seed, p, i) alone")
    parser.add_argument("--scheduler", metavar="NAME",
                        help=f"sampler: {', '.join(SCHEDULERS)}, or a diffusers scheduler class "
                             "name (default: the one the model's scheduler config names)")
    parser.add_argument("--height", type=int, help="default: the model's native size")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the models")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA file (diffusers or kohya format, or a folder holding "
                             "pytorch_lora_weights.safetensors) fused into the weights at SCALE "
                             "(default 1); repeat for several")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="a checkpoint's EMA weights (the default when the run kept EMA)")
    ema.add_argument("--no_ema", dest="ema", action="store_false",
                     help="a checkpoint's raw weights")


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_flax.py generate", allow_abbrev=False,
        description="Text to image with JAX: one PNG per image and a grid (a row per prompt).")
    parser.add_argument("--model", help="a diffusers folder, hub id or single-file checkpoint "
                                        "(default with --checkpoint: the run's base model)")
    parser.add_argument("--original_config",
                        help="describes a non-standard single-file --model: its LDM yaml or a "
                             "diffusers folder")
    parser.add_argument("--tokenizer_name",
                        help="tokenizer folder or hub id (default: the model's own)")
    parser.add_argument("--prediction_type", choices=("epsilon", "v_prediction"),
                        help="override the model's (e.g. an SD 2.x 512-base single file: epsilon)")
    parser.add_argument("--checkpoint", help="sample with the UNet of OUTPUT_DIR/checkpoints/checkpoint_N")
    parser.add_argument("--prompt", nargs="+", required=True, metavar="TEXT")
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt")
    parser.add_argument("--output_dir", required=True, help="folder for the images")
    _sampling_flags(parser)
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_flax.py compare", allow_abbrev=False,
        description="The same prompts and seeds sampled from each checkpoint of a training run, "
                    "in one labelled grid (rows prompts, columns checkpoints).")
    parser.add_argument("--output_dir", required=True, help="the training run's --output_dir")
    parser.add_argument("--prompts", nargs="+", required=True, metavar="TEXT")
    parser.add_argument("--steps", default="all",
                        help="all (every checkpoint and the final pipeline) or e.g. 1000,5000")
    parser.add_argument("--output", help="the grid's path (default OUTPUT_DIR/compare.png)")
    _sampling_flags(parser)
    parser.set_defaults(num_inference_steps=30)
    return parser


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_flax.py merge", allow_abbrev=False,
        description="Merge checkpoints as A1111's checkpoint merger does: a weighted sum of the "
                    "models, or A + M * (B - C) (add_difference).")
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                        help="diffusers folders, hub ids or single-file checkpoints (A B [C ...])")
    parser.add_argument("--output", required=True,
                        help="a diffusers folder, or FILE.safetensors for one single file")
    parser.add_argument("--method", choices=("weighted_sum", "add_difference"),
                        default="weighted_sum")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="weighted_sum: one weight per model (default: equal weights; "
                             "A1111's multiplier M is --weights 1-M M)")
    parser.add_argument("--multiplier", type=float,
                        help="add_difference: M in A + M * (B - C) (default 1)")
    parser.add_argument("--format", choices=("diffusers", "single_file"),
                        help="default: single_file for an --output ending in .safetensors, "
                             "else diffusers")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (the merge itself runs in float32)")
    parser.add_argument("--original_config",
                        help="describes non-standard single-file inputs: an LDM yaml or a "
                             "diffusers folder")
    parser.add_argument("--tokenizer_name",
                        help="tokenizer for the output (default: the first model's)")
    parser.add_argument("--fuse_lora", action="append", metavar="FILE:SCALE",
                        help="fuse a LoRA file into the merged weights (repeatable)")
    return parser


def train_config(command: str, argv: list):
    """(TrainConfig, notes) of a training command (a TRAIN_COMMANDS key) and its flags."""
    from sdjax.config import parse_train_args

    return parse_train_args(argv, task=TRAIN_COMMANDS[command], lora=command.endswith("_lora"),
                            command=None if command == "train" else command)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if argv and not argv[0].startswith("-") and command == "train" and not os.path.exists(argv[0]):
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    _quiet_libraries()
    if command in ("export", "generate", "compare"):
        _quiet_orbax()
    try:
        if command in ("export", "generate", "compare"):
            # On a pod every worker runs the command: JAX's distributed runtime joins them
            # (JAX_* variables or the platform's own detection) and one host writes.
            from sdjax.parallel import initialize_distributed

            initialize_distributed()
        if command == "export":
            from sdjax.export import export_checkpoint

            args = export_parser().parse_args(argv)
            export_checkpoint(args.checkpoint, args.output, ema=args.ema, dtype=args.dtype,
                              format=args.format)
        elif command == "merge":
            from sdjax.merge import merge_models

            args = merge_parser().parse_args(argv)
            merge_models(args.models, args.output, args.method, args.weights, args.multiplier,
                         args.format, args.dtype, args.original_config, args.tokenizer_name,
                         args.fuse_lora)
        elif command in ("generate", "compare"):
            from sdjax.sampling import commands

            if command == "generate":
                commands.generate(generate_parser().parse_args(argv))
            else:
                commands.compare(compare_parser().parse_args(argv))
        elif command == "cache":
            from sdjax.config import parse_train_args
            from sdjax.train.loop import build_cache

            cfg, notes = parse_train_args(argv)
            build_cache(cfg, notes)
        else:
            from sdjax.train.loop import train

            cfg, notes = train_config(command, argv)
            train(cfg, notes)
    except SdjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
