"""`train_flax.py generate` (images from a model or a checkpoint) and `train_flax.py compare`
(the prompts x checkpoints grid of a training run).

Both run on every host of a pod (the images are split over all devices) and only process 0
writes files; output folders may be bucket paths."""

from __future__ import annotations

import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import storage
from sdjax.checkpoints import apply_prediction_type, base_model
from sdjax.errors import ConfigError
from sdjax.lora.fuse import fuse_lora_files, fuse_loras, load_loras
from sdjax.lora.targets import ADAPTED_COMPONENTS
from sdjax.lora.training import LORA_FILE
from sdjax.parallel import sync_hosts
from sdjax.sampling.images import grid, labelled_grid, to_pil
from sdjax.sampling.prompts import prompt_list
from sdjax.sampling.schedulers import default_scheduler_name, sampler_name


def _save_png(image, path: str) -> None:
    data = io.BytesIO()
    image.save(data, format="PNG")
    storage.write_bytes(path, data.getvalue())


def _dtype(name: str):
    return None if name == "float32" else jnp.dtype(name)


def _as_dtype(params: dict, name: str) -> dict:
    """Checkpoint weights (float32) in the dtype the pipeline was loaded in."""
    if name == "float32":
        return params
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.dtype(name)), params)


def _negative(args):
    """One --negative_prompt applies to every prompt; several give one per prompt."""
    negative = args.negative_prompt
    return negative[0] if isinstance(negative, list) and len(negative) == 1 else negative


def _adapted(params: dict) -> dict:
    return {c: params[c] for c in ADAPTED_COMPONENTS}


def _lora_note(args) -> str:
    return (" + LoRA " + ", ".join(args.lora)) if args.lora else ""


def _sampling_settings(args, sd) -> dict:
    return dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height, width=args.width, seed=args.seed,
                scheduler=(sampler_name(args.scheduler) if args.scheduler
                           else default_scheduler_name(sd.scheduler_config)))


def generate(args) -> list:
    """Writes one PNG per image, grid.png (a row per prompt) and generate.json; -> the paths."""
    from sdjax.checkpoints import read_meta, read_model_weights
    from sdjax.pipeline import load_pipeline

    if not args.model and not args.checkpoint:
        raise ConfigError("give --model (a diffusers folder or hub id) or --checkpoint")
    if args.ema is not None and not args.checkpoint:
        raise ConfigError("--ema/--no_ema pick the weights of a --checkpoint; add --checkpoint")
    prompts = prompt_list(args.prompt, "--prompt")
    step = used_ema = meta = None
    if args.checkpoint:
        meta = read_meta(args.checkpoint)
    sd = (load_pipeline(args.model, 0, dtype=_dtype(args.dtype),
                        tokenizer=getattr(args, "tokenizer_name", None),
                        original_config=getattr(args, "original_config", None)) if args.model
          else base_model(meta, dtype=_dtype(args.dtype)))
    apply_prediction_type(sd, getattr(args, "prediction_type", None))
    if args.checkpoint:
        trained, step, meta, used_ema = read_model_weights(args.checkpoint, sd.params, args.ema)
        sd.params.update(_as_dtype(trained, args.dtype))
    if args.lora:
        sd.params.update(fuse_lora_files(_adapted(sd.params), args.lora))
    settings = _sampling_settings(args, sd)
    images = sd(prompts, _negative(args), num_images_per_prompt=args.num_images,
                output_type="pil", **settings)

    paths = [storage.join(args.output_dir, f"{p:03d}-{i:03d}.png")
             for p, i in (divmod(k, args.num_images) for k in range(len(images)))]
    grid_path = storage.join(args.output_dir, "grid.png")
    if jax.process_index() == 0:
        storage.makedirs(args.output_dir)
        for image, path in zip(images, paths):
            _save_png(image, path)
        _save_png(grid(images, args.num_images), grid_path)
        record = dict(model=args.model or meta["base_model"]["pretrained_model_name_or_path"],
                      checkpoint=args.checkpoint, checkpoint_step=step, ema=used_ema,
                      lora=args.lora,
                      prompts=prompts, negative_prompt=args.negative_prompt,
                      num_images_per_prompt=args.num_images, dtype=args.dtype,
                      processes=jax.process_count(), devices=jax.device_count(),
                      files=[storage.basename(p) for p in paths], **settings)
        storage.write_text(storage.join(args.output_dir, "generate.json"),
                           json.dumps(record, indent=2))
        weights = (f"checkpoint step {step} ({'EMA' if used_ema else 'raw'})" if args.checkpoint
                   else args.model) + _lora_note(args)
        print(f"{len(images)} images of {len(prompts)} prompt(s) from {weights}, "
              f"{settings['scheduler']} {settings['num_inference_steps']} steps, guidance "
              f"{settings['guidance_scale']}, seed {settings['seed']} -> {args.output_dir} "
              f"(grid: {grid_path})")
    sync_hosts("sdjax-generate-written")
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


# What a training run's output_dir holds besides the pipeline (not needed to load it).
RUN_FOLDERS = ("checkpoints", "abandoned_checkpoints", "latent_cache", "logs", "validation")


def compare(args) -> str:
    """Samples every prompt from each chosen checkpoint of a run (and its exported final
    pipeline or final LoRA file, with --steps all) with the same seeds; writes the labelled grid, rows prompts and
    columns checkpoints. -> the grid's path."""
    from sdjax import checkpoints as ckpt
    from sdjax.pipeline import StableDiffusion

    prompts = prompt_list(args.prompts, "--prompts")
    directory = ckpt.checkpoint_dir(args.output_dir)
    available = []
    if storage.isdir(directory):
        manager = ckpt.make_manager(directory, read_only=True)
        available = sorted(manager.all_steps())
        manager.close()
    steps = _choose_steps(args.steps, available, directory)
    paths = [ckpt.step_path(directory, s) for s in steps]
    sd = ckpt.base_model(ckpt.read_meta(paths[0]), dtype=_dtype(args.dtype))
    sampler = sd.sampler()
    settings = _sampling_settings(args, sd)
    base = sampler.place(sd.params)
    loras = load_loras(args.lora, _adapted(sd.params))

    columns, labels = [], []
    final = storage.join(args.output_dir, "model_index.json")
    final_lora = storage.join(args.output_dir, LORA_FILE)  # a LoRA run's output
    weights = [(f"step {s}", p) for s, p in zip(steps, paths)]
    if args.steps == "all" and storage.exists(final):
        weights.append(("final", None))
    elif args.steps == "all" and storage.exists(final_lora):
        weights.append(("final LoRA", final_lora))
    for label, path in weights:
        if path is None:
            with storage.local_copy(args.output_dir, skip=RUN_FOLDERS) as folder:
                trained = StableDiffusion.from_pretrained(folder).params
        elif path == final_lora:
            trained = fuse_lora_files(_adapted(sd.params), [final_lora])
        else:
            trained, _, _, used_ema = ckpt.read_model_weights(path, sd.params, args.ema)
            label += " EMA" if used_ema else ""
        trained = _as_dtype(trained, args.dtype)
        if loras:
            trained = dict(trained, **fuse_loras(_adapted(dict(sd.params, **trained)), loras))
        out = sampler.sample(dict(base, **trained), prompts, _negative(args), **settings)
        columns.append(to_pil(out.images))
        labels.append(label)
        if jax.process_index() == 0:
            print(f"{label}: {len(prompts)} images in {out.seconds:.1f} s")
        del trained, out
    output = args.output or storage.join(args.output_dir, "compare.png")
    if jax.process_index() == 0:
        cells = [[column[r] for column in columns] for r in range(len(prompts))]
        if not storage.is_remote(output):
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        _save_png(labelled_grid(cells, prompts, labels), output)
        print(f"{len(prompts)} prompts x {len(labels)} checkpoints{_lora_note(args)} "
              f"({settings['scheduler']} "
              f"{settings['num_inference_steps']} steps, seed {settings['seed']}) -> {output}")
    sync_hosts("sdjax-compare-written")
    return output
