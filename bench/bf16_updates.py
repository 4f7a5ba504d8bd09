"""Would bfloat16 trained weights (instead of float32 master weights) keep the optimizer's
updates? An AdamW step moves each weight by about the learning rate (Adam's normalised step),
and a bfloat16 weight only changes when the step is at least half its spacing (8 significant
bits: |w| / 512 to |w| / 256). This counts, over the UNet's kernels (sdjax's random init,
LeCun-normal; zero biases left out), how many a step of exactly the learning rate changes when
they are held in bfloat16.

    python bench/bf16_updates.py --model tiny --lr 1e-6 1e-5 1e-4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax.traverse_util import flatten_dict  # noqa: E402

from sdjax import StableDiffusion  # noqa: E402
from sdjax.models.init import random_params  # noqa: E402


def changed(weights: np.ndarray, step: float) -> int:
    """How many of `weights` (float32) a step of +`step` changes once they are bfloat16."""
    held = jnp.asarray(weights, jnp.bfloat16)
    return int(jnp.sum(held + jnp.asarray(step, jnp.bfloat16) != held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a config name or folder (random init)")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    args = parser.parse_args()
    shapes = StableDiffusion.from_config(args.model, init_params=False).params["unet"]
    kernels = [spec for path, spec in flatten_dict(shapes).items() if path[-1] == "kernel"]
    total, moved, magnitudes = 0, {lr: 0 for lr in args.lr}, []
    for seed, spec in enumerate(kernels):  # one at a time: SD 1.5's UNet is 3.4 GB in float32
        weights = random_params({"kernel": spec}, seed)["kernel"].ravel()
        total += weights.size
        magnitudes.append(np.abs(weights[::97]))
        for lr in args.lr:
            moved[lr] += changed(weights, lr)
    print(f"{args.model} UNet kernels (random init): {total:,} weights, median |w| "
          f"{np.median(np.concatenate(magnitudes)):.4f}")
    print("| learning rate | weights a step changes in bfloat16 | updates lost |")
    print("| --- | --- | --- |")
    for lr in args.lr:
        kept = moved[lr] / total
        print(f"| {lr:g} | {100 * kept:.1f}% | {100 * (1 - kept):.1f}% |")


if __name__ == "__main__":
    main()
