"""The train step compiled for an NVIDIA GPU on a machine without one, for its memory.

    python3 -m venv /tmp/gpu-aot && /tmp/gpu-aot/bin/pip install -r requirements_flax.txt \\
        "jax[cuda12]==$(python3 -c 'import jax; print(jax.__version__)')"
    /tmp/gpu-aot/bin/python bench/gpu_compile.py --gpu h100-80gb -- \\
        --pretrained_model_name_or_path sd15 --train_data_dir configs/demo_data --resolution 512 \\
        --mixed_precision bf16 --use_ema --train_batch_size 8 --output_dir /tmp/gpu/sd15_b8

Everything after `--` is train_flax.py's flags (any command's: put the command first, e.g.
`-- text_to_image_lora ...`); the run is the `--compile_only` check (sdjax.train.fit) on
`--gpus` GPUs of the kind given, described to XLA by a target config (compute capability, SM
count, memory, ...) instead of a device: JAX's CUDA plugin compiles for it on a CPU-only host
(`jax.experimental.topologies`, platform "cuda"). Same report and summary line as `--topology`
on a TPU, plus the cuDNN fused-attention calls the compiled step holds.

What the figures leave out, because nothing runs: XLA's autotuning (so Triton GEMM fusions are
turned off: without measurements XLA cannot tile them, and cuBLAS takes those matmuls) and
cuDNN's workspace (graphs are built on a device only). "Fits" is against the share of memory
JAX takes by default on a real GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set).
The target configs below are written from NVIDIA's published figures; only the compute
capability (which kernels exist) and the memory size change what this measures.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GIB = 2 ** 30

# name: (compute capability, SMs, FP32 lanes per SM, shared memory per SM / opt-in per block,
#        L2 bytes, memory bandwidth bytes/s, boost clock GHz, memory bytes, description)
GPUS = {
    "h100-80gb": ((9, 0), 132, 128, (233472, 232448), 50 * 2 ** 20, 3.35e12, 1.98, 80 * GIB,
                  "NVIDIA H100 80GB HBM3"),
    "a100-80gb": ((8, 0), 108, 64, (167936, 166912), 40 * 2 ** 20, 2.04e12, 1.41, 80 * GIB,
                  "NVIDIA A100-SXM4-80GB"),
    "a100-40gb": ((8, 0), 108, 64, (167936, 166912), 40 * 2 ** 20, 1.56e12, 1.41, 40 * GIB,
                  "NVIDIA A100-SXM4-40GB"),
    "l4": ((8, 9), 58, 128, (102400, 101376), 48 * 2 ** 20, 3.0e11, 2.04, 24 * GIB,
           "NVIDIA L4"),
    "rtx4090": ((8, 9), 128, 128, (102400, 101376), 72 * 2 ** 20, 1.01e12, 2.52, 24 * GIB,
                "NVIDIA GeForce RTX 4090"),
}


def target_config(name: str, cudnn=(9, 7), cuda=(12, 8)) -> str:
    """XLA's TargetConfig (text proto) for GPU `name`."""
    (major, minor), sms, lanes, (smem, smem_optin), l2, bandwidth, clock, memory, kind = GPUS[name]
    return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152 shared_memory_per_core: {smem}
  shared_memory_per_block_optin: {smem_optin}
  core_count: {sms} fpus_per_core: {lanes}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}
runtime_version {{ major: {cuda[0]} minor: {cuda[1]} }}
device_description_str: "{kind}"
"""


def fused_attention_calls(dump_dir: str) -> dict:
    """Counts of cuDNN fused-attention custom calls in the optimized train step(s) dumped."""
    counts = {}
    for path in glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations.txt")):
        with open(path) as f:
            for target in re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', f.read()):
                counts[target] = counts.get(target, 0) + 1
    return counts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of one host")
    args = parser.parse_args(own)
    if not flags:
        parser.error("give train_flax.py's flags after --")

    # The CPU backend only (the plugin would look for a device), Triton GEMMs off (see above),
    # and the optimized step dumped so its cuDNN calls can be counted.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    from sdjax.cli import TRAIN_COMMANDS, _quiet_libraries, train_config

    command = flags.pop(0) if flags[0] in TRAIN_COMMANDS else "train"
    cfg, _ = train_config(command, flags + ["--compile_only"])
    dump_dir = os.path.join(cfg.output_dir, "xla_dump")
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""), "--xla_gpu_enable_triton_gemm=false",
        f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=jit_step"])
    _quiet_libraries()

    from jax.experimental import topologies

    from sdjax.train.fit import compile_check

    try:
        described = topologies.get_topology_desc(platform="cuda", target_config=target_config(
            args.gpu), topology=f"1x1x{args.gpus}")
    except Exception as e:  # noqa: BLE001 - JAX's or the plugin's own words
        sys.exit(f"cannot describe {args.gpu} to JAX (is jax[cuda12] installed, the same version "
                 f"as jax?): {str(e).splitlines()[0][:200]}")
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    label = f"{args.gpu}x{args.gpus}" if args.gpus > 1 else args.gpu
    compile_check(cfg, devices=list(described.devices), topology=label,
                  hbm=int(GPUS[args.gpu][7] * fraction))
    calls = fused_attention_calls(dump_dir)
    print("cuDNN fused attention in the compiled step: "
          + (", ".join(f"{n} x {t}" for t, n in sorted(calls.items())) if calls else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
