"""LoRA runs: the adapters a run trains, what its checkpoints record about them, and the LoRA
files it writes.

The trainable set is {component: adapter tree} (`sdjax.lora.adapters`), the frozen set holds
the base models in the compute dtype (as diffusers keeps the frozen base in the weight dtype),
and the step applies the adapters inside the layers. A checkpoint's state layout records the
adapter settings (`adapter_layout`), from which `export`, `generate` and `compare` rebuild the
adapter shapes and merge the trained adapters into the base.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping, Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax import storage
from sdjax.errors import ConfigError
from sdjax.lora.adapters import AdaptedModel, adapter_structs, init_adapters, merge_adapters
from sdjax.lora.targets import find_targets, layer_names, module_name

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclasses.dataclass
class LoraRun:
    adapters: dict          # {component: adapter tree}, float32 host arrays
    scale: float            # alpha / rank
    dropout: float
    layout: dict            # recorded in the checkpoints (adapter_layout)

    def wrap(self, models: Mapping) -> dict:
        """The models the loss applies: adapters inside the layers of the adapted ones."""
        return {c: AdaptedModel(m, self.scale, self.dropout) if c in self.adapters else m
                for c, m in models.items()}


def adapter_layout(cfg) -> dict:
    return {"kind": "lora", "rank": cfg.lora_rank,
            "alpha": float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha),
            "layers": cfg.lora_layers or "attention"}


def targets_for(shapes: Mapping, components, layers: str, rank: Optional[int] = None) -> dict:
    """{component: layer paths} of `--lora_layers` in the models whose parameter trees are
    `shapes`; names matching no layer, or a rank above a layer's width, are refused."""
    names = layer_names(layers)
    targets, unmatched = {}, None
    for component in components:
        paths, missing = find_targets(shapes[component], component, names[component])
        targets[component] = paths
        unmatched = set(missing) if unmatched is None else unmatched & set(missing)
    if unmatched:
        raise ConfigError(f"--lora_layers: {', '.join(sorted(unmatched))} match no layer of the "
                          f"{' or '.join(components)}; give diffusers module names such as "
                          "to_q, to_out.0, ff.net.2, proj_in, conv1 (or a preset: attention, "
                          "transformer, locon)")
    if rank is not None:
        for component, paths in targets.items():
            flat = flatten_dict(shapes[component])
            for path in paths:
                kernel = flat[tuple(path) + ("kernel",)].shape
                width = min(int(np.prod(kernel[:-1])), kernel[-1])
                if rank > width:
                    raise ConfigError(f"--rank={rank} is larger than {module_name(path, component)} "
                                      f"({width} wide): choose a rank of at most {width}")
    return targets


def run_targets(cfg, shapes: Mapping) -> dict:
    """{component: layer paths} a LoRA run adapts; bad --lora_layers / --rank are refused."""
    components = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    return targets_for(shapes, components, cfg.lora_layers, cfg.lora_rank)


def setup_lora(cfg, shapes: Mapping) -> LoraRun:
    """The adapters a LoRA run starts from: fresh (as PEFT initialises them) or --resume_lora."""
    targets = run_targets(cfg, shapes)
    components = list(targets)
    key = jax.random.key(cfg.run_seed)
    adapters = {c: init_adapters(jax.random.fold_in(key, i), shapes[c], targets[c], cfg.lora_rank,
                                 cfg.lora_init or "gaussian")
                for i, c in enumerate(components)}
    if cfg.resume_lora:
        adapters = _resumed(cfg, shapes, adapters)
    return LoraRun(adapters, cfg.lora_scale, cfg.lora_dropout or 0.0, adapter_layout(cfg))


def _resumed(cfg, shapes: Mapping, fresh: dict) -> dict:
    """--resume_lora: the file's adapters in place of fresh ones. The file must adapt exactly
    this run's layers with this rank; a different alpha is folded into B."""
    from sdjax.lora.files import read_lora

    loaded = read_lora(cfg.resume_lora, {c: shapes[c] for c in fresh})
    out = {}
    for component, tree in fresh.items():
        want = {p[:-1] for p in flatten_dict(tree)}
        got_tree = loaded.adapters.get(component, {})
        got = {p[:-1] for p in flatten_dict(got_tree)}
        if want != got:
            raise ConfigError(f"--resume_lora {cfg.resume_lora} adapts {len(got)} layers of the "
                              f"{component}, this run's --lora_layers "
                              f"{cfg.lora_layers or 'attention'} {len(want)}: give the "
                              "--lora_layers (and --train_text_encoder) the file was trained with")
        flat = dict(flatten_dict(got_tree))
        for path in want:
            rank = flat[path + ("down",)].shape[-1]
            if rank != cfg.lora_rank:
                raise ConfigError(f"--resume_lora {cfg.resume_lora} has rank {rank} at "
                                  f"{module_name(path, component)}; this run has --rank "
                                  f"{cfg.lora_rank}: give --rank {rank}")
            ratio = loaded.scales[component][path] / cfg.lora_scale
            flat[path + ("up",)] = np.asarray(flat[path + ("up",)], np.float32) * ratio
            flat[path + ("down",)] = np.asarray(flat[path + ("down",)], np.float32)
        out[component] = unflatten_dict(flat)
    return out


def adapter_shapes(base_shapes: Mapping, layout: Mapping) -> dict:
    """The adapter trees (as ShapeDtypeStructs) a checkpoint of `layout` holds."""
    adapter = layout["adapter"]
    targets = targets_for(base_shapes, layout["trained"], adapter["layers"])
    return {c: adapter_structs(base_shapes[c], targets[c], adapter["rank"])
            for c in layout["trained"]}


def layout_scale(layout: Mapping) -> float:
    return float(layout["adapter"]["alpha"]) / layout["adapter"]["rank"]


def merged_params(base: Mapping, adapters: Mapping, scale: float) -> dict:
    """The base's components with the adapters merged into their kernels (host arrays)."""
    return {c: merge_adapters(base[c], tree, scale) for c, tree in adapters.items()}


def write_lora_files(folder: str, adapters: Mapping, layout: Mapping, fmt: str,
                     metadata: Optional[dict] = None) -> list:
    """The run's LoRA file(s) in `folder`: diffusers' pytorch_lora_weights.safetensors and/or
    the kohya file (`--save_lora_format`). -> the paths written."""
    from sdjax.lora.files import write_lora

    adapter = layout["adapter"]
    formats = ("diffusers", "kohya") if fmt == "both" else (fmt,)
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), dict(adapters))
    return [write_lora(folder, host, adapter["rank"], adapter["alpha"], f, metadata)
            for f in formats]


# The file sdjax writes beside the LoRA files of every folder it writes them to, listing them:
# only files listed there are ever overwritten, moved or deleted by sdjax.
MARKER = "written_by_sdjax.json"
_STEP_FOLDER = re.compile(r"checkpoint-(\d+)")


def lora_file_names(fmt: str) -> list:
    """The LoRA files a run with --save_lora_format `fmt` writes into a folder."""
    from sdjax.lora.files import DIFFUSERS_FILE, KOHYA_FILE

    names = {"diffusers": [DIFFUSERS_FILE], "kohya": [KOHYA_FILE]}
    return names.get(fmt, [DIFFUSERS_FILE, KOHYA_FILE])


def foreign_lora_files(output_dir: str, fmt: str) -> list:
    """The paths in `output_dir` at names a LoRA run writes (checkpoint-N/ folders, the final
    LoRA files) that sdjax did not write: another tool's (diffusers' own script uses the same
    names), which sdjax leaves alone."""
    if not storage.isdir(output_dir):
        return []
    foreign = [storage.join(output_dir, name) for name in lora_file_names(fmt)
               if storage.exists(storage.join(output_dir, name))
               and name not in _written_here(output_dir)]
    for name in storage.listdir(output_dir):
        folder = storage.join(output_dir, name)
        if _STEP_FOLDER.fullmatch(name) and not storage.exists(storage.join(folder, MARKER)):
            foreign.append(folder)
    return foreign


def check_lora_output_dir(output_dir: str, fmt: str) -> None:
    """Refuses (at start-up, before anything is compiled or written) an output_dir holding
    another tool's files at names this LoRA run would write."""
    foreign = foreign_lora_files(output_dir, fmt)
    if foreign:
        names = ", ".join(storage.basename(p) for p in foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ConfigError(f"--output_dir {output_dir} holds {names}, not written by sdjax (a "
                          "diffusers run's?), at names this LoRA run writes; sdjax leaves them "
                          "alone: give another --output_dir, or move them out of it")


def _written_here(folder: str) -> list:
    """The files sdjax's marker in `folder` lists (none without a marker)."""
    path = storage.join(folder, MARKER)
    if not storage.exists(path):
        return []
    try:
        return list(json.loads(storage.read_text(path)).get("files", []))
    except ValueError:
        return []


class LoraOutput:
    """The LoRA files a run writes: output_dir/pytorch_lora_weights.safetensors at the end and
    output_dir/checkpoint-N/ with every checkpoint (diffusers' names: `load_lora_weights`
    takes either folder), kept in step with the checkpoints Orbax keeps. Each folder gets a
    MARKER listing the files sdjax wrote; sdjax only ever removes or moves folders it marked."""

    def __init__(self, cfg, layout: Mapping, metadata: Mapping, is_main: bool):
        from sdjax import __version__

        self.output_dir = cfg.output_dir
        self.layout = layout
        self.format = cfg.save_lora_format or "diffusers"
        self.metadata = dict(metadata)
        self.use_ema = cfg.use_ema
        self.is_main = is_main
        self.version = __version__

    def folder(self, step: Optional[int]) -> str:
        return self.output_dir if step is None else storage.join(self.output_dir,
                                                                 f"checkpoint-{step}")

    def own_folders(self, step: int) -> list:
        """[output_dir/checkpoint-step] when sdjax wrote that folder, else []."""
        folder = self.folder(step)
        return [folder] if storage.exists(storage.join(folder, MARKER)) else []

    def write(self, state, step: Optional[int] = None, kept_steps=()) -> list:
        from sdjax.parallel import host_copy
        from sdjax.train.state import trained_weights

        adapters = host_copy(trained_weights(state, self.use_ema))
        if not self.is_main:
            return []
        folder = self.folder(step)
        with storage.local_folder(folder) as local:
            # The marker first: a folder cut short still says it is sdjax's.
            names = sorted(set(_written_here(folder)) | set(lora_file_names(self.format)))
            storage.write_text(storage.join(local, MARKER), json.dumps(
                {"written_by": f"sdjax {self.version}", "step": step, "files": names}))
            written = write_lora_files(local, adapters, self.layout, self.format, self.metadata)
        if step is not None:
            self._prune(set(kept_steps) | {step})
        return [storage.join(folder, storage.basename(p)) for p in written]

    def _prune(self, kept: set) -> None:
        """Removes the checkpoint-N/ LoRA folders sdjax wrote for checkpoints Orbax no longer
        keeps (folders without sdjax's marker are never touched)."""
        for name in storage.listdir(self.output_dir):
            match = _STEP_FOLDER.fullmatch(name)
            if match and int(match.group(1)) not in kept:
                for folder in self.own_folders(int(match.group(1))):
                    storage.remove_tree(folder)
