"""Latents -> pictures: the VAE decode as one compiled call, tiled for large images, safe in reduced precision."""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
from keras import ops

from .vae import AutoencoderKL, tiled_decode

TILED_ABOVE = 96  # latent side above which the VAE decodes in tiles (images over 768 px)


class ImageDecoder:
    """Scaled latents (B, h, w, C) -> images (B, 8h, 8w, 3) float32 in [0, 1].

    Latents wider or taller than TILED_ABOVE decode in blended tiles (`vae.tiled_decode`) unless told
    otherwise. A reduced-precision decode that overflows to NaN/inf is redone by `float32_vae()`, a
    float32 copy of the VAE made on first need, so an image never comes back black.
    """

    def __init__(self, vae: AutoencoderKL, scaling_factor: float,
                 float32_vae: Callable[[], AutoencoderKL] | None = None):
        self.vae, self.scaling_factor, self._make_float32 = vae, scaling_factor, float32_vae
        self._steps: dict[int, Callable] = {}
        self._vae32: AutoencoderKL | None = None

    def __call__(self, latents, tiled: bool | None = None) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32) / np.float32(self.scaling_factor)
        tiled = max(latents.shape[1:3]) > TILED_ABOVE if tiled is None else tiled
        images = self._decode(self.vae, latents, tiled)
        if not np.isfinite(images).all() and self.float32_vae() is not None:
            images = self._decode(self._vae32, latents, tiled)
        return np.clip(images / 2 + 0.5, 0.0, 1.0)

    def float32_vae(self) -> AutoencoderKL | None:
        """The float32 copy of a reduced-precision VAE, made on first need (also for encodes that overflow, as SDXL's
        VAE does in float16); None for a float32 VAE or without a maker."""
        if self.vae.compute_dtype == "float32" or self._make_float32 is None:
            return None
        if self._vae32 is None:
            self._vae32 = self._make_float32()
        return self._vae32

    def _decode(self, vae: AutoencoderKL, latents: np.ndarray, tiled: bool) -> np.ndarray:
        if id(vae) not in self._steps:  # XLA is not offered: on CPU it runs the VAE's large convolutions slower
            self._steps[id(vae)] = tf.function(lambda z: ops.cast(vae.decode(z), "float32"), autograph=False)
        step = self._steps[id(vae)]
        decode = lambda z: step(z).numpy()  # noqa: E731
        return tiled_decode(decode, latents) if tiled else decode(latents)
