"""The precisions a pipeline runs in, by name (no TensorFlow import: the command lines check flags with it)."""

from __future__ import annotations

from .errors import InputError

# Keras dtype policy of the networks' compute, by every name a user may give.
PRECISIONS = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# In reduced precision the weights themselves are held in 16 bits (half the memory, no cast per call); norms,
# softmax and the sampler math stay float32 (layers.py).
WEIGHT_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def policy(precision: str) -> str:
    """The Keras compute policy of a precision name ("bfloat16" -> "mixed_bfloat16"); raises InputError."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def mixed(has_gpu: bool) -> str:
    """What mixed precision means on this hardware: float16 on a GPU, bfloat16 on a CPU."""
    return "mixed_float16" if has_gpu else "mixed_bfloat16"
