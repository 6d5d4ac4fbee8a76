"""StableDiffusion: the loaded networks and the steps every generation mode is made of."""

from __future__ import annotations

import os

import keras
import numpy as np
from keras import ops

from .config import ModelConfig
from .errors import InputError
from .hub import resolve
from .tokenizer import CLIPTokenizer
from .weights.load import Models, load

PRECISIONS = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


class StableDiffusion:
    """Text encoder, UNet and VAE of one Stable Diffusion model (Rombach et al. 2022) plus the tokenizer."""

    def __init__(self, models: Models, tokenizer: CLIPTokenizer | None = None, precision: str = "float32",
                 jit_compile: bool = False):
        self.config: ModelConfig = models.config
        self.text_encoder, self.unet, self.vae = models.text_encoder, models.unet, models.vae
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=self.config.text_encoder.max_position_embeddings)
        self.precision = precision
        self.jit_compile = jit_compile

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, precision: str = "float32",
                        jit_compile: bool = False, config: ModelConfig | None = None) -> "StableDiffusion":
        """Loads a .safetensors/.ckpt single file, a diffusers folder, or a Hub repo id (None: SD 1.5)."""
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        models = load(resolve(source), config=config, dtype=PRECISIONS[precision])
        return cls(models, precision=PRECISIONS[precision], jit_compile=jit_compile)

    def encode_prompt(self, prompts: str | list[str]) -> np.ndarray:
        """Prompts -> text-encoder last hidden state (B, 77, width)."""
        ids = self.tokenizer(prompts)
        return np.asarray(ops.convert_to_numpy(self.text_encoder(ids)), dtype=np.float32)

    def predict_noise(self, latents, timesteps, context) -> np.ndarray:
        """UNet epsilon for latents (B, h, w, 4), timesteps (int or (B,)) and text context (B, 77, width)."""
        latents = np.asarray(latents, dtype=np.float32)
        timesteps = np.broadcast_to(np.asarray(timesteps, dtype=np.float32), (latents.shape[0],))
        out = self.unet(latents, timesteps, np.asarray(context, dtype=np.float32))
        return np.asarray(ops.convert_to_numpy(out), dtype=np.float32)

    def decode_latents(self, latents) -> np.ndarray:
        """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) float32 in [0, 1]."""
        latents = np.asarray(latents, dtype=np.float32) / self.config.vae.scaling_factor
        images = ops.convert_to_numpy(self.vae.decode(latents)).astype(np.float32)
        return np.clip(images / 2 + 0.5, 0.0, 1.0)

    def encode_image(self, images) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> posterior mean times the scaling factor (B, H/8, W/8, 4)."""
        images = np.asarray(images, dtype=np.float32) * 2 - 1
        mean, _ = self.vae.encode(images)
        return ops.convert_to_numpy(mean).astype(np.float32) * self.config.vae.scaling_factor
