"""`train_flax.py merge`: checkpoint merging with A1111's checkpoint-merger semantics.

    weighted_sum     sum_i w_i * model_i             (A1111's "weighted sum" with multiplier M is
                                                      --weights 1-M M; default: equal weights)
    add_difference   A + M * (B - C)                 (exactly three models; M default 1)

Every tensor of every component (UNet, VAE, text encoder) is merged in float32. Models may be
diffusers folders, hub ids and single files in any mix; they must share one architecture (the
first difference is named). The output - a diffusers folder, or one single file - takes its
configs, scheduler and tokenizer from the first model.

Memory: the first model is loaded (float32), then the others are read one tensor at a time
from their files and added into it, so a merge needs about one model's worth of host memory
plus one tensor per input (and, for a diffusers output, the largest component once more while
it is written).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax.errors import ConfigError, WeightsError
from sdjax.model_files import is_single_file, load_model, open_model
from sdjax.pipeline import MODEL_COMPONENTS
from sdjax.models.build import build_models, param_shapes
from sdjax.weights.convert import _shape_str, _torch_shape, read_param, torch_key
from sdjax.weights.single_file_save import output_format

METHODS = ("weighted_sum", "add_difference")


def coefficients(n: int, method: str, weights: Optional[Sequence[float]],
                 multiplier: Optional[float], fusing: bool = False) -> list:
    """The checked weights of the models (add_difference: [1, M, -M]). One model with no
    weights is allowed when LoRAs are fused into it (`fusing`): a plain fuse."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose {' or '.join(METHODS)}")
    if method == "add_difference":
        if n != 3:
            raise ConfigError(f"add_difference merges exactly three models (A + M * (B - C)), "
                              f"got {n}")
        if weights:
            raise ConfigError("--weights is for weighted_sum; add_difference takes --multiplier")
        m = 1.0 if multiplier is None else float(multiplier)
        return [1.0, m, -m]
    if n == 1 and fusing and not weights and multiplier is None:
        return [1.0]
    if n < 2:
        raise ConfigError(f"merging needs at least two models, got {n} (one model with "
                          "--fuse_lora fuses LoRA files into it)")
    if multiplier is not None:
        raise ConfigError("--multiplier is for add_difference; weighted_sum takes --weights "
                          "(A1111's multiplier M is --weights 1-M M)")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"--weights gives {len(weights)} weights for {n} models")
    return [float(w) for w in weights]


def _shapes(files) -> dict:
    modules = build_models(files.configs)
    return {c: param_shapes(modules[c], c) for c in MODEL_COMPONENTS}


def check_same_architecture(first: str, first_shapes: dict, other: str, shapes: dict,
                            hint: str = "") -> None:
    """WeightsError naming the first parameter (or shape) in which `other` differs."""
    for component in MODEL_COMPONENTS:
        mine = {p: tuple(s.shape) for p, s in flatten_dict(first_shapes[component]).items()}
        theirs = {p: tuple(s.shape) for p, s in flatten_dict(shapes[component]).items()}
        for path, shape in mine.items():
            name = f"{component} {torch_key(path, component)}"
            if path not in theirs:
                raise WeightsError(f"cannot merge models of different architectures: {other} has "
                                   f"no {name}, which {first} has{hint}")
            if theirs[path] != shape:
                raise WeightsError(f"cannot merge models of different architectures: {name} is "
                                   f"{_shape_str(_torch_shape(path, shape))} in {first} but "
                                   f"{_shape_str(_torch_shape(path, theirs[path]))} in {other}"
                                   f"{hint}")
        extra = next((p for p in theirs if p not in mine), None)
        if extra is not None:
            raise WeightsError(f"cannot merge models of different architectures: {other} has "
                               f"{component} {torch_key(extra, component)}, which {first} has "
                               f"not{hint}")


def fuse_loras(params: dict, specs: Optional[Sequence[str]]) -> dict:
    """`--fuse_lora FILE:SCALE` (repeatable): LoRA files fused into the merged weights."""
    if not specs:
        return params
    from sdjax.lora.fuse import fuse_lora_files

    return fuse_lora_files(params, list(specs))


def merge_models(models: Sequence[str], output: str, method: str = "weighted_sum",
                 weights: Optional[Sequence[float]] = None, multiplier: Optional[float] = None,
                 format: Optional[str] = None, dtype: str = "float32",
                 original_config: Optional[str] = None, tokenizer: Optional[str] = None,
                 fuse_lora: Optional[Sequence[str]] = None, log=print) -> str:
    """Merges `models` (diffusers folders, hub ids, single files) into `output`."""
    format = output_format(output, format)
    coeffs = coefficients(len(models), method, weights, multiplier, fusing=bool(fuse_lora))
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}: choose float32, float16 or bfloat16")
    files = [open_model(m, original_config=original_config if is_single_file(m) else None)
             for m in models]
    first_shapes = _shapes(files[0])
    hint = ("" if original_config or not any(map(is_single_file, models)) else
            " (a single file is read with the standard SD 1.x/2.x configs unless "
            "--original_config describes it)")
    for name, other in zip(models[1:], files[1:]):
        check_same_architecture(models[0], first_shapes, name, _shapes(other), hint)
    sd = load_model(files[0], np.float32, tokenizer,
                    require_tokenizer=format == "diffusers")
    for component in MODEL_COMPONENTS:
        expected = flatten_dict(first_shapes[component])
        sources = [f.sources[component](first_shapes[component]) for f in files[1:]]
        flat = flatten_dict(sd.params.pop(component))  # replaced tensor by tensor
        for path in list(flat):
            shape = expected[path].shape

            def read(i):
                source, layout = sources[i]
                tensor = read_param(source, path, shape, component, np.float32, layout)
                return tensor if tensor.flags.writeable else np.array(tensor)

            # In place: at most two more copies of the tensor being merged at a time.
            if method == "add_difference":
                total = read(0)
                total -= read(1)  # B - C
                total *= np.float32(coeffs[1])
                total += flat[path]
            else:
                total = np.float32(coeffs[0]) * flat[path]
                for i, w in enumerate(coeffs[1:]):
                    tensor = read(i)
                    tensor *= np.float32(w)
                    total += tensor
                    del tensor
            flat[path] = total
            del total
        sd.params[component] = unflatten_dict(flat)
    sd.params = fuse_loras(sd.params, fuse_lora)
    out_dtype = None if dtype == "float32" else np.dtype(_numpy_dtype(dtype))
    if format == "single_file":
        sd.save_single_file(output, dtype=out_dtype)
    else:
        sd.save_pretrained(output, dtype=out_dtype)
    what = (f"{models[0]} + {coeffs[1]:g} * ({models[1]} - {models[2]})"
            if method == "add_difference"
            else " + ".join(f"{w:g} * {m}" for w, m in zip(coeffs, models)))
    log(f"merged {what} ({dtype}) -> {output}")
    return output


def _numpy_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)
