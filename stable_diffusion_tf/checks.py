"""The limits on what a generation may be asked for, and the checks that enforce them (numpy only).

Each limit lives here once; the library and the command lines import it.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from .errors import InputError

SIZE_MULTIPLE = 8  # the VAE's downsampling factor: image sides are multiples of it
MIN_SIZE, MAX_SIZE = 8, 2048  # image sides, in pixels
MAX_STEPS = 1000  # the training schedule's length
MAX_SEED = 2**32 - 1
MAX_BATCH = 64  # images in one call
MAX_CHUNKS = 32  # 77-token chunks of one prompt (2400 tokens): longer text is refused, not encoded for minutes


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_size(name: str, value) -> None:
    if not _is_int(value) or not MIN_SIZE <= value <= MAX_SIZE or value % SIZE_MULTIPLE:
        raise InputError(f"{name} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}, "
                         f"got {value!r}")


def check_steps(steps) -> None:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be an integer between 1 and {MAX_STEPS}, got {steps!r}")


def check_guidance(guidance_scale) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")


def check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InputError(f"strength must be a number between 0 and 1, got {strength!r}")


def check_output_type(output_type) -> None:
    if output_type not in ("pil", "np"):
        raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")


def prompt_lists(prompt, negative_prompt, batch_size) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image."""
    if not _is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH:
        raise InputError(f"batch_size must be an integer between 1 and {MAX_BATCH}, got {batch_size!r}")
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) \
        else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt must be a string or a non-empty list of strings")
    if batch_size != 1 and len(prompts) != batch_size:
        raise InputError(f"{len(prompts)} prompts given for batch_size {batch_size}")
    if len(prompts) > MAX_BATCH:
        raise InputError(f"at most {MAX_BATCH} prompts in one call, got {len(prompts)}")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else []
        if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
            raise InputError("negative_prompt must be a string or a list of strings, one per prompt")
    return prompts, negatives


def seeds_for(seed, count: int) -> list[int]:
    """Image i uses seed + i; None picks a random base seed."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 2 - count)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED - count + 1:
        raise InputError(f"seed must be an integer between 0 and {MAX_SEED - count + 1} for {count} image(s), "
                         f"got {seed!r}")
    return [int(seed) + i for i in range(count)]


def check_clip_skip(clip_skip, layers: int) -> None:
    """Clip skip in AUTOMATIC1111's numbering: 1 (the last layer) to the text encoder's layer count."""
    if not _is_int(clip_skip) or not 1 <= clip_skip <= layers:
        raise InputError(f"clip_skip must be an integer between 1 and {layers}, got {clip_skip!r}")
