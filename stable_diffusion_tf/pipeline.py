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
from .images import load_image, load_image_and_mask
from .samplers import SAMPLERS, add_noise, initial_latent, inpaint_blend, sample
from .schedules import SchedulerConfig, make_schedule
from .tokenizer import CLIPTokenizer
from .vae import tiled_decode
from .weights.load import Models, build_vae, load, load_vae

PRECISIONS = {"float32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# Keras dtype policy of the networks: in reduced precision the weights themselves are held in 16 bits (half the
# memory, no cast per call); norms, softmax and the sampler math stay float32 (layers.py).
WEIGHT_POLICIES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "lms": "LMS", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "unipc": "UniPC"}
TILED_ABOVE = 96  # latent side above which the VAE decodes in tiles
MAX_SEED = 2**32 - 1
MAX_SIZE = 2048
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
        self._models = models
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=self.config.text_encoder.max_position_embeddings,
                                                    pad_token_id=self.config.pad_token_id)
        self.precision = precision
        self.jit_compile = jit_compile
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.source = source
        self._model_hash: str | None = None
        self._compiled: dict[str, object] = {}
        self._vae32 = None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, precision: str = "float32",
                        jit_compile: bool = False, config: ModelConfig | None = None,
                        prediction_type: str | None = None) -> "StableDiffusion":
        """Loads a .safetensors/.ckpt single file, a diffusers folder, or a Hub repo id (None: SD 1.5).

        `prediction_type` ("epsilon" or "v_prediction") overrides what the files say, as diffusers'
        from_single_file does; without it a folder's scheduler config decides, and a single file is
        taken as v-prediction if SD 2.x (diffusers' default: the 768 models), epsilon otherwise.

        It returns once the networks are built and every key and shape has been checked against the files;
        the tensors are then read in the background, and the first use of each network waits for its own
        (a read error is raised there, as a CheckpointError).
        """
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction_type {prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
        path = resolve(source)
        models = load(path, config=config, dtype=WEIGHT_POLICIES[PRECISIONS[precision]], background=True)
        scheduler = SchedulerConfig(prediction_type="v_prediction" if models.config.family == "sd2" else "epsilon")
        scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler_file):
            with open(scheduler_file, encoding="utf-8") as f:
                scheduler = SchedulerConfig.from_diffusers(json.load(f))
        if prediction_type is not None:
            scheduler = dataclasses.replace(scheduler, prediction_type=prediction_type)
        return cls(models, precision=PRECISIONS[precision], jit_compile=jit_compile,
                   scheduler_config=scheduler, source=path)

    # -- the networks: from_pretrained returns while their tensors are still read; each waits for its own ----

    @property
    def text_encoder(self):
        return self._ready(self._models.text_encoder)

    @property
    def unet(self):
        return self._ready(self._models.unet)

    @property
    def vae(self):
        return self._ready(self._models.vae)

    def _ready(self, network):
        self._models.wait(network)
        return network

    # -- the building blocks -------------------------------------------------------------------------------

    def encode_prompt(self, prompts: str | list[str]) -> np.ndarray:
        """Prompts -> text-encoder last hidden state (B, 77, width)."""
        ids = self.tokenizer(prompts)
        return np.asarray(ops.convert_to_numpy(self.text_encoder(ids)), dtype=np.float32)

    def predict_noise(self, latents, timesteps, context) -> np.ndarray:
        """UNet output (epsilon, or v for v-prediction models) for latents (B, h, w, 4), timesteps (int or (B,))
        and text context (B, 77, width)."""
        latents = np.asarray(latents, dtype=np.float32)
        timesteps = np.broadcast_to(np.asarray(timesteps, dtype=np.float32), (latents.shape[0],))
        return self._unet(latents, np.ascontiguousarray(timesteps), np.asarray(context, dtype=np.float32))

    def decode_latents(self, latents, tiled: bool | None = None) -> np.ndarray:
        """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) float32 in [0, 1].

        Latents wider or taller than TILED_ABOVE (images over 768 px) decode in blended tiles
        (`vae.tiled_decode`) unless `tiled` says otherwise. A reduced-precision decode that
        overflows to NaN/inf is redone in float32, so it never comes back black.
        """
        latents = np.asarray(latents, dtype=np.float32) / self.config.vae.scaling_factor
        tiled = max(latents.shape[1:3]) > TILED_ABOVE if tiled is None else tiled
        images = self._decode("decode", self.vae, latents, tiled)
        if self.precision != "float32" and not np.isfinite(images).all():
            images = self._decode("decode_float32", self._float32_vae(), latents, tiled)
        return np.clip(images / 2 + 0.5, 0.0, 1.0)

    def _decode(self, key: str, vae, latents: np.ndarray, tiled: bool) -> np.ndarray:
        fn = self._compile(key, lambda z: ops.cast(vae.decode(z), "float32"), jit_compile=False)
        decode = lambda z: fn(z).numpy()  # noqa: E731
        return tiled_decode(decode, latents) if tiled else decode(latents)

    def _compile(self, key: str, fn, jit_compile: bool):
        """`fn` as one tf.function, traced once per input shape (static shapes), kept under `key`.

        XLA (`jit_compile`) is offered for the UNet only: on CPU it runs the VAE's large convolutions
        slower than TensorFlow's oneDNN kernels (benchmarks/benchmark.py measures both).
        """
        if key not in self._compiled:
            import tensorflow as tf

            self._compiled[key] = tf.function(fn, jit_compile=jit_compile)
        return self._compiled[key]

    def _float32_vae(self):
        """A float32 VAE (built on first use) for decodes that overflow in reduced precision.

        Its weights are read again from the checkpoint, so that the retry decodes as the float32 model
        does; a pipeline built without a file copies (widens) the 16-bit weights instead.
        """
        if self._vae32 is None:
            if self.source is not None:
                self._vae32 = load_vae(self.source, self.config.vae, "float32")
            else:
                self._vae32 = build_vae(self.config.vae, "float32")
                self._vae32.set_weights(self.vae.get_weights())  # same class and config: same variable order
        return self._vae32

    def encode_image(self, images) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> posterior mean times the scaling factor (B, H/8, W/8, 4)."""
        images = np.asarray(images, dtype=np.float32) * 2 - 1
        mean, _ = self._encode(images)
        return mean * np.float32(self.config.vae.scaling_factor)

    def _encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, H, W, 3) in [-1, 1] -> the VAE posterior's mean and log-variance, float32."""
        encode = self._compile("encode", lambda x: [ops.cast(t, "float32") for t in self.vae.encode(x)], False)
        mean, logvar = encode(np.asarray(images, dtype=np.float32))
        return mean.numpy(), logvar.numpy()

    def _unet(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray) -> np.ndarray:
        """The UNet as one compiled call, traced once per input shape (static shapes; XLA with jit_compile)."""
        unet = self._models.unet
        fn = self._compile("unet", lambda x, t, c: ops.cast(unet(x, t, c), "float32"), self.jit_compile)
        if not self._models.loaded(unet):
            fn.get_concrete_function(latents, timesteps, context)  # traces while the weights are still read
        self._ready(unet)
        return fn(latents, timesteps, context).numpy()

    # -- generation ----------------------------------------------------------------------------------------

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                      batch_size: int = 1, latents=None, output_type: str = "pil",
                      callback: Callable[[int, int, np.ndarray], None] | None = None) -> GenerationResult:
        """Generates images from text (Rombach et al. 2022), matching diffusers' StableDiffusionPipeline.

        height and width default to the model's `default_size`.
        """
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        prompts, negatives = _prompt_lists(prompt, negative_prompt, batch_size)
        _check_generation(height, width, num_inference_steps, guidance_scale, sampler, output_type)
        self._check_regular_unet()
        seeds = _seeds(seed, len(prompts))
        generators = noise_generators(seeds)
        shape = (height // 8, width // 8, self.config.unet.out_channels)
        noise = _initial_noise(latents, generators, shape)
        schedule = make_schedule(sampler, num_inference_steps, self.scheduler_config)
        denoise = self._denoiser(prompts, negatives, guidance_scale)
        x0 = sample(sampler, denoise, initial_latent(noise, schedule), schedule,
                    noise=lambda i: draw(generators, shape), callback=callback)
        recipe = dict(steps=num_inference_steps, sampler=sampler, scale=guidance_scale, size=(width, height))
        return self._finish(x0, prompts, negatives, seeds, recipe, output_type)

    def _finish(self, x0: np.ndarray, prompts: list[str], negatives: list[str], seeds: list[int], recipe: dict,
                output_type: str, paste_back=None) -> GenerationResult:
        """Checks the final latents, decodes them and writes each image's recipe; `paste_back(images)` composites."""
        if not np.all(np.isfinite(x0)):
            raise StableDiffusionError("the generation produced NaN or infinite latents (try precision float32)")
        images = self.decode_latents(x0)
        if paste_back is not None:
            images = paste_back(images)
        parameters = [self.recipe(p, n, seed=s, **recipe) for p, n, s in zip(prompts, negatives, seeds)]
        return GenerationResult(_to_output(images, output_type), seeds, parameters)

    @property
    def default_size(self) -> int:
        """The side the model was trained at: 768 for SD 2.x v-prediction models, 512 otherwise."""
        v_prediction = self.scheduler_config.prediction_type == "v_prediction"
        return 768 if self.config.family == "sd2" and v_prediction else 512

    def _denoiser(self, prompts: list[str], negatives: list[str], guidance_scale: float, extra_channels=None):
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negatives) if guidance_scale > 1.0 else None  # diffusers: CFG only above 1
        return make_denoiser(self._unet, cond, uncond, guidance_scale, self.scheduler_config.prediction_type,
                             extra_channels)

    def image_to_image(self, prompt: str | list[str], image, strength: float = 0.75,
                       negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                       guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                       batch_size: int = 1, output_type: str = "pil",
                       callback: Callable[[int, int, np.ndarray], None] | None = None) -> GenerationResult:
        """Redraws an image from its latents noised to `strength` (SDEdit, Meng et al. 2022), matching diffusers'
        StableDiffusionImg2ImgPipeline: 0 gives back the VAE round trip, 1 a new image.

        `image` is a path, a PIL image or an array (see `images.py`); its sides are rounded down to multiples of 8.
        """
        self._check_regular_unet()
        return self._from_image(load_image(image), None, prompt=prompt, negative_prompt=negative_prompt,
                                strength=strength, steps=num_inference_steps, guidance_scale=guidance_scale,
                                sampler=sampler, seed=seed, batch_size=batch_size, output_type=output_type,
                                callback=callback)

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None, batch_size: int = 1,
                latents=None, mask_blur: float = 0, keep_unmasked: bool = True, output_type: str = "pil",
                callback: Callable[[int, int, np.ndarray], None] | None = None) -> GenerationResult:
        """Repaints where `mask` is white (grey: partly), matching diffusers' StableDiffusionInpaintPipeline.

        An inpainting UNet (9 input channels) also sees the mask and the masked image's latents; a regular one
        has the kept region's latents put back after every step. `mask_blur` feathers the mask (pixels, as
        AUTOMATIC1111); `keep_unmasked` pastes the input back by the mask, exactly where it is black.
        """
        if not isinstance(keep_unmasked, bool):
            raise InputError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
        pixels, mask = load_image_and_mask(image, mask, mask_blur)
        return self._from_image(pixels, mask, prompt=prompt, negative_prompt=negative_prompt, strength=strength,
                                steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                                batch_size=batch_size, output_type=output_type, callback=callback, latents=latents,
                                keep_unmasked=keep_unmasked, fields=(f"Mask blur: {mask_blur:g}",))

    def _from_image(self, pixels: np.ndarray, mask: np.ndarray | None, *, prompt, negative_prompt, strength, steps,
                    guidance_scale, sampler, seed, batch_size, output_type, callback, latents=None,
                    keep_unmasked: bool = False, fields: tuple[str, ...] = ()) -> GenerationResult:
        """image_to_image (mask None) and inpaint, step by step as diffusers' pipelines.

        Each image's generator draws, in order: the initial noise, the VAE posterior noise of the image, that of
        the masked image (inpainting UNets), then euler_a's per-step noise. Latents are VAE posterior samples, as
        diffusers' `latent_dist.sample(generator)`, not the mean.
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt, batch_size)
        height, width = pixels.shape[:2]
        _check_generation(height, width, steps, guidance_scale, sampler, output_type)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise InputError(f"strength must be a number between 0 and 1, got {strength!r}")
        seeds = _seeds(seed, len(prompts))
        generators = noise_generators(seeds)
        shape = (height // 8, width // 8, self.config.vae.latent_channels)
        noise = _initial_noise(latents, generators, shape)
        image = pixels[None] * 2 - 1
        image_latents = self._posterior_sample(image, draw(generators, shape))
        extra_channels = blend = None
        if mask is not None and self.config.unet.in_channels > shape[-1]:  # inpainting UNet: + mask + masked image
            # diffusers binarises the mask at 0.5 for both, and downsamples it nearest-neighbour (every 8th pixel)
            masked = self._posterior_sample(image * (mask[None, ..., None] < 0.5), draw(generators, shape))
            repaint = np.broadcast_to((mask >= 0.5)[None, ::8, ::8, None], (len(prompts), *shape[:2], 1))
            extra_channels = np.concatenate([repaint, masked], axis=-1).astype(np.float32)
        schedule = make_schedule(sampler, steps, self.scheduler_config)
        if mask is not None and extra_channels is None:  # diffusers' nearest downsampling of the mask
            blend = inpaint_blend(image_latents, noise, 1 - mask[::8, ::8, None], schedule)
        t_start = steps - min(int(steps * strength), steps)  # diffusers' get_timesteps
        x0 = image_latents
        if t_start < steps:
            # diffusers' inpainting starts from pure noise at strength 1; img2img noises the image latents
            x = initial_latent(noise, schedule) if mask is not None and strength == 1 else \
                add_noise(image_latents, noise, schedule, t_start)
            denoise = self._denoiser(prompts, negatives, guidance_scale, extra_channels)
            x0 = sample(sampler, denoise, x, schedule, noise=lambda i: draw(generators, shape), callback=callback,
                        start_index=t_start, blend=blend)
        recipe = dict(steps=steps, sampler=sampler, scale=guidance_scale, size=(width, height),
                      extra=(f"Denoising strength: {strength:g}", *fields))
        paste_back = None
        if mask is not None and keep_unmasked:
            paste_back = lambda images: pixels * (1 - mask[..., None]) + images * mask[..., None]  # noqa: E731
        return self._finish(x0, prompts, negatives, seeds, recipe, output_type, paste_back)

    def _check_regular_unet(self) -> None:
        if self.config.unet.in_channels != self.config.vae.latent_channels:
            raise InputError("this is an inpainting checkpoint (9-channel UNet): it only inpaints; use inpaint")

    def _posterior_sample(self, images: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Images (1, H, W, 3) in [-1, 1] -> (mean + std * eps) * scaling factor for eps (B, H/8, W/8, C):
        diffusers' `vae.encode(images).latent_dist.sample(generator)` with each image's noise."""
        mean, logvar = self._encode(images)
        return (mean + np.exp(0.5 * logvar) * eps) * np.float32(self.config.vae.scaling_factor)

    def recipe(self, prompt: str, negative_prompt: str, steps: int, sampler: str, scale: float, seed: int,
               size: tuple[int, int], extra: tuple[str, ...] = ()) -> str:
        """The AUTOMATIC1111 `parameters` text that lets a person regenerate an image (`extra`: more fields)."""
        lines = [prompt]
        if negative_prompt:
            lines.append(f"Negative prompt: {negative_prompt}")
        fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_LABELS[sampler]}", f"CFG scale: {scale:g}", f"Seed: {seed}",
                  f"Size: {size[0]}x{size[1]}"]
        if self.source:
            fields += [f"Model hash: {self.model_hash}",
                       f"Model: {os.path.splitext(os.path.basename(os.path.normpath(self.source)))[0]}"]
        return "\n".join(lines + [", ".join(fields + list(extra))])

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


def _initial_noise(latents, generators: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Each image's first draw, or the given `latents` (B, h, w, C) in its place (the draw still happens)."""
    noise = draw(generators, shape)
    if latents is None:
        return noise
    given = np.asarray(latents, dtype=np.float32)
    if given.shape != noise.shape or not np.all(np.isfinite(given)):
        raise InputError(f"latents must be finite and shaped {noise.shape}, got shape {given.shape}")
    return given


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
