"""Times sdjax's jitted train step (optionally beside diffusers PyTorch's on the same config).

    python bench/train_step.py --model tiny --resolution 64 --batch 1
    python bench/train_step.py --model sd15 --resolution 512 --batch 1 --compile_only
    python bench/train_step.py --model tiny --resolution 256 --batch 2 --torch
    python bench/train_step.py --model sd15 --unet_scale 0.5 --resolution 256 --cached --torch

Reports compile time, step time, images/s, the FLOPs XLA counts per image and the memory of the
compiled program. The step is the trainer's own: VAE encode, text encoder, UNet forward and
backward, clipping, AdamW, EMA. With --cached it is the step that trains from the latent cache
(latent moments and text embeddings come in; no VAE, no text encoder). --unet_scale shrinks the
UNet's channels (a mid-size model with the full-size VAE and text encoder). Results go to
BENCHMARKS.md with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import StableDiffusion  # noqa: E402
from sdjax.pipeline import build_models  # noqa: E402
from sdjax.schedule import NoiseSchedule  # noqa: E402
from sdjax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from sdjax.train.step import LossConfig, init_state, make_loss_fn, make_train_step  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="shipped config name or pipeline folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="per-device batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attention", default="xla")
    p.add_argument("--cached", action="store_true",
                   help="the step from the latent cache (no VAE encode, no text encoder)")
    p.add_argument("--unet_scale", type=float, default=1.0,
                   help="multiply the UNet's block channels (e.g. 0.5 for a mid-size model)")
    p.add_argument("--compile_only", action="store_true", help="no steps: compile and analyse")
    p.add_argument("--torch", action="store_true", help="also time diffusers PyTorch's step")
    return p.parse_args()


def model_folder(args, tmp):
    """The shipped config, with its UNet's channels scaled by --unet_scale."""
    from sdjax.pipeline import SHIPPED_CONFIGS

    source = os.path.join(SHIPPED_CONFIGS, args.model)
    if args.unet_scale == 1.0 or not os.path.isdir(source):
        return args.model
    import shutil

    folder = shutil.copytree(source, os.path.join(tmp, "model"))
    path = os.path.join(folder, "unet", "config.json")
    with open(path) as f:
        config = json.load(f)
    config["block_out_channels"] = [int(c * args.unet_scale) for c in config["block_out_channels"]]
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def sdjax_step(args):
    sd = StableDiffusion.from_config(args.model, init_params=not args.compile_only)
    dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    models = build_models(sd.configs, dtype, args.attention, args.gradient_checkpointing)
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    loss_fn = make_loss_fn(models["unet"], models["vae"], models["text_encoder"], schedule, LossConfig())
    lr = learning_rate_schedule("constant", 1e-5, 0, 1000)
    tx = make_optimizer(lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0)
    step = jax.jit(make_train_step(loss_fn, tx, lr), donate_argnums=(0,))
    n = args.batch * jax.device_count()
    k = args.accumulation
    batch = {"pixel_values": jax.ShapeDtypeStruct((k, n, 3, args.resolution, args.resolution), jnp.float32),
             "input_ids": jax.ShapeDtypeStruct((k, n, 77), jnp.int32)}
    frozen_shapes = {c: sd.params[c] for c in ("vae", "text_encoder")}
    if args.cached:
        side = args.resolution // 8
        channels = sd.configs["vae"].get("latent_channels", 4)
        width = sd.configs["text_encoder"]["hidden_size"]
        latent = jax.ShapeDtypeStruct((k, n, channels, side, side), dtype)
        batch = {"latent_mean": latent, "latent_std": latent,
                 "text_embeddings": jax.ShapeDtypeStruct((k, n, 77, width), dtype)}
        frozen_shapes = {}
    if args.compile_only:
        state = jax.eval_shape(lambda p: init_state(p, tx, True), sd.params["unet"])
        frozen = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), frozen_shapes)
    else:
        state = jax.jit(lambda p: init_state(p, tx, True))(sd.params["unet"])
        frozen = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), frozen_shapes)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, key).compile()
    result = {"compile_s": round(time.perf_counter() - t0, 2)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        result["xla_gflop_per_image"] = round(cost["flops"] / (n * k) / 1e9, 3)
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2 ** 30
        # Donated state: outputs alias their inputs, so they are counted once.
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        result["memory_gib"] = {"arguments": round(memory.argument_size_in_bytes / gib, 3),
                                "temporaries": round(memory.temp_size_in_bytes / gib, 3),
                                "peak_estimate": round(peak / gib, 3)}
    if args.compile_only:
        return result
    rng = np.random.default_rng(0)
    if args.cached:
        data = {name: jnp.asarray(rng.uniform(0.1, 1, s.shape), s.dtype) for name, s in batch.items()}
    else:
        data = {"pixel_values": jnp.asarray(rng.uniform(-1, 1, batch["pixel_values"].shape), jnp.float32),
                "input_ids": jnp.asarray(rng.integers(0, 400, batch["input_ids"].shape), jnp.int32)}
    state, metrics = compiled(state, frozen, data, key)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, frozen, data, key)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / args.steps
    result.update(step_s=round(step_s, 4), images_per_s=round(n * k / step_s, 3))
    return result


def torch_step(args, folder):
    """diffusers' train_text_to_image.py step on the same config, in float32 on this machine."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).train()
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval().requires_grad_(False)
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    n = args.batch
    pixels = torch.rand(n, 3, args.resolution, args.resolution) * 2 - 1
    ids = torch.randint(0, 400, (n, 77))
    if args.cached:  # what a latent cache hands the step: latents and text embeddings
        with torch.no_grad():
            cached_latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cached_context = text(ids)[0]
    alphas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas = torch.cumprod(1 - alphas, 0)

    def one():
        if args.cached:
            latents, context = cached_latents, cached_context
        else:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                context = text(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    one()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    step_s = (time.perf_counter() - t0) / args.steps
    return {"step_s": round(step_s, 4), "images_per_s": round(n / step_s, 3),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    args = parse()
    info = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.model = model_folder(args, tmp)
        run(args, info)
    print(json.dumps(info, indent=2))


def run(args, info):
    info["sdjax"] = sdjax_step(args)
    if args.torch:
        if jax.device_count() != 1:
            raise SystemExit("--torch compares one device with PyTorch's one process: run without "
                             "fake devices")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            StableDiffusion.from_config(args.model).save_pretrained(tmp)
            info["diffusers_torch"] = torch_step(args, tmp)
        info["speed_ratio_sdjax_over_torch"] = round(
            info["diffusers_torch"]["step_s"] / info["sdjax"]["step_s"], 2)


if __name__ == "__main__":
    main()
