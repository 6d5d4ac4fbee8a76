"""Stable Diffusion (latent diffusion, Rombach et al. 2022) in Keras 3."""

from .config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import (CheckpointError, InputError, OutputError, StableDiffusionError, StableDiffusionWarning,
                     UnsupportedModelError)

__all__ = ["StableDiffusion", "ModelConfig", "CLIPConfig", "UNetConfig", "VAEConfig", "StableDiffusionError",
           "StableDiffusionWarning", "CheckpointError", "UnsupportedModelError", "InputError", "OutputError"]


def __getattr__(name: str):
    """Imports the pipeline (and TensorFlow) on first use, so `text2image --help` and flag errors are instant."""
    if name == "StableDiffusion":
        from .pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
