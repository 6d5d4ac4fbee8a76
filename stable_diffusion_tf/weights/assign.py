"""Fill a Keras model from named tensors: walk the layers by attribute name, convert layouts, check shapes.

The walk gives every weight its diffusers name (`down_blocks.0.resnets.0.conv1.weight`), because the
layers' attributes are named after the diffusers modules. Layout rules live here and nowhere else:
torch Linear (out, in) -> Dense (in, out); a 1x1 Conv (out, in, 1, 1) also loads into a Dense;
torch Conv2d (out, in, kh, kw) -> Conv2D (kh, kw, in, out).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops.resource_variable_ops import UninitializedVariable  # not in tf.*

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


Getter = Callable[[str], tuple[str, tuple, Callable[[], np.ndarray]]]


_READERS: set[ThreadPoolExecutor] = set()  # background readers with tensors still queued


def _cancel_readers() -> None:
    """At interpreter exit (an error, Ctrl-C, the end of a script): the queued reads are dropped, not run."""
    for reader in list(_READERS):
        reader.shutdown(wait=False, cancel_futures=True)


# runs before the interpreter joins the reader threads: those atexit hooks run last-registered first, and
# concurrent.futures' own (which joins them) was registered when ThreadPoolExecutor was imported above
threading._register_atexit(_cancel_readers)


class Filling:
    """Checkpoint tensors on their way into the variables of the models built inside `filled_on_build`.

    Once every variable exists, one background thread reads each tensor, converts it (layout, dtype) and
    assigns it to its variable, in build order, then closes the files. `wait(model)` blocks until that
    model's variables (or, with no model, all of them) hold their tensors, and raises the error that
    stopped the reading, if any. When the interpreter exits mid-read, the tensors still queued are dropped.
    """

    def __init__(self, files) -> None:
        self._files = list(files)
        self._tasks: dict[int, list[Future]] = {}
        self._error: BaseException | None = None

    def _start(self, plan: list[tuple]) -> None:
        """Every variable exists: read the tensors in the background (after the build, which they would slow).

        `plan`: (model, leaf, param, name, slot) per variable, `slot` holding (variable, read)."""
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-reader")
        _READERS.add(reader)
        for model, leaf, param, _, slot in plan:
            self._tasks.setdefault(id(model), []).append(reader.submit(self._fill, leaf, param, slot))
        reader.submit(lambda: (self.close(), _READERS.discard(reader)))
        reader.shutdown(wait=False)

    def _fill(self, leaf, param: str, slot: Future) -> None:
        if self._error is not None:
            raise self._error
        try:
            variable, read = slot.result()
            value = read()
            value = value.reshape(_loaded_shape(leaf, value.shape))
            tensor = _to_keras(leaf, param, value, leaf.dtype_policy.variable_dtype)
            variable.assign(tensor)  # the empty variable adopts the tensor (no copy)
        except BaseException as error:
            self._error = error
            raise

    def close(self) -> None:
        for file in self._files:
            file.close()

    def done(self, model=None) -> bool:
        """Whether the tensors of `model` (or all) have been read, or the reading has stopped."""
        return all(task.done() for task in self._tasks_of(model))

    def wait(self, model=None) -> None:
        """Blocks until `model`'s variables (all, for None) hold their tensors; raises the reading's error."""
        for task in self._tasks_of(model):
            task.result()

    def _tasks_of(self, model) -> list[Future]:
        return [t for tasks in self._tasks.values() for t in tasks] if model is None else self._tasks.get(id(model), [])


@contextlib.contextmanager
def filled_on_build(parts: list[tuple[keras.Model, Getter, str]], files=()) -> Iterator[Filling]:
    """Inside the block, building an unbuilt model of `parts` creates every variable for its checkpoint tensor.

    Each part is (model, get, where): `get(name)` returns (file key, file shape, read) or raises KeyError,
    `read()` gives the tensor; `where` names the file in errors. The builder checks each key and shape
    from the file's header and makes each variable empty; after the block, the `Filling` it yields fills
    them in the background (no zero fill, no second copy) and closes `files` when done. An error in the
    block (a missing or misshaped tensor, an unbuilt layer) closes the files before any tensor is read.
    """
    filling = Filling(files)
    plan = []
    try:
        for model, get, where in parts:
            for name, leaf in leaf_layers(model).items():
                for param in _params(leaf):
                    full, slot = f"{name}.{param}", Future()  # the builder hands the variable over in `slot`
                    plan.append((model, leaf, param, full, slot))
                    for attr in INITIALIZERS[param]:
                        if hasattr(leaf, attr):
                            setattr(leaf, attr, _initializer(leaf, param, full, get, where, slot))
        with tf.variable_creator_scope(_empty_variables):
            yield filling
        unmade = [full for *_, full, slot in plan if not slot.done()]  # a layer left unbuilt, say
        if unmade:
            raise RuntimeError(f"variables not made for their tensors by the build call: {unmade[:3]}")
    except BaseException:
        filling.close()
        raise
    finally:
        for _, leaf, param, *_ in plan:  # drop the references to the getters and slots
            for attr in INITIALIZERS[param]:
                if hasattr(leaf, attr):
                    setattr(leaf, attr, keras.initializers.Zeros())
    filling._start(plan)


def _params(leaf) -> tuple[str, ...]:
    """The checkpoint tensors of a leaf: its weight, and its bias where it has one (an Embedding has none)."""
    return tuple(p for p, attrs in INITIALIZERS.items() if any(hasattr(leaf, a) for a in attrs)
                 and (p == "weight" or getattr(leaf, "use_bias", True)))


def _loaded_shape(leaf, shape) -> tuple:
    """A file shape as it loads: 1x1 conv checkpoints (SD 1.x proj_in, VAE q/k/v) load into a Dense."""
    shape = tuple(shape)
    return shape[:2] if isinstance(leaf, keras.layers.Dense) and len(shape) == 4 and shape[2:] == (1, 1) else shape


class _Empty(NamedTuple):
    """What an initializer gives inside `filled_on_build`: make the variable empty, hand (it, read) to `slot`."""

    shape: tuple
    read: Callable[[], np.ndarray]
    slot: Future


def _empty_variables(next_creator, **kwargs):
    """Variable creator: an empty (uninitialized) variable for a checkpoint tensor, others as usual."""
    value = kwargs["initial_value"]
    value = value() if callable(value) else value
    if not isinstance(value, _Empty):
        return next_creator(**{**kwargs, "initial_value": value})
    variable = UninitializedVariable(shape=value.shape, dtype=kwargs.get("dtype"), name=kwargs.get("name"),
                                     trainable=kwargs.get("trainable"))
    value.slot.set_result((variable, value.read))
    return variable


def _initializer(leaf, param: str, full: str, get: Getter, where: str, slot: Future):
    def initialize(shape, dtype=None):
        try:
            key, raw_shape, read = get(full)
        except KeyError as missing:
            raise CheckpointError(f"{where}: missing tensor {missing.args[0]}") from None
        expected = _torch_shape(leaf, param, shape)
        if _loaded_shape(leaf, raw_shape) != expected:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(raw_shape)}, expected {expected}")
        return _Empty(tuple(shape), read, slot)
    return initialize
