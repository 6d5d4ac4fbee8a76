"""Typed errors raised by the library; the CLIs turn them into one line and exit code 2."""


class StableDiffusionError(Exception):
    """Base class of every error this package raises on bad input."""


class CheckpointError(StableDiffusionError, ValueError):
    """A checkpoint file or folder that cannot be loaded (corrupt, hostile, wrong family, missing tensor)."""


class DownloadError(CheckpointError):
    """A model that is neither in the Hugging Face cache nor downloadable now; `reason` says why, in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class UnsupportedModelError(CheckpointError):
    """A valid checkpoint of a model family this version does not load (e.g. SDXL)."""


class InputError(StableDiffusionError, ValueError):
    """A bad argument: size, steps, guidance scale, prompt, image, output path."""


class OutputError(StableDiffusionError):
    """An output file that cannot be written (bad path, existing file, full disk, read-only directory)."""


class StableDiffusionWarning(UserWarning):
    """Something the user should know that does not stop the work (a prompt cut to 77 tokens, ignored tensors)."""
