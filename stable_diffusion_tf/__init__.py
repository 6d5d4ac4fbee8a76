"""Stable Diffusion (latent diffusion, Rombach et al. 2022) in Keras 3."""

from .config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, InputError, StableDiffusionError, UnsupportedModelError
from .pipeline import StableDiffusion

__all__ = ["StableDiffusion", "ModelConfig", "CLIPConfig", "UNetConfig", "VAEConfig",
           "StableDiffusionError", "CheckpointError", "UnsupportedModelError", "InputError"]
