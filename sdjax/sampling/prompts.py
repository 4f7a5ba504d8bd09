"""Prompts to token ids: checks, and a warning naming any prompt CLIP will cut short."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np

from sdjax.data.loader import tokenize
from sdjax.errors import ConfigError

log = logging.getLogger("sdjax")

Prompts = Union[str, Sequence[str]]


def prompt_list(prompts: Prompts, what: str = "prompt") -> list:
    """A prompt or a list of prompts -> a non-empty list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError(f"{what} is empty: give a prompt or a non-empty list of prompts")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{what} must hold strings, got {bad[0]!r}")
    return list(prompts)


def negative_list(negative: Optional[Prompts], count: int) -> list:
    """One negative prompt per prompt ("" when none is given, as diffusers does)."""
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [negative] * count
    negative = prompt_list(negative, "negative_prompt")
    if len(negative) != count:
        raise ConfigError(f"negative_prompt has {len(negative)} entries for {count} prompts: give "
                          "one negative prompt, or one per prompt")
    return negative


def encode(tokenizer, prompts: list) -> np.ndarray:
    """Token ids, truncated to the tokenizer's length with a warning naming each cut prompt."""
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            dropped = tokenizer.decode(ids[limit - 1:-1])
            log.warning("prompt %r is %d tokens long; CLIP reads %d, so this end of it is "
                        "ignored: %r", prompt, len(ids), limit, dropped)
    return tokenize(tokenizer, prompts)
