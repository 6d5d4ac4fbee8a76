"""Textual-inversion embeddings (Gal et al. 2022) in the files people share, read without running any pickle.

- AUTOMATIC1111 `.pt`: a pickled dict whose `string_to_param` holds one (n, D) tensor (read by the restricted
  unpickler of `weights.formats`, which rebuilds tensors and refuses everything else);
- AUTOMATIC1111 `.safetensors`: `emb_params` (n, D);
- diffusers `learned_embeds.bin` / `.safetensors`: one tensor, (D,) or (n, D), under the token's name;
- SDXL (A1111, diffusers, civitai): `clip_l` (n, 768) and `clip_g` (n, 1280), one per text encoder.

An embedding is used A1111's way: where the tokens of its name appear in a prompt, its n vectors take the place
of the token embeddings (the tokenizer is not changed).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import CheckpointError, UnsupportedModelError
from .hub import find_files
from .recipe import model_name
from .weights.formats import open_checkpoint

MAX_VECTORS = 75  # an embedding must fit in one chunk
SUFFIXES = (".pt", ".safetensors", ".bin")


XL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's tensors, for CLIP ViT-L and OpenCLIP bigG


def read_embedding(path: str | os.PathLike, widths: tuple[int, ...], xl_keys: tuple[str, ...] = ()) \
        -> tuple[np.ndarray, ...]:
    """The vectors of an embedding file, one (n, width) float32 array per text encoder of the model: an SD 1.x / 2.x
    file's one tensor, or (SDXL models, `xl_keys` the tensors its encoders read) the file's `clip_l` / `clip_g`.
    CheckpointError naming the file otherwise."""
    path = os.fspath(path)
    with open_checkpoint(path) as file:
        keys = file.keys()
        xl = any(k in keys for k in XL_KEYS)
        if xl != bool(xl_keys):
            if xl:
                raise UnsupportedModelError(f"{path}: an SDXL embedding (clip_l / clip_g); this model is not SDXL")
            raise CheckpointError(f"{path}: an SD 1.x / 2.x embedding; an SDXL model needs one with clip_l and "
                                  "clip_g tensors")
        if xl:
            missing = [k for k in xl_keys if k not in keys]
            if missing:
                raise CheckpointError(f"{path}: an SDXL embedding without {missing[0]}")
            out = tuple(_vectors(path, k, np.asarray(file.get(k), dtype=np.float32), w)
                        for k, w in zip(xl_keys, widths))
            if len({len(v) for v in out}) != 1:
                raise CheckpointError(f"{path}: {' and '.join(xl_keys)} have different vector counts")
            return out
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
        return (_vectors(path, key, np.asarray(file.get(key), dtype=np.float32), widths[0]),)


def _vectors(path: str, key: str, vectors: np.ndarray, width: int) -> np.ndarray:
    """A tensor checked as an embedding's (n, width) vectors."""
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


def embedding_files(folder: str | os.PathLike | None) -> dict[str, str]:
    """Name -> path of the embedding files in `folder` and below, by the names prompts use (`embedding_name`);
    where two files share a name, the last in path order is taken. Empty for None."""
    return {embedding_name(p): p for p in find_files(folder, SUFFIXES).values()}
