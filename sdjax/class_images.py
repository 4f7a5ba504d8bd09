"""DreamBooth prior preservation: the class images a folder lacks, made by the base model.

As diffusers' train_dreambooth.py does with --class_data_dir, --num_class_images, --class_prompt
and --sample_batch_size: when the folder holds fewer than `count` images, the rest are sampled
from the class prompt before training, here on every device of every host.

Generated image j is `class_{j:05d}.png` and its noise comes from (seed, j) alone, so a run that
was interrupted and resumes makes exactly the images an uninterrupted one would. Every file
appears whole (written under a temporary name, then renamed). Each host writes its share of each
batch, then whatever of that batch its folder still lacks: hosts sharing one folder write
disjoint files, hosts with folders of their own each end with the complete set.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import storage
from sdjax.data.sources import IMAGE_SUFFIXES
from sdjax.errors import ConfigError
from sdjax.parallel import sync_hosts
from sdjax.pipeline import MODEL_COMPONENTS
from sdjax.models.build import build_models
from sdjax.sampling.images import to_pil
from sdjax.sampling.sampler import Sampler

PARTIAL_PREFIX, PARTIAL_SUFFIX = ".class_", ".partial"  # .class_00003.png.host0.partial


def class_image_name(slot: int) -> str:
    return f"class_{slot:05d}.png"


@dataclasses.dataclass
class ClassImages:
    folder: str
    existing: int           # images in this host's folder before the call
    generated: int          # images sampled by this call (by all hosts together)
    seconds: float          # wall time of the call
    images_per_sec: float   # generated / seconds (0 when nothing was generated)
    written: list = dataclasses.field(default_factory=list)  # file names this host wrote


def ensure_class_images(sd, folder: str, prompt: str, count: int, *, sample_batch_size: int = 4,
                        seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        dtype=None, mesh=None, is_main: bool = True) -> ClassImages:
    """Fills `folder` up to `count` images sampled from `prompt` by `sd` (a StableDiffusion with
    host parameters) at the model's native size with its default scheduler, in batches of
    `sample_batch_size` per device; `dtype` (None: float32) is that of the sampling models.
    Every host must call it with the same arguments. Nothing stays on the devices afterwards."""
    start = time.perf_counter()
    _check_arguments(folder, prompt, count, sample_batch_size)
    error = None
    try:
        names = _prepare_folder(folder)
        needed = missing_slots(names, count)
    except ConfigError as e:
        if jax.process_count() == 1:
            raise
        error, names, needed = e, [], []
    slots = _agree_on_slots(needed, count, error)
    existing = len(names)
    if not slots:
        seconds = time.perf_counter() - start
        if is_main:
            print(f"class images: {folder} already holds {existing} images (>= {count}); "
                  "none generated")
        return ClassImages(folder, existing, 0, seconds, 0.0, [])

    written = _generate(sd, folder, prompt, slots, set(needed), sample_batch_size=sample_batch_size,
                        seed=seed, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, dtype=dtype, mesh=mesh, is_main=is_main)
    total = len(_image_names(folder))
    if total < count:
        where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
        raise ConfigError(f"--class_data_dir {folder}{where} holds {total} images after "
                          f"generating, fewer than --num_class_images={count}: did something "
                          "remove files from it meanwhile?")
    seconds = time.perf_counter() - start
    rate = len(slots) / seconds
    if is_main:
        print(f"class images: generated {len(slots)} of {count} from {prompt!r} into {folder} "
              f"({existing} were there) in {seconds:.1f} s, {rate:.2f} images/s")
    return ClassImages(folder, existing, len(slots), seconds, rate, written)


def _check_arguments(folder: str, prompt: str, count: int, sample_batch_size: int) -> None:
    """One-line errors for input that is wrong on every host alike."""
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"--num_class_images={count!r} must be a whole number of at least 1")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("--class_prompt is empty: give the prompt the class images are made "
                          "from (e.g. 'a photo of a dog')")
    if (not isinstance(sample_batch_size, (int, np.integer)) or isinstance(sample_batch_size, bool)
            or sample_batch_size < 1):
        raise ConfigError(f"--sample_batch_size={sample_batch_size!r} must be a whole number of "
                          "at least 1")
    if not folder or storage.is_remote(folder):
        raise ConfigError(f"--class_data_dir {folder!r}: give a local folder (class images are "
                          "written there before training)")


def _prepare_folder(folder: str) -> list:
    """Creates the folder if missing and removes temporary files an interrupted run left;
    -> the names of the images in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--class_data_dir {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        for entry in os.scandir(folder):
            if entry.name.startswith(PARTIAL_PREFIX) and entry.name.endswith(PARTIAL_SUFFIX):
                try:
                    os.remove(entry.path)
                except FileNotFoundError:  # another host sharing the folder removed it
                    pass
        return _image_names(folder)
    except OSError as e:
        raise ConfigError(f"cannot use --class_data_dir {folder}: "
                          f"{e.strerror or type(e).__name__}") from None


def _image_names(folder: str) -> list:
    """Image files directly in `folder` (what counts toward the total)."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file())


def missing_slots(names, count: int) -> list:
    """The first `count - len(names)` slots j whose file `class_image_name(j)` is not among
    `names` (all below `count`)."""
    present, slots, j = set(names), [], 0
    while len(slots) < count - len(present):
        if class_image_name(j) not in present:
            slots.append(j)
        j += 1
    return slots


def _agree_on_slots(needed: list, count: int, error: Optional[ConfigError]) -> list:
    """The slots every host samples: the union of what each host's folder lacks (hosts sharing
    a folder lack the same). One list for all, so no host leaves the collective sampling early;
    a host that cannot use its folder stops every host."""
    if jax.process_count() == 1:
        return needed
    from jax.experimental import multihost_utils

    row = np.full(count + 1, -1, np.int32)  # [folder usable, slots..., -1 padding]
    row[0] = error is None
    row[1:1 + len(needed)] = needed
    rows = np.asarray(multihost_utils.process_allgather(row))
    if error is not None:
        raise error
    failed = [k for k in range(len(rows)) if rows[k, 0] != 1]
    if failed:
        raise ConfigError(f"process {failed[0]} cannot use its --class_data_dir (see that "
                          "process's error); every process stops")
    return sorted(int(j) for j in set(rows[:, 1:].ravel().tolist()) - {-1})


def _sampling_params(sd, dtype) -> dict:
    """The base model's parameters; host floating-point arrays cast to `dtype` when given."""
    params = {c: sd.params[c] for c in MODEL_COMPONENTS}
    leaves = jax.tree_util.tree_leaves(params)
    if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
        raise ConfigError("the model's parameters are shapes only (from_config(init_params="
                          "False)); class images need weights")
    if dtype is None:
        return params

    def cast(x):
        if isinstance(x, jax.Array) or not jnp.issubdtype(np.asarray(x).dtype, jnp.floating):
            return x
        return np.asarray(x).astype(jnp.dtype(dtype), copy=False)

    return jax.tree_util.tree_map(cast, params)


def _generate(sd, folder: str, prompt: str, slots: list, needed: set, *, sample_batch_size: int,
              seed: int, num_inference_steps: int, guidance_scale: float, dtype, mesh,
              is_main: bool) -> list:
    """Samples `slots` in global batches on every device; this host writes those of `needed`
    that are its share, then (after every host has written) those its folder still lacks.
    The sampler, its compiled programs and the placed parameters are dropped on return.
    -> the file names this host wrote."""
    from tqdm.auto import tqdm

    sampler = Sampler(build_models(sd.configs, dtype), sd.configs, sd.scheduler_config,
                      sd.tokenizer, mesh)
    params = sampler.place(_sampling_params(sd, dtype))
    per_call = sample_batch_size * sampler.mesh.devices.size
    host, hosts = jax.process_index(), jax.process_count()
    written = []
    bar = tqdm(total=len(slots), unit="image", desc="class images", disable=not is_main,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for first in range(0, len(slots), per_call):
            batch = slots[first:first + per_call]
            out = sampler.sample(params, [prompt] * len(batch),
                                 num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, seed=seed, prompt_indices=batch)
            images = dict(zip(batch, to_pil(out.images)))
            for position, slot in enumerate(batch):
                if position % hosts == host and slot in needed:
                    written.append(_write_png(images[slot], folder, class_image_name(slot)))
            sync_hosts(f"sdjax-class-images-{first}")
            for slot in batch:  # folders not shared between hosts: the rest of the batch
                name = class_image_name(slot)
                if slot in needed and not os.path.exists(os.path.join(folder, name)):
                    written.append(_write_png(images[slot], folder, name))
            bar.update(len(batch))
            bar.set_postfix_str(f"{bar.n / (time.perf_counter() - start):.2f} images/s")
    finally:
        bar.close()
    return sorted(written)


def _write_png(image, folder: str, name: str) -> str:
    """Writes under a temporary name, then renames: a file of that name is always whole."""
    partial = os.path.join(folder, f".{name}.host{jax.process_index()}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, os.path.join(folder, name))
    except OSError as e:
        raise ConfigError(f"cannot write class image {os.path.join(folder, name)}: "
                          f"{e.strerror or type(e).__name__}") from None
    return name
