"""Textual-inversion embeddings (Gal et al. 2022) in the files people share, read without running any pickle.

- AUTOMATIC1111 `.pt`: a pickled dict whose `string_to_param` holds one (n, D) tensor (read by the restricted
  unpickler of `weights.formats`, which rebuilds tensors and refuses everything else);
- AUTOMATIC1111 `.safetensors`: `emb_params` (n, D);
- diffusers `learned_embeds.bin` / `.safetensors`: one tensor, (D,) or (n, D), under the token's name.

An embedding is used A1111's way: where the tokens of its name appear in a prompt, its n vectors take the place
of the token embeddings (the tokenizer is not changed).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import CheckpointError, UnsupportedModelError
from .recipe import model_name
from .weights.formats import open_checkpoint

MAX_VECTORS = 75  # an embedding must fit in one chunk
SUFFIXES = (".pt", ".safetensors", ".bin")


def read_embedding(path: str | os.PathLike, width: int) -> np.ndarray:
    """The vectors (n, width) float32 of an embedding file; CheckpointError naming the file otherwise."""
    path = os.fspath(path)
    with open_checkpoint(path) as file:
        keys = file.keys()
        if any(k in keys for k in ("clip_l", "clip_g")):
            raise UnsupportedModelError(f"{path}: an SDXL embedding (clip_l / clip_g); this version loads SD 1.x "
                                        "and 2.x embeddings")
        params = [k for k in keys if k.startswith("string_to_param.")]
        if "emb_params" in keys:
            key = "emb_params"
        elif params:
            if len(params) != 1:
                raise CheckpointError(f"{path}: {len(params)} tensors in string_to_param, expected one")
            key = params[0]
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise CheckpointError(f"{path}: not an embedding file (expected emb_params, string_to_param or one "
                                  f"tensor; found {len(keys)} tensors, e.g. {keys[0] if keys else 'none'})")
        vectors = np.asarray(file.get(key), dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise CheckpointError(f"{path}: tensor {key} has shape {tuple(vectors.shape)}, expected (n, {width}) "
                              f"for this model's text encoder (an embedding for another model family?)")
    if not 1 <= len(vectors) <= MAX_VECTORS:
        raise CheckpointError(f"{path}: {len(vectors)} vectors; an embedding has 1 to {MAX_VECTORS}")
    if not np.all(np.isfinite(vectors)):
        raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")
    return vectors


def embedding_name(path: str | os.PathLike) -> str:
    """The name a prompt uses for an embedding file: its file name without the extension, as A1111 names it."""
    return model_name(path)
