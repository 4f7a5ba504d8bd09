"""The memory table of BENCHMARKS.md "Will it fit?": full-size runs compiled for TPU slices with
`train_flax.py ... --compile_only --topology T` (libtpu: requirements_tpu.txt), one process per
row, then one markdown table from the compile_report.json files.

    python bench/fit_table.py --out /tmp/fit                 # every row (hours on 2 cores)
    python bench/fit_table.py --out /tmp/fit --rows sd15_v5e_b4_zero1 lora_sd15_v2_b1
    python bench/fit_table.py --out /tmp/fit --table_only     # the table from what is there
    python bench/fit_table.py --out /tmp/fit --recount_flops  # FLOPs by tracing only, then table

A row whose report exists is not compiled again. Each full-size compile takes 10-40 minutes on a
2-core machine (a few on 16 cores); rows run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30

SD15 = "--pretrained_model_name_or_path sd15 --resolution 512"
SD21 = "--pretrained_model_name_or_path sd21 --resolution 768"
REMAT = "--gradient_checkpointing"
XLA = "--attention_implementation xla"  # the rows measured before auto (TPU flash) was the default
# name: (command, what it is, flags)
ROWS = {
    "sd15_v5e_b1_repl": ("text_to_image", "SD 1.5 full, 512 px, batch 1",
                         f"{SD15} {REMAT} --train_batch_size 1 --sharding replicated --topology v5e-8"),
    "sd15_v5e_b4_zero1": ("text_to_image", "SD 1.5 full, 512 px, batch 4, XLA attention",
                          f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 --topology v5e-8 "
                          f"{XLA}"),
    "sd15_v5e_b4_zero1_auto": ("text_to_image", "SD 1.5 full, 512 px, batch 4",
                               f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 "
                               "--topology v5e-8"),
    "sd15_v5e_b8_zero3": ("text_to_image", "SD 1.5 full, 512 px, batch 8",
                          f"{SD15} {REMAT} --train_batch_size 8 --sharding zero3 --topology v5e-8"),
    "sd15_v5e_b16_zero3": ("text_to_image", "SD 1.5 full, 512 px, batch 16",
                           f"{SD15} {REMAT} --train_batch_size 16 --sharding zero3 --topology v5e-8"),
    "sd15_v5e_b8_zero3_noremat": ("text_to_image", "SD 1.5 full, 512 px, batch 8, no remat",
                                  f"{SD15} --train_batch_size 8 --sharding zero3 --topology v5e-8"),
    "sd15_v5e_b4_zero1_noremat": ("text_to_image", "SD 1.5 full, 512 px, batch 4, no remat",
                                  f"{SD15} --train_batch_size 4 --sharding zero1 --topology v5e-8"),
    "sd15_v5e_b4_zero1_dots": ("text_to_image", "SD 1.5 full, 512 px, batch 4, policy dense, "
                               "XLA attention",
                               f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 "
                               f"--topology v5e-8 --gradient_checkpointing_policy dense {XLA}"),
    "sd15_v5e_b4_zero1_policy_dots": ("text_to_image", "SD 1.5 full, 512 px, batch 4, policy dots",
                                      f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 "
                                      "--topology v5e-8 --gradient_checkpointing_policy dots"),
    "sd15_v5e_b4_zero1_policy_dots_xla": ("text_to_image", "SD 1.5 full, 512 px, batch 4, policy "
                                          "dots, XLA attention",
                                          f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 "
                                          f"--topology v5e-8 --gradient_checkpointing_policy dots "
                                          f"{XLA}"),
    "sd15_v5e_b8_zero3_policy_dots": ("text_to_image", "SD 1.5 full, 512 px, batch 8, policy dots",
                                      f"{SD15} {REMAT} --train_batch_size 8 --sharding zero3 "
                                      "--topology v5e-8 --gradient_checkpointing_policy dots"),
    "sd15_v5e_b16_zero3_policy_dots": ("text_to_image", "SD 1.5 full, 512 px, batch 16, policy "
                                       "dots", f"{SD15} {REMAT} --train_batch_size 16 --sharding "
                                       "zero3 --topology v5e-8 --gradient_checkpointing_policy dots"),
    "sd15_v3_b4_zero1": ("text_to_image", "SD 1.5 full, 512 px, batch 4",
                         f"{SD15} {REMAT} --train_batch_size 4 --sharding zero1 --topology v3-8"),
    "sd15_v3_b8_zero3": ("text_to_image", "SD 1.5 full, 512 px, batch 8",
                         f"{SD15} {REMAT} --train_batch_size 8 --sharding zero3 --topology v3-8"),
    "sd15_v3_b4_zero1_noremat": ("text_to_image", "SD 1.5 full, 512 px, batch 4, no remat",
                                 f"{SD15} --train_batch_size 4 --sharding zero1 --topology v3-8"),
    "sd21_v5e_b1_zero1": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 1, XLA attention",
                          f"{SD21} {REMAT} --train_batch_size 1 --sharding zero1 --topology v5e-8 "
                          f"{XLA}"),
    "sd21_v4_b1_repl": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 1",
                        f"{SD21} {REMAT} --train_batch_size 1 --sharding replicated --topology v4-8"),
    "sd21_v4_b4_zero1": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 4",
                         f"{SD21} {REMAT} --train_batch_size 4 --sharding zero1 --topology v4-8"),
    "sd21_v4_b8_zero1": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 8",
                         f"{SD21} {REMAT} --train_batch_size 8 --sharding zero1 --topology v4-8"),
    "sd21_v4_b16_zero1": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 16",
                          f"{SD21} {REMAT} --train_batch_size 16 --sharding zero1 --topology v4-8"),
    "sd21_v4_b32_zero1": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 32",
                          f"{SD21} {REMAT} --train_batch_size 32 --sharding zero1 --topology v4-8"),
    "sd21_v4_b4_zero1_noremat": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 4, no remat",
                                 f"{SD21} --train_batch_size 4 --sharding zero1 --topology v4-8"),
    "sd21_v5e_b4_zero3": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 4",
                          f"{SD21} {REMAT} --train_batch_size 4 --sharding zero3 --topology v5e-8"),
    "sd21_v5e_b8_zero3": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 8",
                          f"{SD21} {REMAT} --train_batch_size 8 --sharding zero3 --topology v5e-8"),
    "sd21_v5e_b2_zero3_noremat": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 2, no remat",
                                  f"{SD21} --train_batch_size 2 --sharding zero3 --topology v5e-8"),
    "sd21_v5e_b4_zero3_noremat": ("text_to_image", "SD 2.1 768-v full, 768 px, batch 4, no remat",
                                  f"{SD21} --train_batch_size 4 --sharding zero3 --topology v5e-8"),
    "lora_sd15_v2_b1": ("text_to_image_lora", "SD 1.5 LoRA r4, 512 px, batch 1",
                        f"{SD15} {REMAT} --train_batch_size 1 --sharding replicated --topology v2-8"),
    "lora_sd15_v2_b4": ("text_to_image_lora", "SD 1.5 LoRA r4, 512 px, batch 4",
                        f"{SD15} {REMAT} --train_batch_size 4 --sharding replicated --topology v2-8"),
    "lora_sd15_v2_b2_noremat": ("text_to_image_lora", "SD 1.5 LoRA r4, 512 px, batch 2, no remat",
                                f"{SD15} --train_batch_size 2 --sharding replicated --topology v2-8"),
}
COMMON = "--train_data_dir configs/demo_data --mixed_precision bf16 --use_ema --compile_only"


def compile_row(name: str, out: str) -> None:
    command, _, flags = ROWS[name]
    folder = os.path.join(out, name)
    if os.path.exists(os.path.join(folder, "compile_report.json")):
        return
    os.makedirs(folder, exist_ok=True)
    argv = [sys.executable, "train_flax.py", command, *COMMON.split(), *flags.split(),
            "--output_dir", folder]
    t0 = time.time()
    with open(os.path.join(folder, "log.txt"), "w") as log:
        code = subprocess.call(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit {code} after {time.time() - t0:.0f} s", flush=True)


def recount_flops(out: str, rows: list) -> None:
    """Prints each row's FLOPs per image as `sdjax.train.fit.step_flops` counts them (the step
    traced for one CPU device: no TPU compile, minutes for every row) and rewrites the reports
    there, written before the check counted that way."""
    sys.path.insert(0, REPO)
    from sdjax.cli import TRAIN_COMMANDS
    from sdjax.config import parse_train_args
    from sdjax.train.fit import (StepFacts, images_per_step, shapes_pipeline, step_flops,
                                 topology_devices)

    for name in rows:
        command, _, flags = ROWS[name]
        cfg, _ = parse_train_args([*COMMON.split(), *flags.split(), "--output_dir",
                                   os.path.join(out, name)], task=TRAIN_COMMANDS[command],
                                  lora=command.endswith("_lora"))
        devices = len(topology_devices(cfg.topology)[1])
        images = images_per_step(cfg, devices)
        flops = step_flops(cfg, shapes_pipeline(cfg), StepFacts.of_config(cfg), devices)
        path = os.path.join(out, name, "compile_report.json")
        report = json.load(open(path)) if os.path.exists(path) else None
        before = f"{report['flops_per_image'] / 1e12:.2f} -> " if report else ""
        print(f"{name}: {before}{flops / images / 1e12:.2f} TFLOP per image", flush=True)
        if report and report.get("per_device_bytes"):
            report.update(flops_per_step=flops, flops_per_image=flops / images)
            with open(path, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")


def table(out: str) -> str:
    lines = ["| run | slice | layout | peak GiB / device | arguments | temporaries | outputs "
             "(aliased) | fits (GiB to spare) | TFLOP / image | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (_, what, _) in ROWS.items():
        path = os.path.join(out, name, "compile_report.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        what = what if "attention" in what else f"{what}, attention {r.get('attention', 'xla')}"
        layout = r["sharding"]
        how = ("replicated" if layout["strategy"] == "replicated"
               else f"{layout['strategy']} over {layout['fsdp']}")
        slice_ = f"{r['topology']} ({r['devices']} x {r['device_kind']})"
        b = r["per_device_bytes"]
        if b is None:
            lines.append(f"| {what} | {slice_} | {how} | - | - | - | - | no: the compiler "
                         f"refuses it | - | {r.get('compile_seconds', '-')} |")
            continue
        spare = (r["hbm_bytes_per_device"] - b["peak"]) / GIB
        lines.append(
            f"| {what} | {slice_} | {how} | {b['peak'] / GIB:.2f} | {b['arguments'] / GIB:.2f} | "
            f"{b['temporaries'] / GIB:.2f} | {b['outputs'] / GIB:.2f} ({b['aliased'] / GIB:.2f}) | "
            f"{'yes' if r['fits'] else 'no'} ({spare:+.2f}) | {r['flops_per_image'] / 1e12:.2f} | "
            f"{r.get('compile_seconds', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a folder for one sub-folder per row")
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS), help="default: every row")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--recount_flops", action="store_true",
                        help="recount the FLOPs of the reports there (no compile), then the table")
    args = parser.parse_args()
    if args.recount_flops:
        recount_flops(args.out, args.rows or list(ROWS))
    elif not args.table_only:
        for name in args.rows or ROWS:
            compile_row(name, args.out)
    print(table(args.out))


if __name__ == "__main__":
    main()
