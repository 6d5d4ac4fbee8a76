"""Fill a Keras model from named tensors: walk the layers by attribute name, convert layouts, check shapes.

The walk gives every weight its diffusers name (`down_blocks.0.resnets.0.conv1.weight`), because the
layers' attributes are named after the diffusers modules. Layout rules live here and nowhere else:
torch Linear (out, in) -> Dense (in, out); a 1x1 Conv (out, in, 1, 1) also loads into a Dense;
torch Conv2d (out, in, kh, kw) -> Conv2D (kh, kw, in, out).
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from ..errors import CheckpointError
from .formats import ALIGNMENT, aligned_bytes

LEAVES = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.GroupNormalization,
          keras.layers.LayerNormalization, keras.layers.Embedding)


def _children(layer) -> Iterable[tuple[str, keras.layers.Layer]]:
    for attr, value in vars(layer).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            yield attr, value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, keras.layers.Layer) for v in value):
            yield from ((f"{attr}.{i}", v) for i, v in enumerate(value))


def leaf_layers(layer, prefix: str = "") -> dict[str, keras.layers.Layer]:
    """Every weight-holding layer under `layer`, keyed by its dotted diffusers module name."""
    out = {}
    for name, child in _children(layer):
        if isinstance(child, LEAVES):
            out[prefix + name] = child
        else:
            out.update(leaf_layers(child, f"{prefix}{name}."))
    return out


# The Keras variable each checkpoint parameter of a leaf loads into, by leaf kind.
VARIABLES = {"weight": ("kernel", "gamma", "embeddings"), "bias": ("bias", "beta")}


def torch_shape(layer, param: str, keras_shape) -> tuple:
    """A Keras variable's shape in torch's layout: Dense (out, in), Conv2D (out, in, kh, kw)."""
    shape = tuple(keras_shape)
    if param == "weight" and isinstance(layer, keras.layers.Dense):
        return shape[::-1]
    if param == "weight" and isinstance(layer, keras.layers.Conv2D):
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _to_keras(layer, param: str, value: np.ndarray, dtype):
    """A checkpoint tensor as a new tensor in the layout and dtype of the Keras variable.

    Transposes and casts run in TensorFlow (multi-threaded) straight from the read buffer, which they
    see without a copy when it is aligned and contiguous (DLPack); anything else is copied in.
    """
    perm = None
    if param == "weight" and isinstance(layer, keras.layers.Dense):
        perm = (1, 0)
    elif param == "weight" and isinstance(layer, keras.layers.Conv2D):
        perm = (2, 3, 1, 0)
    casts = tf.as_dtype(value.dtype) != tf.as_dtype(dtype)
    moves = perm is not None and _moves_data(value.shape, perm)
    if not ((casts or moves) and value.flags.c_contiguous and value.ctypes.data % ALIGNMENT == 0):
        value = _aligned_copy(value)  # the tensor (and so the variable) keeps this copy, never the read buffer
    tensor = tf.experimental.dlpack.from_dlpack(value.__dlpack__())  # shares the read buffer until...
    tensor = tf.cast(tensor, dtype)  # ...a cast (first: 16-bit results halve the transpose) or a transpose
    return tf.transpose(tensor, perm) if perm is not None else tensor  # makes a new buffer


def _aligned_copy(value: np.ndarray) -> np.ndarray:
    """A C-contiguous aligned copy, which TensorFlow adopts without copying again."""
    copy = aligned_bytes(value.nbytes).view(value.dtype).reshape(value.shape)
    np.copyto(copy, value)
    return copy


def _moves_data(shape, perm) -> bool:
    """Whether a transpose moves elements; TensorFlow turns one that only moves size-1 axes into a view."""
    kept = [axis for axis in perm if shape[axis] > 1]
    return kept != sorted(kept)


Getter = Callable[[str], tuple[str, tuple, Callable[[], np.ndarray]]]


class Entry(NamedTuple):
    """One variable and the checkpoint tensor it is filled from."""

    variable: keras.Variable
    leaf: keras.layers.Layer
    param: str  # "weight" or "bias"
    read: Callable[[], np.ndarray]


def variables_of(leaf) -> list[tuple[str, keras.Variable]]:
    """(checkpoint parameter, Keras variable) of a built leaf: its weight, and its bias where it has one."""
    out = []
    for param, attrs in VARIABLES.items():
        variable = next((v for v in (getattr(leaf, a, None) for a in attrs) if v is not None), None)
        if variable is not None:
            out.append((param, variable))
    return out


def plan(model, get: Getter, where: str) -> list[Entry]:
    """Every variable of a built `model` with the tensor that fills it, every key and shape checked first.

    `get(name)` returns (file key, file shape, read) for a diffusers parameter name or raises KeyError;
    `where` names the file in errors. Nothing is read here: a missing or misshaped tensor is reported
    from the file's header alone (strict, as nanoGPT's from_pretrained).
    """
    entries = []
    for name, leaf in leaf_layers(model).items():
        for param, variable in variables_of(leaf):
            try:
                key, file_shape, read = get(f"{name}.{param}")
            except KeyError as missing:
                raise CheckpointError(f"{where}: missing tensor {missing.args[0]}") from None
            expected = torch_shape(leaf, param, variable.shape)
            if _loaded_shape(leaf, file_shape) != expected:
                raise CheckpointError(f"{where}: tensor {key} has shape {tuple(file_shape)}, expected {expected}")
            entries.append(Entry(variable, leaf, param, read))
    return entries


def fill(entries: list[Entry]) -> None:
    """Reads each entry's tensor, converts it (layout, dtype) and assigns it to its variable, one at a time."""
    for variable, leaf, param, read in entries:
        value = read()
        value = value.reshape(_loaded_shape(leaf, value.shape))
        variable.assign(_to_keras(leaf, param, value, variable.dtype))


def _loaded_shape(leaf, shape) -> tuple:
    """A file shape as it loads: 1x1 conv checkpoints (SD 1.x proj_in, VAE q/k/v) load into a Dense."""
    shape = tuple(shape)
    return shape[:2] if isinstance(leaf, keras.layers.Dense) and len(shape) == 4 and shape[2:] == (1, 1) else shape
