"""Peak host memory of `train_flax.py merge` against the size of one model.

    python bench/merge_memory.py --unet_scale 0.4

Builds one model from the sd15 config (UNet channels scaled by --unet_scale; full-size VAE and
CLIP text encoder) with random weights, writes it as a diffusers folder and twice as a single
file, then merges the three (add_difference: A + (B - C)) in a fresh process per output format
and reports that process's peak resident memory (VmHWM) above its resident memory once sdjax
and JAX are imported, in units of one model's float32 parameters. Loading every model at once
would take 3 models; the streamed merge is meant to take about 1 (+ the UNet once more while a
diffusers folder is written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHILD = r"""
import json, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import threading, time
import jax
jax.devices()
from sdjax.merge import merge_models
base, base_anon = status("VmRSS"), status("RssAnon")
peak_anon, done = [base_anon], []
def sample():
    while not done:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.02)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
merge_models(sys.argv[1:4], sys.argv[4], method="add_difference", original_config=sys.argv[5],
             log=lambda _: None)
done.append(1)
thread.join()
print(json.dumps({"base": base, "peak": status("VmHWM"), "base_anon": base_anon,
                  "peak_anon": peak_anon[0]}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--unet_scale", type=float, default=0.4)
    p.add_argument("--workdir", help="default: a temporary folder (removed)")
    args = p.parse_args()
    import numpy as np

    from sdjax import StableDiffusion
    from sdjax.pipeline import SHIPPED_CONFIGS

    work = args.workdir or tempfile.mkdtemp(prefix="sdjax-merge-bench-")
    try:
        config = os.path.join(work, "config")
        shutil.copytree(os.path.join(SHIPPED_CONFIGS, "sd15"), config, dirs_exist_ok=True)
        shutil.copytree(os.path.join(SHIPPED_CONFIGS, "tiny", "tokenizer"),
                        os.path.join(config, "tokenizer"), dirs_exist_ok=True)
        path = os.path.join(config, "unet", "config.json")
        unet = json.load(open(path))
        unet["block_out_channels"] = [int(c * args.unet_scale) for c in unet["block_out_channels"]]
        json.dump(unet, open(path, "w"))
        sd = StableDiffusion.from_config(config, seed=0)
        size = sum(np.asarray(x).nbytes for c in sd.params.values()
                   for x in __import__("jax").tree_util.tree_leaves(c))
        a = sd.save_pretrained(os.path.join(work, "a"))
        b = sd.save_single_file(os.path.join(work, "b.safetensors"))
        c = sd.save_single_file(os.path.join(work, "c.safetensors"))
        del sd
        print(f"one model: {size / 2**20:.0f} MiB of float32 parameters")
        for output in ("out", "out.safetensors"):
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            result = subprocess.run([sys.executable, "-c", CHILD, a, b, c,
                                     os.path.join(work, output), config],
                                    capture_output=True, text=True, env=env, cwd=REPO)
            if result.returncode:
                raise SystemExit(result.stderr[-3000:])
            m = json.loads(result.stdout.strip().splitlines()[-1])
            extra = m["peak"] - m["base"]
            kind = "single file" if output.endswith(".safetensors") else "diffusers folder"
            anon = m["peak_anon"] - m["base_anon"]
            print(f"merge of 3 -> {kind}: peak resident {extra / 2**20:.0f} MiB above start "
                  f"= {extra / size:.2f} models (anonymous memory: {anon / 2**20:.0f} MiB = "
                  f"{anon / size:.2f} models; the rest is memory-mapped input files)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
