"""Compares the train step of three trainable sets on one model and per-device batch:

    text_to_image   the UNet trained (VAE and text encoder frozen)
    +text_encoder   the UNet and the text encoder trained (--train_text_encoder)
    dreambooth      the UNet and the text encoder trained, DreamBooth with prior preservation:
                    each device's rows doubled (instance, class, ...) with a prior_mask

    python bench/trainable_sets.py --model tiny --resolution 64 --batch 4 --steps 5 --rounds 3
    python bench/trainable_sets.py --model sd15 --unet_scale 0.5 --resolution 256 --batch 1 --steps 1 --rounds 3

`--batch` is the per-device instance batch, the same for all three (so DreamBooth runs twice the
rows). Each step is bench/train_step.py's (the trainer's jitted step, EMA on unless --no_ema).
All three are compiled first; then the timing runs in rounds, each round building every
configuration's inputs afresh, one untimed step, `--steps` timed steps, and freeing them, so that
a change in the machine's load falls on all three alike. Step time is the median of every timed
step of a configuration. Memory is the compiled program's `memory_analysis()` per device:
arguments + temporaries + outputs - aliased (the donated state) bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402

CONFIGURATIONS = (
    ("text_to_image (UNet)", dict(train_text_encoder=False, prior_preservation=False)),
    ("--train_text_encoder (UNet + text encoder)", dict(train_text_encoder=True, prior_preservation=False)),
    ("dreambooth, prior preservation (UNet + text encoder, 2x rows)",
     dict(train_text_encoder=True, prior_preservation=True)),
)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="shipped config name or pipeline folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="per-device instance batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attention", default="xla")
    p.add_argument("--unet_scale", type=float, default=1.0)
    p.add_argument("--no_ema", action="store_true")
    p.add_argument("--compile_only", action="store_true", help="memory and FLOPs only")
    return p.parse_args()


def step_args(args, **overrides):
    """bench/train_step.py's arguments for one configuration."""
    fields = dict(model=args.model, resolution=args.resolution, batch=args.batch, steps=args.steps,
                  accumulation=1, mixed_precision=args.mixed_precision,
                  gradient_checkpointing=args.gradient_checkpointing, attention=args.attention,
                  cached=False, unet_scale=args.unet_scale, compile_only=args.compile_only,
                  torch=False, no_ema=args.no_ema, lora_rank=0, lora_layers="attention",
                  lora_merged=False, train_text_encoder=False, prior_preservation=False)
    fields.update(overrides)
    return argparse.Namespace(**fields)


def compare(args, configurations=CONFIGURATIONS) -> list:
    prepared = []
    sd = train_step.StableDiffusion.from_config(args.model, init_params=not args.compile_only)
    for name, overrides in configurations:
        step = train_step.prepare_step(step_args(args, **overrides), sd)
        print(f"compiled {name} in {step.result['compile_s']} s", file=sys.stderr, flush=True)
        prepared.append((name, step, []))
    if not args.compile_only:
        for r in range(args.rounds):
            for name, step, times in prepared:
                state, frozen, data = step.inputs()
                state, metrics, seconds = step.timed_steps(state, frozen, data, args.steps)
                loss = float(np.asarray(metrics["loss"]))
                if not np.isfinite(loss):
                    raise SystemExit(f"{name}: loss {loss}")
                times.extend(seconds)
                del state, frozen, data, metrics
                gc.collect()
                print(f"round {r + 1}: {name}: {', '.join(f'{t:.4f}' for t in seconds)} s",
                      file=sys.stderr, flush=True)
    rows = []
    for name, step, times in prepared:
        result = dict(step.result, name=name)
        if times:
            result.update(step_median_s=round(float(np.median(times)), 4),
                          step_times_s=[round(t, 4) for t in times],
                          instance_images_per_s=round(args.batch * jax.device_count()
                                                      / float(np.median(times)), 3))
        rows.append(result)
    base = rows[0]
    for row in rows:
        row["peak_ratio"] = round(row["memory_bytes"]["peak_estimate"]
                                  / base["memory_bytes"]["peak_estimate"], 2)
        if "step_median_s" in row:
            row["step_ratio"] = round(row["step_median_s"] / base["step_median_s"], 2)
    return rows


def markdown(args, rows, base_name: str = "UNet only") -> str:
    mib = 2 ** 20
    lines = [f"| trained | rows / device | step s (median) | x {base_name} | instance images/s | "
             f"GFLOP / row | arguments MiB | temporaries MiB | peak MiB | x {base_name} | "
             "compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        memory = row["memory_bytes"]
        lines.append(" | ".join([
            f"| {row['name']}", str(row["rows_per_device"]),
            str(row.get("step_median_s", "-")),
            f"{row['step_ratio']:.2f}x" if "step_ratio" in row else "-",
            str(row.get("instance_images_per_s", "-")),
            str(row.get("xla_gflop_per_image", "-")),
            f"{memory['arguments'] / mib:,.1f}", f"{memory['temporaries'] / mib:,.1f}",
            f"{memory['peak_estimate'] / mib:,.1f}", f"{row['peak_ratio']:.2f}x",
            f"{row['compile_s']} |"]))
    return "\n".join(lines)


def run_info() -> dict:
    """The command, date, machine and devices of this benchmark run."""
    return {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__}


def main():
    args = parse()
    info = run_info()
    with tempfile.TemporaryDirectory() as tmp:
        args.model = train_step.model_folder(args, tmp)
        info["rows"] = compare(args)
    print(json.dumps(info, indent=2))
    print(markdown(args, info["rows"]))


if __name__ == "__main__":
    main()
