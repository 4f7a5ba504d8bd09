"""Command line of train_flax.py: `train` (the default), `cache`, `export`.

    python train_flax.py [train] --pretrained_model_name_or_path ... --train_data_dir ...
    python train_flax.py cache <the same flags>    (encode the data set into the latent cache)
    python train_flax.py export --checkpoint OUT/checkpoints/checkpoint_N --output DIR

Errors a user can fix are printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdjax.errors import SdjaxError

COMMANDS = ("train", "cache", "export")


def _quiet_libraries() -> None:
    # transformers announces at import that torch is missing; sdjax only uses its tokenizer.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_flax.py export", allow_abbrev=False,
                                     description="Write a checkpoint as a diffusers pipeline.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder: OUTPUT_DIR/checkpoints/checkpoint_N")
    parser.add_argument("--output", required=True, help="folder for the diffusers pipeline")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="export the EMA weights (the default when the run kept EMA)")
    ema.add_argument("--no_ema", dest="ema", action="store_false", help="export the raw weights")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (default float32)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    _quiet_libraries()
    try:
        if command == "export":
            from sdjax.train.export import export_checkpoint

            args = export_parser().parse_args(argv)
            export_checkpoint(args.checkpoint, args.output, ema=args.ema, dtype=args.dtype)
        elif command == "cache":
            from sdjax.config import parse_train_args
            from sdjax.train.loop import build_cache

            cfg, notes = parse_train_args(argv)
            build_cache(cfg, notes)
        else:
            from sdjax.config import parse_train_args
            from sdjax.train.loop import train

            cfg, notes = parse_train_args(argv)
            train(cfg, notes)
    except SdjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
