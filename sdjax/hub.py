"""Resolving a model name to a local diffusers pipeline folder (local path or Hugging Face hub id).

Honours HF_HUB_OFFLINE (then only the local cache is used) and revision; online, it lists the
repository first and downloads only the configs, the tokenizer and one weights file per model
component, in the format `from_pretrained` will read.
"""

from __future__ import annotations

import os
from typing import Optional

from sdjax.errors import WeightsError
from sdjax.weights.files import candidate_files

COMPONENT_KINDS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers"}


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _weights_patterns(files: set, folder: str, kind: str, variant: Optional[str]) -> list:
    """allow_patterns for the weights `from_pretrained` will read from `folder` ('' = the root)."""
    prefix = f"{folder}/" if folder else ""
    for name in candidate_files(kind, variant):
        if f"{prefix}{name}" in files:
            if name.endswith(".index.json"):
                stem, ext = name.split(".")[0], "." + name.split(".")[1]
                shards = f"{stem}.{variant}" if variant else stem
                return [f"{prefix}{name}", f"{prefix}{shards}-*-of-*{ext}"]
            return [f"{prefix}{name}"]
    return []


def files_to_download(repo_files: list, variant: Optional[str],
                      component: Optional[str] = None) -> list:
    """allow_patterns for snapshot_download: configs, tokenizer, scheduler and chosen weights of
    a pipeline repository, or (`component`) the config and weights of a one-model repository."""
    files = set(repo_files)
    if component is not None:
        return ["config.json"] + _weights_patterns(files, "", COMPONENT_KINDS[component], variant)
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"]
    for name, kind in COMPONENT_KINDS.items():
        patterns += _weights_patterns(files, name, kind, variant)
    return patterns


def resolve_model_dir(name_or_path: str, revision: Optional[str] = None,
                      variant: Optional[str] = None, component: Optional[str] = None) -> str:
    """A local folder holding the pipeline `name_or_path` names (with `component`: a repository
    of that one model, e.g. a VAE); raises WeightsError if none."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise WeightsError(f"{name_or_path} is a file; pass the pipeline folder (the one holding "
                           "model_index.json) or a hub id (a single-file checkpoint loads with "
                           "StableDiffusion.from_single_file)")
    if _looks_like_path(name_or_path):
        raise WeightsError(f"model folder {name_or_path} does not exist; pass an existing "
                           "diffusers pipeline folder or a hub id such as "
                           "'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(name_or_path)
    except Exception:
        raise WeightsError(f"{name_or_path!r} is neither an existing folder nor a valid hub id "
                           "('owner/name')") from None
    where = f"{name_or_path}" + (f" at revision {revision}" if revision else "")
    try:
        if constants.HF_HUB_OFFLINE:
            return snapshot_download(name_or_path, revision=revision, local_files_only=True)
        repo_files = HfApi().list_repo_files(name_or_path, revision=revision)
        return snapshot_download(name_or_path, revision=revision,
                                 allow_patterns=files_to_download(repo_files, variant, component))
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if constants.HF_HUB_OFFLINE:
            raise WeightsError(f"{where} is not in the local Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                               "downloading it: download it once online, or pass a local folder"
                               ) from None
        raise WeightsError(f"cannot fetch {where} from the Hugging Face hub: {first_line}") from None
