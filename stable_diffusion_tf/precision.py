"""The precisions a pipeline runs in, by name, and the one that suits the hardware ("auto").

No TensorFlow import here: the command lines check their flags with this module before TensorFlow loads.
"""

from __future__ import annotations

import contextlib

from .errors import InputError

# Keras dtype policy of the networks' compute, by every name a user may give ("auto" is resolved first).
PRECISIONS = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
CHOICES = ("auto", *PRECISIONS)
# In reduced precision the weights themselves are held in 16 bits (half the memory, no cast per call); norms,
# softmax and the sampler math stay float32 (layers.py).
WEIGHT_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
NATIVE_BFLOAT16 = ("avx512_bf16", "amx_bf16")  # CPU flags of bfloat16 arithmetic in hardware (x86)


def policy(precision: str) -> str:
    """The Keras compute policy of a precision name ("bfloat16" -> "mixed_bfloat16"); raises InputError."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(CHOICES)}")
    return PRECISIONS[precision]


def auto(has_gpu: bool, cpu_flags: set[str] | frozenset[str]) -> str:
    """The fastest precision for the hardware: float16 on a GPU, bfloat16 on a CPU that computes it natively
    (AVX-512 BF16 or AMX), float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if has_gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if native_bfloat16(cpu_flags) else "float32"


def native_bfloat16(cpu_flags: set[str] | frozenset[str]) -> bool:
    return any(flag in cpu_flags for flag in NATIVE_BFLOAT16)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where there is no such file)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    return frozenset()
