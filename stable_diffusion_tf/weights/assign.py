"""Fill a Keras model from named tensors: walk the layers by attribute name, convert layouts, check shapes.

The walk gives every weight its diffusers name (`down_blocks.0.resnets.0.conv1.weight`), because the
layers' attributes are named after the diffusers modules. Layout rules live here and nowhere else:
torch Linear (out, in) -> Dense (in, out); a 1x1 Conv (out, in, 1, 1) also loads into a Dense;
torch Conv2d (out, in, kh, kw) -> Conv2D (kh, kw, in, out).
"""

from __future__ import annotations

from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from ..errors import CheckpointError

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


INITIALIZERS = {"weight": ("kernel_initializer", "gamma_initializer", "embeddings_initializer"),
                "bias": ("bias_initializer", "beta_initializer")}


def _torch_shape(layer, param: str, keras_shape) -> tuple:
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
    if not ((casts or moves) and value.flags.c_contiguous and value.ctypes.data % 64 == 0):
        value = _aligned_copy(value)  # the tensor (and so the variable) keeps this copy, never the read buffer
    tensor = tf.experimental.dlpack.from_dlpack(value.__dlpack__())  # shares the read buffer until...
    tensor = tf.cast(tensor, dtype)  # ...a cast (first: 16-bit results halve the transpose) or a transpose
    return tf.transpose(tensor, perm) if perm is not None else tensor  # makes a new buffer


def _aligned_copy(value: np.ndarray) -> np.ndarray:
    """A C-contiguous copy on a 64-byte boundary, which TensorFlow adopts without copying again."""
    buffer = np.empty(value.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    copy = buffer[start:start + value.nbytes].view(value.dtype).reshape(value.shape)
    np.copyto(copy, value)
    return copy


def _moves_data(shape, perm) -> bool:
    """Whether a transpose moves elements; TensorFlow turns one that only moves size-1 axes into a view."""
    kept = [axis for axis in perm if shape[axis] > 1]
    return kept != sorted(kept)


def fill_on_build(model, get: Callable[[str], tuple[str, np.ndarray]], where: str) -> Callable[[], None]:
    """Makes every variable of an unbuilt `model` start at its checkpoint tensor when the model builds.

    `get(name)` returns (file key, tensor) or raises KeyError. Creating each variable from its tensor
    (no zero fill, no second copy through `assign`) is what makes loading fast. Returns a check to run
    after building: every weight-holding layer must have been built (and so filled).
    """
    leaves = leaf_layers(model)
    for name, leaf in leaves.items():
        params = ("weight", "bias") if getattr(leaf, "use_bias", True) else ("weight",)
        for param in params:
            for attr in INITIALIZERS[param]:
                if hasattr(leaf, attr):
                    setattr(leaf, attr, _initializer(leaf, param, f"{name}.{param}", get, where))

    def check() -> None:
        unbuilt = [name for name, leaf in leaves.items() if not leaf.built]
        if unbuilt:
            raise RuntimeError(f"layers left unbuilt after the build call: {unbuilt[:3]}")
    return check


def _initializer(leaf, param: str, full: str, get, where: str):
    def initialize(shape, dtype=None):
        try:
            key, value = get(full)
        except KeyError as missing:
            raise CheckpointError(f"{where}: missing tensor {missing.args[0]}") from None
        raw_shape = tuple(value.shape)
        if isinstance(leaf, keras.layers.Dense) and value.ndim == 4 and raw_shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1x1 conv checkpoints (SD 1.x proj_in, VAE q/k/v) load into a Dense
        if tuple(value.shape) != _torch_shape(leaf, param, shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {raw_shape}, "
                                  f"expected {_torch_shape(leaf, param, shape)}")
        return _to_keras(leaf, param, value, dtype)
    return initialize
