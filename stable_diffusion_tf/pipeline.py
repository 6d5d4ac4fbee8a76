"""StableDiffusion: the loaded networks and the steps every generation mode is made of."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
from typing import Callable

import numpy as np
from keras import ops

from .config import ModelConfig
from .denoiser import make_denoiser
from .errors import InputError, StableDiffusionError
from .hub import resolve
from .samplers import SAMPLERS, initial_latent, sample
from .schedules import SchedulerConfig, make_schedule
from .tokenizer import CLIPTokenizer
from .weights.load import Models, load

PRECISIONS = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "lms": "LMS", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "unipc": "UniPC"}
MAX_SEED = 2**32 - 1
MAX_SIZE = 2048


@dataclasses.dataclass
class GenerationResult:
    """What a generation returns: the images, the seed of each, and each image's recipe text."""

    images: list | np.ndarray
    seeds: list[int]
    parameters: list[str]


def noise_generators(seeds: list[int]) -> list[np.random.Generator]:
    """One documented CPU generator per image: numpy PCG64 seeded with that image's seed."""
    return [np.random.Generator(np.random.PCG64(s)) for s in seeds]


def draw(generators: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise (B, *shape), row i from generator i, so an image never depends on its batch."""
    return np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])


class StableDiffusion:
    """Text encoder, UNet and VAE of one Stable Diffusion model (Rombach et al. 2022) plus the tokenizer."""

    def __init__(self, models: Models, tokenizer: CLIPTokenizer | None = None, precision: str = "float32",
                 jit_compile: bool = False, scheduler_config: SchedulerConfig | None = None,
                 source: str | None = None):
        self.config: ModelConfig = models.config
        self.text_encoder, self.unet, self.vae = models.text_encoder, models.unet, models.vae
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=self.config.text_encoder.max_position_embeddings)
        self.precision = precision
        self.jit_compile = jit_compile
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.source = source
        self._model_hash: str | None = None
        self._unet_fn = None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, precision: str = "float32",
                        jit_compile: bool = False, config: ModelConfig | None = None) -> "StableDiffusion":
        """Loads a .safetensors/.ckpt single file, a diffusers folder, or a Hub repo id (None: SD 1.5)."""
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        path = resolve(source)
        models = load(path, config=config, dtype=PRECISIONS[precision])
        scheduler = SchedulerConfig()
        scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler_file):
            with open(scheduler_file, encoding="utf-8") as f:
                scheduler = SchedulerConfig.from_diffusers(json.load(f))
        return cls(models, precision=PRECISIONS[precision], jit_compile=jit_compile,
                   scheduler_config=scheduler, source=path)

    # -- the building blocks -------------------------------------------------------------------------------

    def encode_prompt(self, prompts: str | list[str]) -> np.ndarray:
        """Prompts -> text-encoder last hidden state (B, 77, width)."""
        ids = self.tokenizer(prompts)
        return np.asarray(ops.convert_to_numpy(self.text_encoder(ids)), dtype=np.float32)

    def predict_noise(self, latents, timesteps, context) -> np.ndarray:
        """UNet epsilon for latents (B, h, w, 4), timesteps (int or (B,)) and text context (B, 77, width)."""
        latents = np.asarray(latents, dtype=np.float32)
        timesteps = np.broadcast_to(np.asarray(timesteps, dtype=np.float32), (latents.shape[0],))
        return self._unet(latents, np.ascontiguousarray(timesteps), np.asarray(context, dtype=np.float32))

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

    def _unet(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray) -> np.ndarray:
        """The UNet as one compiled call, traced once per input shape (static shapes; XLA with jit_compile)."""
        if self._unet_fn is None:
            import tensorflow as tf

            self._unet_fn = tf.function(lambda x, t, c: ops.cast(self.unet(x, t, c), "float32"),
                                        jit_compile=self.jit_compile)
        return self._unet_fn(latents, timesteps, context).numpy()

    # -- generation ----------------------------------------------------------------------------------------

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      height: int = 512, width: int = 512, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                      batch_size: int = 1, latents=None, output_type: str = "pil",
                      callback: Callable[[int, int, np.ndarray], None] | None = None) -> GenerationResult:
        """Generates images from text (Rombach et al. 2022), matching diffusers' StableDiffusionPipeline."""
        prompts, negatives = _prompt_lists(prompt, negative_prompt, batch_size)
        _check_generation(height, width, num_inference_steps, guidance_scale, sampler, output_type)
        seeds = _seeds(seed, len(prompts))
        generators = noise_generators(seeds)
        shape = (height // 8, width // 8, self.config.unet.out_channels)
        if latents is None:
            noise = draw(generators, shape)
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != (len(prompts), *shape):
                raise InputError(f"latents have shape {noise.shape}, expected {(len(prompts), *shape)}")
        schedule = make_schedule(sampler, num_inference_steps, self.scheduler_config)
        denoise = self._denoiser(prompts, negatives, guidance_scale)
        x0 = sample(sampler, denoise, initial_latent(noise, schedule), schedule,
                    noise=lambda i: draw(generators, shape), callback=callback)
        if not np.all(np.isfinite(x0)):
            raise StableDiffusionError("the generation produced NaN or infinite latents (try precision float32)")
        images = self.decode_latents(x0)
        recipe = dict(steps=num_inference_steps, sampler=sampler, scale=guidance_scale, size=(width, height))
        parameters = [self.recipe(p, n, seed=s, **recipe) for p, n, s in zip(prompts, negatives, seeds)]
        return GenerationResult(_to_output(images, output_type), seeds, parameters)

    def _denoiser(self, prompts: list[str], negatives: list[str], guidance_scale: float):
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negatives) if guidance_scale > 1.0 else None  # diffusers: CFG only above 1
        return make_denoiser(self._unet, cond, uncond, guidance_scale, self.scheduler_config.prediction_type)

    def recipe(self, prompt: str, negative_prompt: str, steps: int, sampler: str, scale: float, seed: int,
               size: tuple[int, int]) -> str:
        """The AUTOMATIC1111 `parameters` text that lets a person regenerate an image."""
        lines = [prompt]
        if negative_prompt:
            lines.append(f"Negative prompt: {negative_prompt}")
        fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_LABELS[sampler]}", f"CFG scale: {scale:g}", f"Seed: {seed}",
                  f"Size: {size[0]}x{size[1]}"]
        if self.source:
            fields += [f"Model hash: {self.model_hash}",
                       f"Model: {os.path.splitext(os.path.basename(os.path.normpath(self.source)))[0]}"]
        return "\n".join(lines + [", ".join(fields)])

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash: the first 10 hex digits of the weights file's SHA-256 (computed once)."""
        if self._model_hash is None:
            path = self.source
            if os.path.isdir(path):
                path = next(os.path.join(path, "unet", f) for f in sorted(os.listdir(os.path.join(path, "unet")))
                            if not f.endswith(".json"))
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            self._model_hash = digest.hexdigest()[:10]
        return self._model_hash


def _prompt_lists(prompt, negative_prompt, batch_size: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) \
        else None
    if prompts is None or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise InputError("prompt must be a string or a non-empty list of strings")
    if batch_size != 1 and len(prompts) != batch_size:
        raise InputError(f"{len(prompts)} prompts given for batch_size {batch_size}")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
            raise InputError("negative_prompt must be a string or a list of strings, one per prompt")
    return prompts, negatives


def _check_generation(height, width, steps, guidance_scale, sampler, output_type) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value > MAX_SIZE or value % 8:
            raise InputError(f"{name} must be a multiple of 8 between 8 and {MAX_SIZE}, got {value!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise InputError(f"num_inference_steps must be an integer between 1 and 1000, got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if output_type not in ("pil", "np"):
        raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")


def _seeds(seed: int | None, count: int) -> list[int]:
    """Image i uses seed + i; None picks a random base seed."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1 - count)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - count + 1:
        raise InputError(f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}")
    return [int(seed) + i for i in range(count)]


def _to_output(images: np.ndarray, output_type: str):
    if output_type == "np":
        return images
    from PIL import Image

    return [Image.fromarray(np.round(img * 255).astype(np.uint8)) for img in images]
