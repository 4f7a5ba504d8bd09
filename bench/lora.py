"""LoRA against the full fine-tune on one model and per-device batch: step time, peak memory
per device and FLOPs of the train step, and the size of the LoRA files.

    full fine-tune        the UNet's weights trained (AdamW + EMA over 860 M parameters at SD 1.5)
    LoRA r4 attention     diffusers' default: rank 4 on to_q/to_k/to_v/to_out.0
    LoRA r4 merged        the same adapters merged into the kernels inside the step
                          (W + A @ B, then the plain model): the alternative the trainer
                          does not use, measured to justify in-layer application
    LoRA r16 locon        rank 16 on the transformer blocks and the resnet convolutions
    LoRA r4 + text enc.   rank 4 on the UNet's and the text encoder's attention

    python bench/lora.py --model tiny --resolution 64 --batch 2 --steps 5 --rounds 3
    python bench/lora.py --model sd15 --unet_scale 0.5 --resolution 256 --batch 1 --steps 1 --rounds 2
    python bench/lora.py --model sd15 --resolution 512 --batch 1 --mixed_precision bf16 --gradient_checkpointing --compile_only

Timing and memory as in bench/trainable_sets.py (rounds, medians, the compiled program's
memory_analysis per device). The LoRA file sizes are those of the diffusers file the trainer
writes (float32 tensors) for SD 1.5, whatever --model.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import train_step  # noqa: E402
import trainable_sets  # noqa: E402

CONFIGURATIONS = (
    ("full fine-tune (UNet)", dict()),
    ("LoRA r4 attention", dict(lora_rank=4)),
    ("LoRA r4 attention, merged kernels", dict(lora_rank=4, lora_merged=True)),
    ("LoRA r16 locon", dict(lora_rank=16, lora_layers="locon")),
    ("LoRA r4 attention, UNet + text encoder", dict(lora_rank=4, train_text_encoder=True)),
)


def file_sizes(model: str) -> list:
    """Bytes of the float32 LoRA file for each configuration's adapters (header included)."""
    import numpy as np

    from sdjax.lora.adapters import init_adapters
    from sdjax.lora.training import targets_for

    sd = train_step.StableDiffusion.from_config(model, init_params=False)
    rows = []
    for name, layers, rank, components in (("r4 attention", "attention", 4, ["unet"]),
                                           ("r4 attention + text encoder", "attention", 4,
                                            ["unet", "text_encoder"]),
                                           ("r16 locon", "locon", 16, ["unet"]),
                                           ("r128 transformer", "transformer", 128, ["unet"])):
        shapes = {c: sd.params[c] for c in components}
        targets = targets_for(shapes, components, layers, rank)
        count = sum(int(np.prod(x.shape)) for c in components for x in jax.tree_util.tree_leaves(
            init_adapters(jax.random.key(0), shapes[c], targets[c], rank)))
        rows.append({"adapters": name, "parameters": count, "file_mib": round(count * 4 / 2**20, 2)})
    return rows


def main():
    args = trainable_sets.parse()
    info = trainable_sets.run_info()
    with tempfile.TemporaryDirectory() as tmp:
        args.model = train_step.model_folder(args, tmp)
        info["rows"] = trainable_sets.compare(args, CONFIGURATIONS)
        info["lora_files_sd15"] = file_sizes("sd15")
    print(json.dumps(info, indent=2))
    print(trainable_sets.markdown(args, info["rows"], "full"))


if __name__ == "__main__":
    main()
