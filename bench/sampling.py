"""Times sdjax's text-to-image sampling (optionally beside diffusers PyTorch's StableDiffusionPipeline).

    python bench/sampling.py --model tiny --batch 4 --steps 20 --torch
    python bench/sampling.py --model tiny --scheduler dpmpp_2m --mixed_precision bf16
    python bench/sampling.py --model sd15 --unet_scale 0.5 --resolution 256 --batch 1 --torch

One call is the whole pipeline: tokenize, CLIP text encoder (prompt and empty negative prompt),
the denoising loop with classifier-free guidance, VAE decode, images back on the host. Reports
sdjax's first-call seconds (compile + run), its steady-state seconds per batch (median of
--repeats calls) and their difference as compile time, and images/s. --torch saves the same
random weights as a diffusers folder and times StableDiffusionPipeline (float32, inference mode,
PyTorch's default threads) with the same prompts, initial latents, steps, guidance, size,
scheduler and batch: one warm-up call, then the median of --repeats. Both sides start from the
same latents, so the largest pixel difference between their images is reported as a check that
they compute the same thing (not for euler_a, whose step noise differs). --unet_scale shrinks the
UNet's channels (a mid-size model with the full-size VAE and text encoder). A config without a
tokenizer (sd15, sd21, sd21-base) borrows the tiny config's: timing needs token ids only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import StableDiffusion  # noqa: E402
from sdjax.pipeline import SHIPPED_CONFIGS  # noqa: E402
from sdjax.sampling.schedulers import SAMPLERS, SCHEDULERS  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "an oil painting of a fox in the snow"]

def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="shipped config name or pipeline folder")
    p.add_argument("--unet_scale", type=float, default=1.0,
                   help="multiply the UNet's block channels (e.g. 0.5 for a mid-size model)")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (one image each)")
    p.add_argument("--steps", type=int, default=20, help="inference steps")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="no",
                   help="sdjax's weights and compute (PyTorch stays float32)")
    p.add_argument("--torch", action="store_true", help="also time diffusers PyTorch's pipeline")
    return p.parse_args()


def model_folder(args, tmp):
    """--model, with its UNet's channels scaled by --unet_scale and a tokenizer where it has none."""
    source = args.model if os.path.isdir(args.model) else os.path.join(SHIPPED_CONFIGS, args.model)
    has_tokenizer = os.path.isdir(os.path.join(source, "tokenizer"))
    if not os.path.isdir(source) or (args.unet_scale == 1.0 and has_tokenizer):
        return args.model
    folder = shutil.copytree(source, os.path.join(tmp, "model"))
    if not has_tokenizer:
        shutil.copytree(os.path.join(SHIPPED_CONFIGS, "tiny", "tokenizer"),
                        os.path.join(folder, "tokenizer"))
    path = os.path.join(folder, "unet", "config.json")
    with open(path) as f:
        config = json.load(f)
    channels = [int(c * args.unet_scale) for c in config["block_out_channels"]]
    groups = config.get("norm_num_groups", 32)
    if any(c % groups for c in channels):
        raise SystemExit(f"--unet_scale {args.unet_scale} gives UNet channels {channels}, not all "
                         f"multiples of its {groups} norm groups: pick another scale (e.g. 0.5)")
    config["block_out_channels"] = channels
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def sdjax_sampling(sd, args, prompts, latents):
    """First call (compiles) and steady-state calls of sdjax's sampler -> (result, images)."""
    sampler, params = sd.sampler(), sd._device_params()

    def call():
        return sampler.sample(params, prompts, None, args.steps, args.guidance_scale,
                              args.resolution, args.resolution, 1, 0, args.scheduler, latents)

    first = call()
    runs = [call() for _ in range(args.repeats)]
    assert first.compiled and not any(r.compiled for r in runs), "a timed call recompiled"
    steady_s = statistics.median(r.seconds for r in runs)
    return {"first_call_s": round(first.seconds, 3), "steady_s": round(steady_s, 4),
            "compile_s": round(first.seconds - steady_s, 3),
            "images_per_s": round(len(prompts) / steady_s, 3),
            "dtype": "bfloat16" if args.mixed_precision == "bf16" else "float32"}, runs[-1].images


def torch_sampling(args, folder, prompts, latents):
    """diffusers' StableDiffusionPipeline on the saved weights -> (result, images): on a CUDA GPU
    in float16 (`torch_dtype=torch.float16`, as diffusers' examples run it), else float32."""
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    spec = SAMPLERS[args.scheduler]  # the diffusers class and options of the same sampler
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(
        pipe.scheduler.config, **spec.diffusers_options)
    pipe.set_progress_bar_config(disable=True)

    def call():
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          height=args.resolution, width=args.resolution, output_type="np",
                          latents=torch.from_numpy(latents).to(device, dtype),
                          generator=torch.Generator().manual_seed(0)).images
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, images

    call()  # warm-up
    runs = [call() for _ in range(args.repeats)]
    steady_s = statistics.median(seconds for seconds, _ in runs)
    return {"steady_s": round(steady_s, 4), "images_per_s": round(len(prompts) / steady_s, 3),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "device": device,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads()}, runs[-1][1]


def run(args, info):
    dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else None
    sd = StableDiffusion.from_config(args.model, seed=0, dtype=dtype)
    args.resolution = args.resolution or sd.sampler().default_size()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    side = args.resolution // sd.sampler().vae_factor
    latents = np.random.default_rng(0).standard_normal(
        (args.batch, sd.configs["unet"]["in_channels"], side, side)).astype(np.float32)
    info["settings"] = {k: getattr(args, k) for k in (
        "resolution", "batch", "steps", "guidance_scale", "scheduler", "repeats", "unet_scale")}
    info["sdjax"], sdjax_images = sdjax_sampling(sd, args, prompts, latents)
    if args.torch:
        with tempfile.TemporaryDirectory() as tmp:
            sd.save_pretrained(tmp, dtype=np.float32)
            info["diffusers_torch"], torch_images = torch_sampling(args, tmp, prompts, latents)
        info["speed_ratio_sdjax_over_torch"] = round(
            info["sdjax"]["images_per_s"] / info["diffusers_torch"]["images_per_s"], 2)
        if not SAMPLERS[args.scheduler].cls.stochastic:  # torch draws other noise
            difference = float(np.abs(sdjax_images - torch_images).max())
            info["max_abs_image_difference"] = float(f"{difference:.2g}")


def main():
    args = parse()
    info = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
            "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        args.model = model_folder(args, tmp)
        run(args, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
