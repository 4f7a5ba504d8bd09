"""`train_flax.py generate` (images from a model or a checkpoint) and `train_flax.py compare`
(the prompts x checkpoints grid of a training run)."""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp

from sdjax.errors import ConfigError
from sdjax.sampling.images import grid, labelled_grid, to_pil
from sdjax.sampling.prompts import prompt_list
from sdjax.sampling.schedulers import default_scheduler_name


def _dtype(name: str):
    return None if name == "float32" else jnp.dtype(name)


def _negative(args):
    """One --negative_prompt applies to every prompt; several give one per prompt."""
    negative = args.negative_prompt
    return negative[0] if isinstance(negative, list) and len(negative) == 1 else negative


def _sampling_settings(args, sd) -> dict:
    return dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height, width=args.width, seed=args.seed,
                scheduler=args.scheduler or default_scheduler_name(sd.scheduler_config))


def generate(args) -> list:
    """Writes one PNG per image, grid.png (a row per prompt) and generate.json; -> the paths."""
    from sdjax.train.export import base_model, checkpoint_meta, read_unet
    from sdjax.train.loop import load_base_model

    if not args.model and not args.checkpoint:
        raise ConfigError("give --model (a diffusers folder or hub id) or --checkpoint")
    if args.ema is not None and not args.checkpoint:
        raise ConfigError("--ema/--no_ema pick the weights of a --checkpoint; add --checkpoint")
    prompts = prompt_list(args.prompt, "--prompt")
    step = used_ema = meta = None
    if args.checkpoint:
        meta = checkpoint_meta(args.checkpoint)
    sd = (load_base_model(args.model, 0, dtype=_dtype(args.dtype)) if args.model
          else base_model(meta, dtype=_dtype(args.dtype)))
    if args.checkpoint:
        sd.params["unet"], step, meta, used_ema = read_unet(args.checkpoint, sd.params["unet"],
                                                            args.ema)
    settings = _sampling_settings(args, sd)
    images = sd(prompts, _negative(args), num_images_per_prompt=args.num_images,
                output_type="pil", **settings)

    os.makedirs(args.output_dir, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        p, i = divmod(k, args.num_images)
        paths.append(os.path.join(args.output_dir, f"{p:03d}-{i:03d}.png"))
        image.save(paths[-1])
    grid_path = os.path.join(args.output_dir, "grid.png")
    grid(images, args.num_images).save(grid_path)
    record = dict(model=args.model or meta["base_model"]["pretrained_model_name_or_path"],
                  checkpoint=args.checkpoint, checkpoint_step=step, ema=used_ema, prompts=prompts,
                  negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                  dtype=args.dtype, files=[os.path.basename(p) for p in paths], **settings)
    with open(os.path.join(args.output_dir, "generate.json"), "w") as f:
        json.dump(record, f, indent=2)
    weights = f"checkpoint step {step} ({'EMA' if used_ema else 'raw'})" if args.checkpoint else args.model
    print(f"{len(images)} images of {len(prompts)} prompt(s) from {weights}, {settings['scheduler']} "
          f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}, seed "
          f"{settings['seed']} -> {args.output_dir} (grid: {grid_path})")
    return paths + [grid_path]


def _choose_steps(spec: str, available: list, where: str) -> list:
    if not available:
        raise ConfigError(f"no complete checkpoints in {where}: is --output_dir a training run?")
    if spec == "all":
        return available
    if not re.fullmatch(r"\d+(,\d+)*", spec.replace(" ", "")):
        raise ConfigError(f"--steps={spec!r}: give all, or steps separated by commas (e.g. 500,1000)")
    chosen = [int(s) for s in spec.replace(" ", "").split(",")]
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ConfigError(f"no checkpoint for step {missing[0]} in {where} (complete checkpoints: "
                          f"{', '.join(map(str, available))})")
    return chosen


def compare(args) -> str:
    """Samples every prompt from each chosen checkpoint of a run (and its exported final
    pipeline, with --steps all) with the same seeds; writes the labelled grid, rows prompts and
    columns checkpoints. -> the grid's path."""
    from sdjax.pipeline import StableDiffusion
    from sdjax.train import checkpoint as ckpt
    from sdjax.train.export import base_model, checkpoint_meta, read_unet

    prompts = prompt_list(args.prompts, "--prompts")
    directory = ckpt.checkpoint_dir(args.output_dir)
    available = []
    if os.path.isdir(directory):
        manager = ckpt.make_manager(directory, read_only=True)
        available = sorted(manager.all_steps())
        manager.close()
    steps = _choose_steps(args.steps, available, directory)
    paths = [os.path.join(directory, f"{ckpt.PREFIX}_{s}") for s in steps]
    sd = base_model(checkpoint_meta(paths[0]), dtype=_dtype(args.dtype))
    sampler = sd.sampler()
    settings = _sampling_settings(args, sd)
    frozen = sampler.place({c: sd.params[c] for c in ("vae", "text_encoder")})

    columns, labels = [], []
    final = os.path.join(args.output_dir, "model_index.json")
    weights = [(f"step {s}", p) for s, p in zip(steps, paths)]
    if args.steps == "all" and os.path.exists(final):
        weights.append(("final", None))
    for label, path in weights:
        if path is None:
            unet = StableDiffusion.from_pretrained(args.output_dir).params["unet"]
        else:
            unet, _, _, used_ema = read_unet(path, sd.params["unet"], args.ema)
            label += " EMA" if used_ema else ""
        out = sampler.sample(dict(frozen, unet=unet), prompts, _negative(args), **settings)
        columns.append(to_pil(out.images))
        labels.append(label)
        print(f"{label}: {len(prompts)} images in {out.seconds:.1f} s")
        del unet, out
    cells = [[column[r] for column in columns] for r in range(len(prompts))]
    sheet = labelled_grid(cells, prompts, labels)
    output = args.output or os.path.join(args.output_dir, "compare.png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    sheet.save(output)
    print(f"{len(prompts)} prompts x {len(labels)} checkpoints ({settings['scheduler']} "
          f"{settings['num_inference_steps']} steps, seed {settings['seed']}) -> {output}")
    return output
