"""Times sdjax's jitted train step (optionally beside diffusers PyTorch's on the same config).

    python bench/train_step.py --model tiny --resolution 64 --batch 1
    python bench/train_step.py --model sd15 --resolution 512 --batch 1 --compile_only
    python bench/train_step.py --model tiny --resolution 256 --batch 2 --torch
    python bench/train_step.py --model sd15 --unet_scale 0.5 --resolution 256 --cached --torch
    python bench/train_step.py --model tiny --resolution 64 --batch 4 --train_text_encoder --prior_preservation

Reports compile time, step time (mean and median of the timed steps), images/s, the FLOPs XLA
counts per image and the memory of the compiled program per device. The step is the trainer's
own, built as `sdjax.train.trainer.build_trainer` builds it (trainable set, frozen set, per-
component AdamW, shardings over the device mesh): VAE encode, text encoder, UNet forward and
backward, clipping, AdamW, EMA. The trainable set is the UNet, or the UNet and the text encoder
with --train_text_encoder. --prior_preservation is DreamBooth's batch: each device's rows are
doubled (instance, class, instance, class, ...) with a prior_mask, as the loader builds it.
With --cached it is the step that trains from the latent cache (latent moments come in, no VAE;
text embeddings too unless the text encoder is trained). --unet_scale shrinks the UNet's
channels (a mid-size model with the full-size VAE and text encoder). Results go to
BENCHMARKS.md with the command and machine; bench/trainable_sets.py compares trainable sets.
"""

from __future__ import annotations

import argparse
import functools
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
from sdjax.config import TrainConfig  # noqa: E402
from sdjax.parallel import batch_sharded, make_mesh, replicated  # noqa: E402
from sdjax.models.build import build_models  # noqa: E402
from sdjax.schedule import NoiseSchedule  # noqa: E402
from sdjax.train.optimizer import run_optimizer  # noqa: E402
from sdjax.train.state import (adapter_variables, frozen_shardings, init_state,  # noqa: E402
                               merged_variables, place, split_params, state_shardings)
from sdjax.train.step import LossConfig, make_loss_fn, make_train_step  # noqa: E402
from sdjax.train.trainer import step_numbers  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="shipped config name or pipeline folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1,
                   help="per-device batch (instance rows: doubled by --prior_preservation)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attention", default="xla")
    p.add_argument("--cached", action="store_true",
                   help="the step from the latent cache (no VAE encode, no text encoder)")
    p.add_argument("--train_text_encoder", action="store_true",
                   help="train the text encoder with the UNet (trainable set unet + text_encoder)")
    p.add_argument("--prior_preservation", action="store_true",
                   help="DreamBooth's batch: a class row after every instance row, prior_mask")
    p.add_argument("--no_ema", action="store_true", help="no EMA copy of the trained weights")
    p.add_argument("--unet_scale", type=float, default=1.0,
                   help="multiply the UNet's block channels (e.g. 0.5 for a mid-size model)")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank instead of the models' weights")
    p.add_argument("--lora_layers", default="attention", help="--lora_layers of the trainer")
    p.add_argument("--lora_merged", action="store_true",
                   help="apply the adapters by merging them into the kernels (W + A @ B) in "
                        "the step, instead of inside the layers as the trainer does")
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


class PreparedStep:
    """The compiled step of one configuration, its analysis (`result`), and what it takes to
    build its inputs again (`inputs()`: a fresh state, the frozen set and a batch, placed)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def inputs(self):
        state = jax.jit(lambda p: init_state(p, self.tx, self.use_ema), out_shardings=self.shardings)(
            place(self.trainable, self.shardings.params))
        frozen = place(jax.tree_util.tree_map(lambda x: np.asarray(x).astype(self.dtype), self.frozen_host),
                       self.frozen_sharding)
        rng = np.random.default_rng(0)
        data = {}
        for name, s in self.batch.items():
            if name == "input_ids":
                data[name] = rng.integers(0, 400, s.shape).astype(np.int32)
            elif name == "prior_mask":  # rows instance, class, instance, class, ... (the loader's)
                data[name] = np.broadcast_to(np.tile(np.array([0.0, 1.0], np.float32), s.shape[1] // 2),
                                             s.shape).copy()
            elif name == "pixel_values":  # uint8 (k, rows, H, W, 3), as the loader yields them
                data[name] = rng.integers(0, 256, s.shape, np.uint8)
            else:
                data[name] = rng.uniform(0.1, 1, s.shape).astype(s.dtype)
        data = place(data, {name: batch_sharded(self.mesh, 1) for name in data})
        return state, frozen, data

    def timed_steps(self, state, frozen, data, steps: int):
        """One untimed step, then `steps` steps timed one by one -> (state, metrics, seconds)."""
        state, metrics = self.compiled(state, frozen, data, self.numbers)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = self.compiled(state, frozen, data, self.numbers)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        return state, metrics, times


def sdjax_step(args):
    prepared = prepare_step(args)
    result = prepared.result
    if args.compile_only:
        return result
    state, frozen, data = prepared.inputs()
    state, metrics, times = prepared.timed_steps(state, frozen, data, args.steps)
    step_s = sum(times) / len(times)
    result.update(step_s=round(step_s, 4), step_median_s=round(float(np.median(times)), 4),
                  step_times_s=[round(t, 4) for t in times],
                  images_per_s=round(prepared.rows * prepared.k / step_s, 3),
                  loss=float(np.asarray(metrics["loss"])))
    return result


def lora_sets(args, sd, models, trained):
    """(trainable adapters, frozen base, the models the loss applies, variables) of a LoRA run,
    as sdjax.lora.training sets it up (scale 1: alpha = rank)."""
    from sdjax.lora.adapters import init_adapters, merge_adapters
    from sdjax.lora.training import targets_for

    shapes = {c: sd.params[c] for c in trained}
    targets = targets_for(shapes, trained, args.lora_layers, args.lora_rank)
    trainable = {c: init_adapters(jax.random.key(i), shapes[c], targets[c], args.lora_rank)
                 for i, c in enumerate(trained)}
    frozen_host = dict(sd.params)
    if args.lora_merged:
        def variables(frozen, adapters):
            return {c: {"params": merge_adapters(p, adapters[c]) if c in adapters else p}
                    for c, p in frozen.items()}

        return trainable, frozen_host, models, variables
    from sdjax.lora.adapters import AdaptedModel

    wrapped = {c: AdaptedModel(m, 1.0) if c in trained else m for c, m in models.items()}
    return trainable, frozen_host, wrapped, adapter_variables


def prepare_step(args, sd=None) -> PreparedStep:
    """The step for these arguments, compiled (from shapes only) and analysed; `sd`: the model
    already built from args.model (with random weights unless --compile_only), to share it."""
    if args.prior_preservation and args.cached:
        raise SystemExit("--prior_preservation with --cached: the loader refuses class images "
                         "with a latent cache, so there is no such step to time")
    if sd is None:
        sd = StableDiffusion.from_config(args.model, init_params=not args.compile_only)
    dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    models = build_models(sd.configs, dtype, args.attention, args.gradient_checkpointing)
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    trained = ["unet"] + (["text_encoder"] if args.train_text_encoder else [])
    if getattr(args, "lora_rank", 0):
        trainable, frozen_host, models_for_loss, variables = lora_sets(args, sd, models, trained)
    else:
        trainable, frozen_host = split_params(sd.params, trained)
        models_for_loss, variables = models, merged_variables
    loss_fn = make_loss_fn(models_for_loss["unet"], models_for_loss["vae"],
                           models_for_loss["text_encoder"], schedule, LossConfig(), variables)
    # The trainer's numbers: constant 1e-5, AdamW and clipping at diffusers' defaults, seed 0.
    config = TrainConfig(learning_rate=1e-5, train_text_encoder=args.train_text_encoder)
    numbers = step_numbers(config, 1000, jax.device_count())
    optimizer = functools.partial(run_optimizer, config.lr_scheduler)
    tx, _ = optimizer(numbers)
    base_step = make_train_step(loss_fn, optimizer,
                                unroll_accumulation=jax.default_backend() == "cpu")
    use_ema = not args.no_ema
    mesh = make_mesh()
    devices = jax.device_count()
    per_device = args.batch * (2 if args.prior_preservation else 1)
    n = per_device * devices  # global rows of one micro-batch
    k = args.accumulation
    batch = {"pixel_values": jax.ShapeDtypeStruct((k, n, args.resolution, args.resolution, 3), jnp.uint8),
             "input_ids": jax.ShapeDtypeStruct((k, n, 77), jnp.int32)}
    if args.prior_preservation:
        batch["prior_mask"] = jax.ShapeDtypeStruct((k, n), jnp.float32)
    if args.cached:
        side = args.resolution // 8
        channels = sd.configs["vae"].get("latent_channels", 4)
        latent = jax.ShapeDtypeStruct((k, n, channels, side, side), dtype)
        del batch["pixel_values"]
        batch.update(latent_mean=latent, latent_std=latent)
        frozen_host.pop("vae")
        if not args.train_text_encoder:  # the cache brings the text embeddings
            width = sd.configs["text_encoder"]["hidden_size"]
            del batch["input_ids"]
            batch["text_embeddings"] = jax.ShapeDtypeStruct((k, n, 77, width), dtype)
            frozen_host.pop("text_encoder")
    frozen_abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), frozen_host)
    frozen_sharding = frozen_shardings(mesh, frozen_abstract)
    state_abstract = jax.eval_shape(lambda p: init_state(p, tx, use_ema), trainable)
    shardings = state_shardings(mesh, state_abstract)
    # As the trainer jits it: state donated, everything replicated, the batch split over the
    # devices along its rows.
    step = jax.jit(base_step,
                   in_shardings=(shardings, frozen_sharding, batch_sharded(mesh, 1), replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state_abstract, frozen_abstract, batch, numbers).compile()
    result = {"trained": "+".join(trained), "rows_per_device": per_device, "ema": use_ema,
              "trained_parameters": sum(int(np.prod(x.shape))
                                        for x in jax.tree_util.tree_leaves(trainable)),
              "compile_s": round(time.perf_counter() - t0, 2)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        # Per row (instance and class rows alike). With several devices XLA's count is the
        # per-device program's, so per row of one device.
        result["xla_gflop_per_image"] = round(cost["flops"] / (per_device * k) / 1e9, 3)
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2 ** 30
        # Per device (the partitioned program's buffers). Donated state: outputs alias their
        # inputs, so they are counted once.
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        result["memory_gib"] = {"arguments": round(memory.argument_size_in_bytes / gib, 3),
                                "temporaries": round(memory.temp_size_in_bytes / gib, 3),
                                "peak_estimate": round(peak / gib, 3)}
        result["memory_bytes"] = {"arguments": memory.argument_size_in_bytes,
                                  "temporaries": memory.temp_size_in_bytes,
                                  "outputs": memory.output_size_in_bytes,
                                  "aliased": memory.alias_size_in_bytes, "peak_estimate": peak}
    numbers = place(numbers, jax.tree_util.tree_map(lambda _: replicated(mesh), numbers))
    return PreparedStep(compiled=compiled, result=result, tx=tx, use_ema=use_ema, mesh=mesh,
                        numbers=numbers,
                        shardings=shardings, trainable=trainable, frozen_host=frozen_host,
                        frozen_sharding=frozen_sharding, dtype=dtype, batch=batch, rows=n, k=k)


def torch_step(args, folder):
    """diffusers' train_text_to_image.py step on the same config: on CUDA when PyTorch sees a GPU
    (frozen VAE and text encoder in the compute dtype, the UNet's float32 weights under autocast,
    SDPA attention: what the script does under `accelerate --mixed_precision bf16`), else in
    float32 on this machine's CPU; with its EMA (diffusers' EMAModel) unless --no_ema."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.mixed_precision == "bf16" and device == "cuda"
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).train().to(device)
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval().requires_grad_(False)
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval().requires_grad_(False)
    vae, text = vae.to(device, frozen_dtype), text.to(device, frozen_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    ema = None if args.no_ema else EMAModel(unet.parameters())
    if ema is not None:
        ema.to(device)
    n = args.batch
    pixels = (torch.rand(n, 3, args.resolution, args.resolution) * 2 - 1).to(device, frozen_dtype)
    ids = torch.randint(0, 400, (n, 77)).to(device)
    if args.cached:  # what a latent cache hands the step: latents and text embeddings
        with torch.no_grad():
            cached_latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cached_context = text(ids)[0]
    alphas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas = torch.cumprod(1 - alphas, 0).to(device)

    def one():
        if args.cached:
            latents, context = cached_latents, cached_context
        else:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                context = text(ids)[0]
        latents = latents.float()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.step(unet.parameters())

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    one()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    return {"step_s": round(step_s, 4), "images_per_s": round(n / step_s, 3),
            "torch": torch.__version__, "device": device,
            "compute": "bfloat16 autocast" if bf16 else "float32", "ema": ema is not None,
            "threads": torch.get_num_threads()}


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
    if args.torch:
        if jax.device_count() != 1:
            raise SystemExit("--torch compares one device with PyTorch's one process: run without "
                             "fake devices")
        if args.train_text_encoder or args.prior_preservation or args.no_ema:
            raise SystemExit("--torch times diffusers' train_text_to_image.py step (UNet trained, "
                             "EMA on the sdjax side): drop --train_text_encoder, "
                             "--prior_preservation and --no_ema")
    info["sdjax"] = sdjax_step(args)
    if args.torch:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            StableDiffusion.from_config(args.model).save_pretrained(tmp)
            info["diffusers_torch"] = torch_step(args, tmp)
        info["speed_ratio_sdjax_over_torch"] = round(
            info["diffusers_torch"]["step_s"] / info["sdjax"]["step_s"], 2)


if __name__ == "__main__":
    main()
