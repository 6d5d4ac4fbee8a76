"""Turn a `source` (None, a local file or folder, or a Hub repo id) into a local path, downloading if needed."""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

from .errors import CheckpointError, DownloadError

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_FILE = "v1-5-pruned-emaonly.safetensors"
# What a diffusers-layout repo needs; the tokenizer ships with this package.
FOLDER_PATTERNS = ["*/config.json", "model_index.json", "scheduler/scheduler_config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]  # the last: SDXL's
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEMO = "demo"  # the name of the small model shipped in this package (trained by `sd-train`, see the README)
DEMO_PATH = os.path.join(os.path.dirname(__file__), "data", "demo.safetensors")
CONNECT_TIMEOUT = 5.0  # seconds to reach the Hub before giving up (huggingface_hub itself retries for ~25 s)


def looks_like_repo_id(source: str) -> bool:
    """Whether a path that does not exist can be a Hub repo id ("owner/name", not a checkpoint file name)."""
    return re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", source) is not None and \
        not source.lower().endswith(CHECKPOINT_SUFFIXES)


def resolve(source: str | os.PathLike | None) -> str:
    """A local path for `source`; None means the SD 1.5 single file from the Hub, cached by huggingface_hub,
    and "demo" the demo model shipped in this package (unless a file or folder of that name is here).

    A Hub model already in the cache is used without going online. Otherwise the Hub must answer within
    CONNECT_TIMEOUT seconds, so that a machine without network gets its answer at once.
    """
    if source is not None:
        path = os.path.expanduser(os.fspath(source))
        if os.path.exists(path):
            return path
        if path == DEMO:
            return demo_path()
        if not looks_like_repo_id(path):
            raise CheckpointError(f"{path}: no such file or directory")
    import huggingface_hub
    from huggingface_hub import constants

    what = f"{DEFAULT_REPO}/{DEFAULT_FILE}" if source is None else os.fspath(source)

    def download(**kwargs) -> str:
        if source is None:
            return huggingface_hub.hf_hub_download(DEFAULT_REPO, DEFAULT_FILE, **kwargs)
        return huggingface_hub.snapshot_download(os.fspath(source), allow_patterns=FOLDER_PATTERNS, **kwargs)

    try:
        return download(local_files_only=True)
    except Exception:  # not in the cache (or only part of it)
        pass
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    if reason is None:
        try:
            return download()
        except Exception as e:  # unknown repo, gated, disk full: all end the same way for the user
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DownloadError(
        f"could not download {what} from the Hugging Face Hub ({reason}); pass a local checkpoint instead, "
        "e.g. --weights path/to/model.safetensors (a .safetensors/.ckpt file or a diffusers folder)", reason
    ) from None


def _unreachable(endpoint: str) -> str | None:
    """Why the Hub's host cannot be reached (no network, no DNS, a firewall), or None when it answers."""
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as e:
        return f"cannot reach {host}: {e.strerror or e}"


def demo_path() -> str:
    """The shipped demo model's file."""
    if not os.path.isfile(DEMO_PATH):
        raise CheckpointError(f"{DEMO_PATH}: the demo model is missing from this installation; "
                              "make it with `python train.py --output stable_diffusion_tf/data/demo.safetensors`")
    return DEMO_PATH


def find_files(folder: str | None, suffixes: tuple[str, ...], folders: bool = False) -> dict[str, str]:
    """Relative name -> path of the files with these suffixes in `folder` and below (and, with `folders`, the
    diffusers folders: those holding model_index.json); sorted by name."""
    found = {}
    if folder is None:
        return found
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if folders and "model_index.json" in files and root != folder:
            found[os.path.relpath(root, folder)] = root
            dirs.clear()
            continue
        for name in sorted(files):
            if name.lower().endswith(suffixes):
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = path
    return dict(sorted(found.items()))
