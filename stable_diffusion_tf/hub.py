"""Turn a `source` (None, a local file or folder, or a Hub repo id) into a local path, downloading if needed."""

from __future__ import annotations

import os
import re

from .errors import CheckpointError

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_FILE = "v1-5-pruned-emaonly.safetensors"
# What a diffusers-layout repo needs; the tokenizer ships with this package.
FOLDER_PATTERNS = ["*/config.json", "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def looks_like_repo_id(source: str) -> bool:
    """Whether a path that does not exist can be a Hub repo id ("owner/name", not a checkpoint file name)."""
    return re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", source) is not None and \
        not source.lower().endswith(CHECKPOINT_SUFFIXES)


def resolve(source: str | os.PathLike | None) -> str:
    """A local path for `source`; None means the SD 1.5 single file from the Hub, cached by huggingface_hub."""
    if source is not None:
        path = os.path.expanduser(os.fspath(source))
        if os.path.exists(path):
            return path
        if not looks_like_repo_id(path):
            raise CheckpointError(f"{path}: no such file or directory")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is not installed; pass a local checkpoint file") from None
    try:
        if source is None:
            return huggingface_hub.hf_hub_download(DEFAULT_REPO, DEFAULT_FILE)
        return huggingface_hub.snapshot_download(os.fspath(source), allow_patterns=FOLDER_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, disk full: all end the same way for the user
        what = f"{DEFAULT_REPO}/{DEFAULT_FILE}" if source is None else os.fspath(source)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not download {what} from the Hugging Face Hub ({reason}); pass a local checkpoint instead, "
            "e.g. --weights path/to/model.safetensors (a .safetensors/.ckpt file or a diffusers folder)"
        ) from None
