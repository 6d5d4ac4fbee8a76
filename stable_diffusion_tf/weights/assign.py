"""Fill a Keras model from named tensors: walk the layers by attribute name, convert layouts, check shapes.

The walk gives every weight its diffusers name (`down_blocks.0.resnets.0.conv1.weight`), because the
layers' attributes are named after the diffusers modules. Layout rules live here and nowhere else:
torch Linear (out, in) -> Dense (in, out); a 1x1 Conv (out, in, 1, 1) also loads into a Dense;
torch Conv2d (out, in, kh, kw) -> Conv2D (kh, kw, in, out).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

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


Getter = Callable[[str], tuple[str, np.ndarray]]


@contextlib.contextmanager
def filled_on_build(parts: list[tuple[keras.Model, Getter, str]]) -> Iterator[None]:
    """Inside the block, building an unbuilt model of `parts` creates every variable from its checkpoint tensor.

    Each part is (model, get, where): `get(name)` returns (file key, tensor) or raises KeyError, `where`
    names the file in errors. One background thread reads the tensors and converts them (layout, dtype)
    in layer order while this thread builds the Keras layers, and each variable adopts its converted
    tensor (no zero fill, no second copy): the file work and Keras' own work overlap. On leaving, every
    weight-holding layer must have been built; on an error, the reading stops.
    """
    plan = []
    for model, get, where in parts:
        for name, leaf in leaf_layers(model).items():
            plan += [(leaf, param, f"{name}.{param}", get, where) for param in _params(leaf)]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-reader")
    try:
        for leaf, param, full, get, where in plan:
            pending = reader.submit(_convert, leaf, param, full, get)
            for attr in INITIALIZERS[param]:
                if hasattr(leaf, attr):
                    setattr(leaf, attr, _initializer(leaf, param, pending, where))
        yield
        unbuilt = [full for leaf, _, full, _, _ in plan if not leaf.built]
        if unbuilt:
            raise RuntimeError(f"layers left unbuilt after the build call: {unbuilt[:3]}")
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        for leaf, param, *_ in plan:  # drop the references to the tensors (the variables hold them now)
            for attr in INITIALIZERS[param]:
                if hasattr(leaf, attr):
                    setattr(leaf, attr, keras.initializers.Zeros())


def _params(leaf) -> tuple[str, ...]:
    return ("weight", "bias") if getattr(leaf, "use_bias", True) else ("weight",)


def _convert(leaf, param: str, full: str, get: Getter):
    """(file key, file shape, shape as loaded, tensor or the error converting it): runs on the reader thread."""
    key, value = get(full)
    raw_shape = tuple(value.shape)
    if isinstance(leaf, keras.layers.Dense) and value.ndim == 4 and raw_shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # 1x1 conv checkpoints (SD 1.x proj_in, VAE q/k/v) load into a Dense
    try:
        tensor = _to_keras(leaf, param, value, leaf.dtype_policy.variable_dtype)
    except Exception as error:  # noqa: BLE001 - a wrongly shaped tensor; the builder reports its shape
        tensor = error
    return key, raw_shape, tuple(value.shape), tensor


def _initializer(leaf, param: str, pending, where: str):
    def initialize(shape, dtype=None):
        try:
            key, raw_shape, loaded_shape, tensor = pending.result()
        except KeyError as missing:
            raise CheckpointError(f"{where}: missing tensor {missing.args[0]}") from None
        expected = _torch_shape(leaf, param, shape)
        if loaded_shape != expected:
            raise CheckpointError(f"{where}: tensor {key} has shape {raw_shape}, expected {expected}")
        if isinstance(tensor, Exception):
            raise tensor
        return tf.cast(tensor, dtype) if dtype is not None else tensor
    return initialize
