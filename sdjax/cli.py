"""Command line of train_flax.py.

The trainer itself lands with the training issue; until then the default command loads a model
(a diffusers folder, a hub id, or a shipped config name for random weights) and writes it back
as a diffusers pipeline folder, which exercises the whole load -> export path.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdjax.errors import SdjaxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_flax.py",
        description="sdjax: fine-tune Stable Diffusion in JAX/Flax and export to diffusers. "
                    "Training is not implemented yet: this command loads a model and exports it.")
    parser.add_argument("--pretrained_model_name_or_path", default="tiny",
                        help="diffusers pipeline folder, hub id, or a shipped config name for "
                             "random weights (tiny, sd15, sd21, sd21-base). Default: tiny.")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    parser.add_argument("--output_dir", default="outputs/tiny-sd",
                        help="where the diffusers pipeline is written (default: outputs/tiny-sd)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # transformers announces at import that torch is missing; sdjax only uses its tokenizer.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from sdjax.pipeline import SHIPPED_CONFIGS, StableDiffusion, count_params

    try:
        name = args.pretrained_model_name_or_path
        if not os.path.exists(name) and os.path.isdir(os.path.join(SHIPPED_CONFIGS, name)):
            sd = StableDiffusion.from_config(name, seed=args.seed)
            origin = f"random weights from configs/models/{name}"
        else:
            sd = StableDiffusion.from_pretrained(name, revision=args.revision, variant=args.variant)
            origin = name
        counts = ", ".join(f"{k} {count_params(v):,}" for k, v in sd.params.items())
        print(f"loaded {origin}: {counts} parameters")
        sd.save_pretrained(args.output_dir)
        print(f"wrote diffusers pipeline to {args.output_dir} "
              f"(load it with StableDiffusionPipeline.from_pretrained({args.output_dir!r}))")
    except SdjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
