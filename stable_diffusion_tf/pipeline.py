"""StableDiffusion: the loaded networks, the public steps (encode the prompt, predict noise, decode), and the
three generation modes as short functions over those steps. Prompts -> conditioning is `conditioning.py`, LoRA
merging `merging.py`: parts of the same class."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf
from keras import ops

from . import checks, precision as precisions
from .conditioning import TextConditioning, subprompts
from .config import REFINER_SWITCH, ModelConfig
from .decoding import ImageDecoder
from .denoiser import make_denoiser, rowwise
from .errors import CheckpointError, InputError, StableDiffusionError, StableDiffusionWarning
from .hub import resolve
from .lora import LoraFile
from .merging import LoraMerging
from .prompts import prompt_schedule
from .images import load_image, load_image_and_mask
from .recipe import infotext, model_hash, model_name, with_recipe
from .samplers import add_noise, initial_latent, inpaint_blend, sample
from .schedules import PREDICTION_TYPES, Schedule, SchedulerConfig, make_schedule
from .tokenizer import CLIPTokenizer
from .vae import AutoencoderKL
from .weights.load import Models, load, load_vae

Callback = Callable[[int, int, np.ndarray], None]
# samplers whose walk cannot stop at a grid step and go on in another model: plms restarts one step back, heun's
# last step of the base would evaluate its correction below the switch (diffusers splits its two calls there)
NO_HAND_OFF = ("plms", "heun")


@dataclasses.dataclass
class GenerationResult:
    """What a generation returns: the images, the seed of each, and each image's recipe text.

    With output_type "pil" each image also holds its recipe (`image.info["parameters"]`) and writes it into
    any PNG it is saved as: `result.images[0].save("out.png")` gives a file AUTOMATIC1111 reads back.
    """

    images: list | np.ndarray
    seeds: list[int]
    parameters: list[str]


def noise_generators(seeds: list[int]) -> list[np.random.Generator]:
    """One documented CPU generator per image: numpy PCG64 seeded with that image's seed."""
    return [np.random.Generator(np.random.PCG64(s)) for s in seeds]


def draw(generators: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise (B, *shape), row i from generator i, so an image never depends on its batch."""
    return np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])


@dataclasses.dataclass
class _Job:
    """One checked generation request: a prompt, a negative prompt, a seed and a noise generator per image."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    generators: list[np.random.Generator]
    latent_shape: tuple[int, int, int]
    schedule: Schedule
    settings: dict  # the recipe's fields: steps, sampler, scale, size
    clip_skip: int = 1
    texts: list[str] | None = None  # the prompts as encoded: without their <lora:...> tags

    def draw(self, step: int | None = None) -> np.ndarray:
        """The next standard normal draw of every image's generator, (B, h, w, C)."""
        return draw(self.generators, self.latent_shape)

    def first_draw(self, latents=None) -> np.ndarray:
        """Each image's first draw, or the given `latents` (B, h, w, C) in its place (the draw still happens)."""
        noise = self.draw()
        if latents is None:
            return noise
        given = np.asarray(latents, dtype=np.float32)
        if given.shape != noise.shape or not np.all(np.isfinite(given)):
            raise InputError(f"latents must be finite and shaped {noise.shape}, got shape {given.shape}")
        return given


class StableDiffusion(TextConditioning, LoraMerging):
    """Text encoder, UNet and VAE of one Stable Diffusion model (Rombach et al. 2022) plus the tokenizer."""

    def __init__(self, models: Models, tokenizer: CLIPTokenizer | None = None, precision: str = "float32",
                 jit_compile: bool = False, scheduler_config: SchedulerConfig | None = None,
                 source: str | None = None):
        self.config: ModelConfig = models.config
        self.text_encoder, self.unet = models.text_encoder, models.unet
        self.text_encoder_2 = models.text_encoder_2  # SDXL's OpenCLIP bigG (the refiner's only text encoder)
        self.tokenizer = tokenizer or CLIPTokenizer(
            max_length=self.config.encoder_configs[0].max_position_embeddings, pad_token_id=self.config.pad_token_id)
        # SDXL: an empty negative prompt is zeros, not the encoded "" (diffusers' force_zeros_for_empty_prompt, which
        # the refiner's model_index.json turns off; A1111 zeros for both)
        self.force_zeros_for_empty_prompt = self.config.family in ("sdxl", "sdxl-inpainting")
        self.precision = precisions.policy(precision)
        self.jit_compile = jit_compile
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.source = source
        self._model_hash: str | None = None
        self._comma_id = self.tokenizer.encode(",")[0]
        # textual-inversion vectors by name (`load_embedding`), one (n, width) array per text encoder
        self.embeddings: dict[str, tuple[np.ndarray, ...]] = {}
        self._embedding_hashes: dict[str, str] = {}  # A1111's short hash of each embedding's file
        self.loras: dict[str, LoraFile] = {}  # LoRA files by name (`load_lora`)
        self._lora_layers: dict | None = None  # (part, layer name) -> the Dense or Conv2D a LoRA may change
        self._lora_backups: dict[tuple[str, str], tf.Tensor] = {}  # base kernels of the layers LoRAs changed
        self._last_refiner: tuple | None = None  # (path key, pipeline) of the last refiner given as a path
        self._active_loras: tuple | None = ()  # (name, te, unet) of the LoRAs merged now; None: unknown
        unet = self.unet
        self._unet_step = tf.function(lambda x, t, c, *added: ops.cast(unet(x, t, c, *added), "float32"),
                                      jit_compile=jit_compile, autograph=False)  # plain Python: no AutoGraph
        self._set_vae(models.vae, source)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, precision: str = "float32",
                        jit_compile: bool = False, config: ModelConfig | None = None,
                        prediction_type: str | None = None, vae: str | os.PathLike | None = None) -> "StableDiffusion":
        """Loads a .safetensors/.ckpt single file, a diffusers folder, a Hub repo id (None: SD 1.5), or "demo" (the
        small model shipped in this package, see `training`).

        `precision`: "float32", "bfloat16" or "float16" (the mixed forms: 16-bit weights, float32 norms and
        sampler math), or "auto": float16 on a GPU, bfloat16 on a CPU that computes it natively, else float32.

        `prediction_type` ("epsilon" or "v_prediction") overrides what the files say, as diffusers'
        from_single_file does; without it a folder's scheduler config decides, and a single file is
        taken as v-prediction if SD 2.x (diffusers' default: the 768 models), epsilon otherwise.
        `vae` loads the VAE from another file or folder (see `use_vae`).
        Loading is strict: every tensor is checked by name and shape before any is read (CheckpointError).
        """
        policy = resolve_precision(precision)
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction_type {prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
        path = resolve(source)
        models = load(path, config=config, dtype=precisions.WEIGHT_DTYPES[policy])
        scheduler = SchedulerConfig.of_model(path, models.config.family,
                                             prediction_type or models.config.prediction_type)
        pipe = cls(models, precision=policy, jit_compile=jit_compile, scheduler_config=scheduler, source=path)
        index = os.path.join(path, "model_index.json")
        if models.config.xl and os.path.isfile(index):  # a diffusers folder's pipeline settings
            try:
                with open(index, encoding="utf-8") as f:
                    zeros = json.load(f).get("force_zeros_for_empty_prompt", pipe.force_zeros_for_empty_prompt)
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{index}: unreadable ({e})") from None
            pipe.force_zeros_for_empty_prompt = zeros is True
        if vae is not None:
            pipe.use_vae(vae)
        return pipe

    def use_vae(self, source: str | os.PathLike) -> None:
        """Swaps in the VAE of another file or folder, as people do (`vae-ft-mse-840000` for SD 1.5, the fp16-fix
        VAE for SDXL): a diffusers VAE folder or file, an original-layout VAE file, or a whole model's VAE
        (`weights.load.load_vae`). It must have this model's architecture; the scaling factor stays the model's."""
        if not isinstance(source, (str, os.PathLike)):
            raise InputError(f"vae must be a path, got {type(source).__name__}")
        source = os.path.expanduser(os.fspath(source))
        if not os.path.exists(source):
            raise CheckpointError(f"VAE {source}: no such file or folder")
        self._set_vae(load_vae(source, self.config.vae, precisions.WEIGHT_DTYPES[self.precision]), source)

    def _set_vae(self, vae: AutoencoderKL, source: str | None) -> None:
        """The VAE and its compiled encode and decode (a new VAE needs new ones: a trace holds its variables)."""
        self.vae, self.vae_source = vae, source
        self._vae_fields: tuple[str, ...] | None = None  # the recipe's VAE fields, when it is a VAE of its own
        self._encode_step = tf.function(lambda x: [ops.cast(t, "float32") for t in vae.encode(x)],
                                        autograph=False)
        self._decoder = ImageDecoder(vae, self.config.vae.scaling_factor, self._float32_vae)

    # -- the steps every mode is made of (keras-hub's encode / denoise / decode steps) -----------------------

    def predict_noise(self, latents, timesteps, context, text_embeds=None, time_ids=None) -> np.ndarray:
        """UNet output (epsilon, or v for v-prediction models) for latents (B, h, w, C), timesteps (int or (B,))
        and text context (B, 77, width), as one compiled call (traced once per input shape; XLA with jit_compile).
        SDXL also takes the pooled text embedding (B, P) and the time ids (B, 6), or (B, 5) for the refiner;
        `context` may be the tuple (context, text_embeds, time_ids) the samplers' conditioning is."""
        if isinstance(context, tuple):
            if len(context) != 3:
                raise InputError("a tuple context must be (context, text_embeds, time_ids)")
            context, text_embeds, time_ids = context
        latents = np.asarray(latents, dtype=np.float32)
        timesteps = np.ascontiguousarray(np.broadcast_to(np.asarray(timesteps, np.float32), (latents.shape[0],)))
        added = [np.asarray(a, dtype=np.float32) for a in (text_embeds, time_ids)] if self.config.xl else []
        if self.config.xl and (text_embeds is None or time_ids is None):
            raise InputError("an SDXL UNet needs text_embeds (the pooled text) and time_ids")
        return self._unet_step(latents, timesteps, np.asarray(context, dtype=np.float32), *added).numpy()

    def prepare(self, height: int | None = None, width: int | None = None, batch_size: int = 1,
                guidance_scale: float = 7.5) -> None:
        """Traces the compiled UNet step for a generation of this size, so that its first step does not."""
        height, width = height or self.default_size, width or self.default_size
        batch = batch_size * (2 if guidance_scale > 1.0 else 1)
        latents = np.zeros((batch, height // 8, width // 8, self.config.unet.in_channels), np.float32)
        context = np.zeros((batch, self.tokenizer.max_length, self.config.unet.cross_attention_dim), np.float32)
        added = []
        if self.config.xl:  # the pooled text and the time ids
            added = [np.zeros((batch, self.config.text_encoder_2.projection_dim), np.float32),
                     np.zeros((batch, self.config.time_ids), np.float32)]
        self._unet_step.get_concrete_function(latents, np.zeros((batch,), np.float32), context, *added)

    def decode_latents(self, latents, tiled: bool | None = None) -> np.ndarray:
        """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) float32 in [0, 1] (see `decoding.ImageDecoder`:
        tiled above 768 px, redone in float32 if a reduced-precision decode overflows)."""
        return self._decoder(latents, tiled)

    def encode_image(self, images) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> posterior mean times the scaling factor (B, H/8, W/8, 4)."""
        mean, _ = self._encode(np.asarray(images, dtype=np.float32) * 2 - 1)
        return mean * np.float32(self.config.vae.scaling_factor)

    def _encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, H, W, 3) in [-1, 1] -> the VAE posterior's mean and log-variance, float32; an encode that
        overflows in reduced precision is redone in float32 (diffusers upcasts SDXL's VAE for it)."""
        images = np.asarray(images, dtype=np.float32)
        mean, logvar = (t.numpy() for t in self._encode_step(images))
        if not (np.isfinite(mean).all() and np.isfinite(logvar).all()) and self._decoder.float32_vae() is not None:
            mean, logvar = (ops.convert_to_numpy(ops.cast(t, "float32"))
                            for t in self._decoder.float32_vae().encode(images))
        return mean, logvar

    def _posterior_sample(self, images: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Images (1, H, W, 3) in [-1, 1] -> (mean + std * eps) * scaling factor for eps (B, H/8, W/8, C):
        diffusers' `vae.encode(images).latent_dist.sample(generator)` with each image's noise."""
        mean, logvar = self._encode(images)
        return (mean + np.exp(0.5 * logvar) * eps) * np.float32(self.config.vae.scaling_factor)

    def _float32_vae(self):
        """A float32 VAE for decodes that overflow in reduced precision: read again from the checkpoint, so
        that it decodes as the float32 model does; without a file, the 16-bit weights widened."""
        if self.vae_source is not None:
            return load_vae(self.vae_source, self.config.vae, "float32")
        vae = AutoencoderKL(self.config.vae, name="vae", dtype="float32")
        vae.build()
        vae.set_weights(self.vae.get_weights())  # same class and config: same variable order
        return vae

    # -- generation ----------------------------------------------------------------------------------------

    @property
    def default_size(self) -> int:
        """The side the model was trained at: its config's sample_size when it has one, else 1024 for SDXL, 768 for
        SD 2.x v-prediction models and 512 otherwise."""
        if self.config.sample_size:
            return self.config.sample_size
        if self.config.xl:
            return 1024
        v_prediction = self.scheduler_config.prediction_type == "v_prediction"
        return 768 if self.config.family == "sd2" and v_prediction else 512

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                      batch_size: int = 1, latents=None, output_type: str = "pil",
                      callback: Callback | None = None, clip_skip: int = 1,
                      refiner: "StableDiffusion | str | os.PathLike | None" = None,
                      refiner_switch: float = REFINER_SWITCH) -> GenerationResult:
        """Generates images from text (Rombach et al. 2022), matching diffusers' StableDiffusionPipeline (and
        StableDiffusionXLPipeline for SDXL models).

        height and width default to the model's `default_size`. Prompts use AUTOMATIC1111's syntax (see
        `encode_prompt`, which also explains `clip_skip`; `<lora:name:weight>` tags: `load_lora`).
        `refiner` (a pipeline, or a path to load one in this precision) takes over the denoising at
        `refiner_switch`, the ensemble of experts diffusers runs with `denoising_end` on this model and
        `denoising_start` on the refiner: the steps whose timestep is below (1 - switch) x 1000 are the refiner's,
        which also decodes (with its own VAE, as diffusers). Scheduled prompts go on counting in the refiner.
        """
        self._check_regular_unet()
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        extra = ()
        if refiner is not None:
            refiner = self._refiner(refiner, refiner_switch, sampler)
            extra = (f"Refiner: {model_name(refiner.source) if refiner.source else 'unnamed'}"
                     + (f" [{refiner.model_hash}]" if refiner.source else ""), f"Refiner switch at: {refiner_switch:g}")
        job = self._job(prompt, negative_prompt, batch_size, seed, height, width, num_inference_steps,
                        guidance_scale, sampler, output_type, clip_skip, *extra)
        x = initial_latent(job.first_draw(latents), job.schedule)
        if refiner is None:
            x0 = sample(sampler, self._denoiser(job, guidance_scale), x, job.schedule, noise=job.draw,
                        callback=callback)
            return self._finish(job, x0, output_type)
        n = len(job.schedule.timesteps)
        cutoff = round(self.scheduler_config.num_train_timesteps * (1 - refiner_switch))  # diffusers' rounding
        switch = int(np.sum(job.schedule.timesteps >= cutoff))
        on = (lambda offset: lambda k, total, x: callback(offset + k, n, x)) if callback else (lambda offset: None)
        if switch > 0:
            x = sample(sampler, self._denoiser(job, guidance_scale), x, job.schedule, noise=job.draw,
                       callback=on(0), end_index=switch)
        if switch == n:
            return self._finish(job, x, output_type)
        # one model call per step (see `_refiner`): the refiner's first call is the base's `switch`-th
        x0 = sample(sampler, refiner._denoiser(job, guidance_scale, first_call=switch), x, job.schedule,
                    noise=job.draw, callback=on(switch), start_index=switch)
        return self._finish(job, x0, output_type, decoder=refiner)

    def _refiner(self, refiner, switch, sampler: str) -> "StableDiffusion":
        """The refiner pipeline, loaded if given as a path, checked against this model and the sampler."""
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch <= 1:
            raise InputError(f"refiner_switch must be a number in (0, 1], got {switch!r}")
        if sampler in NO_HAND_OFF:
            raise InputError(f"the {sampler} sampler cannot hand its latents to a refiner; use another "
                             f"(not {', '.join(NO_HAND_OFF)})")
        if not isinstance(refiner, StableDiffusion):
            if not isinstance(refiner, (str, os.PathLike)):
                raise InputError(f"refiner must be a StableDiffusion pipeline or a path, got {type(refiner).__name__}")
            refiner = self.load_refiner(refiner)
        mine, theirs = self.config.vae, refiner.config.vae
        if (mine.latent_channels, mine.scaling_factor) != (theirs.latent_channels, theirs.scaling_factor):
            raise InputError(f"the refiner ({refiner.config.family}) works in other latents than this model "
                             f"({self.config.family}): their VAEs differ")
        refiner._check_regular_unet()
        return refiner

    def load_refiner(self, path: str | os.PathLike) -> "StableDiffusion":
        """The model at `path` (a file, folder or Hub id) in this pipeline's precision, to pass as `refiner=`. The
        last one is kept (one at a time) and given again while its file is unchanged; `text_to_image` loads a
        refiner given as a path through this."""
        path = os.fspath(path)
        stat = os.stat(path) if os.path.exists(path) else None
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size) if stat else (path,)
        if self._last_refiner is None or self._last_refiner[0] != key:
            self._last_refiner = None  # the old one leaves memory before the new one loads
            self._last_refiner = (key, StableDiffusion.from_pretrained(path, precision=self.precision))
        return self._last_refiner[1]

    def image_to_image(self, prompt: str | list[str], image, strength: float = 0.75,
                       negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                       guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                       batch_size: int = 1, output_type: str = "pil",
                       callback: Callback | None = None, clip_skip: int = 1) -> GenerationResult:
        """Redraws an image from its latents noised to `strength` (SDEdit, Meng et al. 2022), matching diffusers'
        StableDiffusionImg2ImgPipeline: 0 gives back the VAE round trip, 1 a new image.

        `image` is a path, a PIL image or an array (see `images.py`); its sides are rounded down to multiples of 8.
        Each image's generator draws, in order: the initial noise, the VAE posterior noise, then euler_a's.
        """
        self._check_regular_unet()
        pixels = load_image(image)
        checks.check_strength(strength)
        job = self._job(prompt, negative_prompt, batch_size, seed, *pixels.shape[:2], num_inference_steps,
                        guidance_scale, sampler, output_type, clip_skip, f"Denoising strength: {strength:g}")
        noise = job.first_draw()
        image_latents = self._posterior_sample(pixels[None] * 2 - 1, job.draw())
        start = _first_step(num_inference_steps, strength)
        x0 = image_latents
        if start < num_inference_steps:
            x = add_noise(image_latents, noise, job.schedule, start)
            x0 = sample(sampler, self._denoiser(job, guidance_scale), x, job.schedule, noise=job.draw,
                        callback=callback, start_index=start)
        return self._finish(job, x0, output_type)

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None, batch_size: int = 1,
                latents=None, mask_blur: float = 0, keep_unmasked: bool = True, output_type: str = "pil",
                callback: Callback | None = None, clip_skip: int = 1) -> GenerationResult:
        """Repaints where `mask` is white (grey: partly), matching diffusers' StableDiffusionInpaintPipeline.

        An inpainting UNet (9 input channels) also sees the mask and the masked image's latents; a regular one
        has the kept region's latents put back after every step. `mask_blur` feathers the mask (pixels, as
        AUTOMATIC1111); `keep_unmasked` pastes the input back by the mask, exactly where it is black.
        Each image's generator draws, in order: the initial noise, the VAE posterior noise of the image, that of
        the masked image (inpainting UNets), then euler_a's.
        """
        if not isinstance(keep_unmasked, bool):
            raise InputError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
        pixels, mask = load_image_and_mask(image, mask, mask_blur)
        checks.check_strength(strength)
        job = self._job(prompt, negative_prompt, batch_size, seed, *pixels.shape[:2], num_inference_steps,
                        guidance_scale, sampler, output_type, clip_skip, f"Denoising strength: {strength:g}",
                        f"Mask blur: {mask_blur:g}")
        noise = job.first_draw(latents)
        image = pixels[None] * 2 - 1
        image_latents = self._posterior_sample(image, job.draw())
        extra_channels = blend = None
        if self.config.unet.in_channels > self.config.vae.latent_channels:  # + mask + masked image latents
            # diffusers binarises the mask at 0.5 for both, and downsamples it nearest-neighbour (every 8th pixel)
            masked = self._posterior_sample(image * (mask[None, ..., None] < 0.5), job.draw())
            repaint = np.broadcast_to((mask >= 0.5)[None, ::8, ::8, None], (*masked.shape[:3], 1))
            extra_channels = np.concatenate([repaint, masked], axis=-1).astype(np.float32)
        else:  # a regular UNet: the kept region is put back after each step (diffusers' nearest downsampling)
            blend = inpaint_blend(image_latents, noise, 1 - mask[::8, ::8, None], job.schedule)
        start = _first_step(num_inference_steps, strength)
        x0 = image_latents
        if start < num_inference_steps:
            # diffusers' inpainting starts from pure noise at strength 1; below it noises the image latents
            x = initial_latent(noise, job.schedule) if strength == 1 else add_noise(image_latents, noise,
                                                                                     job.schedule, start)
            x0 = sample(sampler, self._denoiser(job, guidance_scale, extra_channels), x, job.schedule,
                        noise=job.draw, callback=callback, start_index=start, blend=blend)
        keep = (lambda images: pixels * (1 - mask[..., None]) + images * mask[..., None]) if keep_unmasked else None
        return self._finish(job, x0, output_type, keep)

    def _job(self, prompt, negative_prompt, batch_size, seed, height, width, steps, guidance_scale, sampler,
             output_type, clip_skip, *extra: str) -> _Job:
        """Checks the arguments every mode shares and sets up one generator per image."""
        prompts, negatives = checks.prompt_lists(prompt, negative_prompt, batch_size)
        checks.check_size("height", height)
        checks.check_size("width", width)
        checks.check_steps(steps)
        checks.check_guidance(guidance_scale)
        checks.check_output_type(output_type)
        self._check_clip_skip(clip_skip)
        if clip_skip > 1:  # A1111 writes it only when it is not the default
            extra = (f"Clip skip: {clip_skip}", *extra)
        texts, tags = self._prompt_loras(prompts)
        used = sorted({name for text in texts + negatives for chunk in self._chunks(text).fixes
                       for _, name in chunk})
        if used:  # as A1111 writes them: "name: first 12 hex digits of the file's SHA-256, ..."
            extra = (*extra, 'TI hashes: "' + ", ".join(f"{n}: {self._embedding_hashes.get(n, '')}" for n in used)
                     + '"')
        self.apply_loras(tags)
        names = list(dict.fromkeys(tag.name for tag in tags))
        if names:  # A1111's: "name: short hash, ..." (see lora.lora_hash)
            extra = (*extra, 'Lora hashes: "' + ", ".join(f"{n}: {self.loras[n].hash}" for n in names) + '"')
        schedule = make_schedule(sampler, steps, self.scheduler_config)  # checks the sampler's name
        seeds = checks.seeds_for(seed, len(prompts))
        shape = (height // 8, width // 8, self.config.vae.latent_channels)
        settings = dict(steps=steps, sampler=sampler, scale=guidance_scale, size=(width, height), extra=extra)
        return _Job(prompts, negatives, seeds, noise_generators(seeds), shape, schedule, settings, clip_skip, texts)

    def _denoiser(self, job: _Job, guidance_scale: float, extra_channels=None, first_call: int = 0):
        guided = guidance_scale > 1.0  # diffusers: CFG only above 1
        prompts, weights = subprompts(job.texts)
        texts = prompts + (job.negatives if guided else [])
        steps = job.settings["steps"]
        schedules = [prompt_schedule(t, steps) for t in texts]
        # prompt and negative prompt take as many chunks as the longest of their texts (empty chunks pad the rest)
        chunks = max(self.chunk_count(text) for schedule in schedules for _, text in schedule)
        if all(len(schedule) == 1 for schedule in schedules):
            alone = [[i] for i in range(len(prompts))]  # each prompt's mean restored on its own
            cond = self._encode_texts(prompts, job.clip_skip, chunks, alone)
            uncond = self._encode_texts(job.negatives, job.clip_skip, chunks, alone[:len(job.negatives)]) \
                if guided else None
        else:
            conditioning = self._scheduled_conditioning(schedules, job.clip_skip, chunks)
            b = len(prompts)
            cond = lambda call: rowwise(lambda z: z[:b], conditioning(call))  # noqa: E731
            uncond = (lambda call: rowwise(lambda z: z[b:], conditioning(call))) if guided else None
        if self.config.xl:
            cond, uncond = self._added_conditioning(job, cond, uncond)
        return make_denoiser(self.predict_noise, cond, uncond, guidance_scale,
                             self.scheduler_config.prediction_type, extra_channels, weights, first_call)

    def _finish(self, job: _Job, x0: np.ndarray, output_type: str, composite=None,
                decoder: "StableDiffusion | None" = None) -> GenerationResult:
        """Checks the final latents, decodes them (with `decoder`'s VAE if given) and attaches each image's recipe;
        `composite(images)` pastes."""
        if not np.all(np.isfinite(x0)):
            raise StableDiffusionError("the generation produced NaN or infinite latents (try precision float32)")
        images = (decoder or self).decode_latents(x0)
        if composite is not None:
            images = composite(images)
        parameters = [self.recipe(p, n, seed=s, **job.settings) for p, n, s in zip(job.prompts, job.negatives,
                                                                                   job.seeds)]
        if output_type == "np":
            return GenerationResult(images, job.seeds, parameters)
        from PIL import Image

        pictures = [with_recipe(Image.fromarray(np.round(image * 255).astype(np.uint8)), text)
                    for image, text in zip(images, parameters)]
        return GenerationResult(pictures, job.seeds, parameters)

    def _check_regular_unet(self) -> None:
        if self.config.unet.in_channels != self.config.vae.latent_channels:
            raise InputError("this is an inpainting checkpoint (9-channel UNet): it only inpaints; use inpaint")

    def recipe(self, prompt: str, negative_prompt: str, steps: int, sampler: str, scale: float, seed: int,
               size: tuple[int, int], extra: tuple[str, ...] = ()) -> str:
        """The AUTOMATIC1111 `parameters` text of one image made by this pipeline (`recipe.infotext`)."""
        model = (self.model_hash, model_name(self.source)) if self.source else None
        if self._vae_fields is None:  # A1111's, for a VAE of its own: "VAE hash: <10 hex>, VAE: sdxl_vae.safetensors"
            vae = self.vae_source
            self._vae_fields = () if vae is None or vae == self.source else (
                *([f"VAE hash: {model_hash(vae)}"] if os.path.isfile(vae) else []),
                f"VAE: {os.path.basename(os.path.normpath(vae))}")
        extra = (*extra, *self._vae_fields, f"Precision: {precisions.WEIGHT_DTYPES[self.precision]}")
        return infotext(prompt, negative_prompt, steps, sampler, scale, seed, size, model, extra)

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash of the loaded file (`recipe.model_hash`, computed once)."""
        if self._model_hash is None:
            self._model_hash = model_hash(self.source)
        return self._model_hash


def resolve_precision(precision: str = "auto", warn: bool = True) -> str:
    """The Keras policy to run in: "auto" resolved for this machine; bfloat16 asked for on a CPU without it
    in hardware works, with a warning (unless not `warn`) that it is slower there."""
    if precision != "auto":
        policy = precisions.policy(precision)
        if policy != "mixed_bfloat16" or tf.config.list_physical_devices("GPU"):
            return policy
        if warn and not precisions.native_bfloat16(precisions.cpu_flags()):
            warnings.warn("this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX): bfloat16 runs emulated, "
                          "slower than float32; precision 'auto' picks the fastest", StableDiffusionWarning, 3)
        return policy
    return precisions.auto(bool(tf.config.list_physical_devices("GPU")), precisions.cpu_flags())


def _first_step(steps: int, strength: float) -> int:
    """The grid step image-to-image starts at: diffusers' get_timesteps `t_start`."""
    return steps - min(int(steps * strength), steps)
