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


def _variables(layer) -> dict[str, keras.Variable]:
    """The torch parameter names of one leaf layer mapped to its Keras variables."""
    if isinstance(layer, keras.layers.Embedding):
        return {"weight": layer.embeddings}
    if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
        names = {"weight": layer.kernel}
        if layer.use_bias:
            names["bias"] = layer.bias
        return names
    return {"weight": layer.gamma, "bias": layer.beta}


def parameter_names(model) -> list[str]:
    """The diffusers names of every parameter of a built model."""
    return [f"{name}.{p}" for name, leaf in leaf_layers(model).items() for p in _variables(leaf)]


def _torch_shape(layer, param: str, shape) -> tuple:
    shape = tuple(shape)
    if param == "weight" and isinstance(layer, keras.layers.Dense):
        return shape[::-1]
    if param == "weight" and isinstance(layer, keras.layers.Conv2D):
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _to_keras(layer, param: str, value: np.ndarray) -> np.ndarray:
    if param == "weight" and isinstance(layer, keras.layers.Dense):
        if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv checkpoints (SD 1.x proj_in, VAE q/k/v)
            value = value[:, :, 0, 0]
        value = value.T if value.ndim == 2 else value
    elif param == "weight" and isinstance(layer, keras.layers.Conv2D) and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    return value


def assign(model, get: Callable[[str], tuple[str, np.ndarray]], where: str) -> None:
    """Assign every variable of a built `model`; `get(name)` returns (file key, tensor) or raises KeyError."""
    for name, leaf in leaf_layers(model).items():
        for param, variable in _variables(leaf).items():
            full = f"{name}.{param}"
            try:
                key, value = get(full)
            except KeyError as missing:
                raise CheckpointError(f"{where}: missing tensor {missing.args[0]}") from None
            raw_shape = tuple(value.shape)
            value = _to_keras(leaf, param, value)
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(f"{where}: tensor {key} has shape {raw_shape}, "
                                      f"expected {_torch_shape(leaf, param, variable.shape)}")
            variable.assign(np.asarray(value, dtype=variable.dtype))
