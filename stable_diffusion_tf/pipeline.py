"""StableDiffusion: the loaded networks, the public steps (encode the prompt, predict noise, decode), and the
three generation modes as short functions over those steps."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from . import checks, precision as precisions
from .config import ModelConfig
from .decoding import ImageDecoder
from .denoiser import make_denoiser
from .errors import InputError, StableDiffusionError, StableDiffusionWarning
from .embeddings import embedding_name, read_embedding
from .hub import resolve
from .lora import LoraFile, LoraTag, lora_name, lora_tags, read_lora, target_names
from .prompts import chunk_prompt, prompt_schedule, split_and
from .images import load_image, load_image_and_mask
from .recipe import infotext, model_hash, model_name, with_recipe
from .samplers import add_noise, initial_latent, inpaint_blend, sample
from .schedules import PREDICTION_TYPES, Schedule, SchedulerConfig, make_schedule
from .tokenizer import CLIPTokenizer
from .vae import AutoencoderKL
from .weights.assign import leaf_layers, torch_shape
from .weights.load import Models, load, load_vae
from .weights.names import UNET_PREFIX, unet_compvis

Callback = Callable[[int, int, np.ndarray], None]


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


class StableDiffusion:
    """Text encoder, UNet and VAE of one Stable Diffusion model (Rombach et al. 2022) plus the tokenizer."""

    def __init__(self, models: Models, tokenizer: CLIPTokenizer | None = None, precision: str = "float32",
                 jit_compile: bool = False, scheduler_config: SchedulerConfig | None = None,
                 source: str | None = None):
        self.config: ModelConfig = models.config
        self.text_encoder, self.unet, self.vae = models.text_encoder, models.unet, models.vae
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=self.config.text_encoder.max_position_embeddings,
                                                    pad_token_id=self.config.pad_token_id)
        self.precision = precisions.policy(precision)
        self.jit_compile = jit_compile
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.source = source
        self._model_hash: str | None = None
        self._comma_id = self.tokenizer.encode(",")[0]
        self.embeddings: dict[str, np.ndarray] = {}  # textual-inversion vectors by name (`load_embedding`)
        self._embedding_hashes: dict[str, str] = {}  # A1111's short hash of each embedding's file
        self.loras: dict[str, LoraFile] = {}  # LoRA files by name (`load_lora`)
        self._lora_layers: dict | None = None  # (part, layer name) -> the Dense or Conv2D a LoRA may change
        self._lora_backups: dict[tuple[str, str], tf.Tensor] = {}  # base kernels of the layers LoRAs changed
        self._active_loras: tuple | None = ()  # (name, te, unet) of the LoRAs merged now; None: unknown
        unet = self.unet
        self._unet_step = tf.function(lambda x, t, c: ops.cast(unet(x, t, c), "float32"), jit_compile=jit_compile)
        self._encode_step = tf.function(lambda x: [ops.cast(t, "float32") for t in self.vae.encode(x)])
        self._decoder = ImageDecoder(self.vae, self.config.vae.scaling_factor, self._float32_vae)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, precision: str = "float32",
                        jit_compile: bool = False, config: ModelConfig | None = None,
                        prediction_type: str | None = None) -> "StableDiffusion":
        """Loads a .safetensors/.ckpt single file, a diffusers folder, a Hub repo id (None: SD 1.5), or "demo" (the
        small model shipped in this package, see `training`).

        `precision`: "float32", "bfloat16" or "float16" (the mixed forms: 16-bit weights, float32 norms and
        sampler math), or "auto": float16 on a GPU, bfloat16 on a CPU that computes it natively, else float32.

        `prediction_type` ("epsilon" or "v_prediction") overrides what the files say, as diffusers'
        from_single_file does; without it a folder's scheduler config decides, and a single file is
        taken as v-prediction if SD 2.x (diffusers' default: the 768 models), epsilon otherwise.
        Loading is strict: every tensor is checked by name and shape before any is read (CheckpointError).
        """
        policy = resolve_precision(precision)
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction_type {prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
        path = resolve(source)
        models = load(path, config=config, dtype=precisions.WEIGHT_DTYPES[policy])
        scheduler = SchedulerConfig.of_model(path, models.config.family,
                                             prediction_type or models.config.prediction_type)
        return cls(models, precision=policy, jit_compile=jit_compile, scheduler_config=scheduler, source=path)

    # -- the steps every mode is made of (keras-hub's encode / denoise / decode steps) -----------------------

    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1, chunks: int = 1) -> np.ndarray:
        """Prompts in AUTOMATIC1111's syntax -> the weighted text conditioning (B, 77 * k, width).

        `(x)`, `[x]` and `(x:w)` weight the encoder output of their tokens, then the mean over the batch is put
        back (A1111's "Original" emphasis; see `prompts.py`). Each weighted fragment is tokenized on its own;
        prompts longer than 75 tokens, and BREAK, make more 77-token chunks, each encoded on its own and
        concatenated. k is the largest chunk count of the batch and at least `chunks`: shorter prompts get empty
        chunks. `clip_skip` N > 1 reads the N-th last layer through the final layer norm (A1111's numbering:
        1 is the last layer). `<lora:name:weight>` tags are taken out of the text and their LoRAs applied
        (exactly the first prompt's, see `load_lora`), so the conditioning is the LoRA'd text encoder's.
        """
        prompts, _ = checks.prompt_lists(prompts, None, 1)
        texts, tags = self._prompt_loras(prompts)
        self.apply_loras(tags)
        return self._encode_texts(texts, clip_skip, chunks, [[i] for i in range(len(texts))])

    def _encode_texts(self, prompts: list[str], clip_skip: int, chunks: int, groups: list[list[int]]) -> np.ndarray:
        """`encode_prompt`, with the mean restored over each group of rows: each prompt alone, as A1111 encodes
        each prompt on its own; the texts of one prompt's schedule together, as A1111 encodes them."""
        checks.check_clip_skip(clip_skip, self.config.text_encoder.num_hidden_layers)
        chunked = [self._chunks(p) for p in prompts]
        count = max(chunks, *(len(c.ids) for c in chunked))
        if count > checks.MAX_CHUNKS:
            raise InputError(f"prompt too long: {count} chunks of 75 tokens, at most {checks.MAX_CHUNKS}")
        empty = self._chunks("")
        ids = np.array([c.ids + empty.ids * (count - len(c.ids)) for c in chunked], np.int32)
        weights = np.array([c.weights + empty.weights * (count - len(c.ids)) for c in chunked], np.float32)
        fixes = [c.fixes + empty.fixes * (count - len(c.ids)) for c in chunked]
        if self.tokenizer.pad_token_id != self.tokenizer.eos_token_id:  # SD 2.x: pad after the first end token
            after_end = np.cumsum(ids == self.tokenizer.eos_token_id, axis=-1) - (ids == self.tokenizer.eos_token_id)
            ids = np.where(after_end > 0, self.tokenizer.pad_token_id, ids).astype(np.int32)
        out = []
        for j in range(count):
            z = self._encode_text(ids[:, j], clip_skip, [f[j] for f in fixes])
            w = weights[:, j, :, None]
            for rows in groups:  # the means in float64: their ratio is ill-conditioned when they are near 0
                if np.any(w[rows] != 1):
                    mean = z[rows].mean(dtype=np.float64)
                    weighted = z[rows] * w[rows]
                    z[rows] = weighted * np.float32(mean / weighted.mean(dtype=np.float64))
            out.append(z)
        return np.concatenate(out, axis=1)

    def chunk_count(self, prompt: str) -> int:
        """How many 77-token chunks `prompt` takes (see `encode_prompt`)."""
        return len(self._chunks(prompt).ids)

    def load_embedding(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Registers a textual-inversion embedding (see `embeddings.py`) under `name` (default: the file's stem);
        prompts and negative prompts use it by that name. Returns the name."""
        vectors = read_embedding(path, self.config.text_encoder.hidden_size)
        name = embedding_name(path) if name is None else name
        if not isinstance(name, str) or not self.tokenizer.encode(name):
            raise InputError(f"embedding name {name!r} has no tokens; give it a name made of letters or digits")
        self.embeddings[name] = vectors
        self._embedding_hashes[name] = model_hash(path, 12)
        return name

    def load_lora(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Registers a LoRA file (kohya/A1111, LoCon, LoHa, LoKr or diffusers/PEFT; see `lora.py`) under `name`
        (default: the file's stem) and returns the name. Every key and shape is checked against this model here.

        Prompts use it as AUTOMATIC1111 does: `<lora:name:weight>` (or `<lora:name:te_weight:unet_weight>`) in the
        prompt adds weight x alpha/rank x the file's update to the layers it names, merged into the weights
        before the generation (no cost per step). The first prompt's tags count for the whole batch, as in A1111;
        a generation without tags runs on the base weights, which are put back bit for bit. Several LoRAs may be
        used at once; changing them or their weights between generations reads no file again.
        """
        layers = self._lora_targets()
        unet = [layer for part, layer in layers if part == "unet"]
        text = [layer for part, layer in layers if part == "text_encoder"]
        compvis = (lambda layer: unet_compvis(f"{layer}.weight", self.config.unet)
                   .removeprefix(UNET_PREFIX).removesuffix(".weight"))
        shapes = {key: torch_shape(leaf, "weight", leaf.kernel.shape) for key, leaf in layers.items()}
        lora = read_lora(path, target_names(unet, text, compvis), shapes, self.config.family)
        name = lora_name(path) if name is None else name
        if not isinstance(name, str) or not re.fullmatch(r"[^<>:]+", name) or name != name.strip():
            raise InputError(f"LoRA name {name!r} cannot be written in a <lora:name:weight> tag; give another name")
        self.loras[name] = lora
        if any(active[0] == name for active in self._active_loras or ()):
            self._active_loras = None  # the same name, another file: apply again
        return name

    def _lora_targets(self) -> dict:
        if self._lora_layers is None:
            self._lora_layers = {(part, name): leaf for part, network in (("unet", self.unet),
                                                                           ("text_encoder", self.text_encoder))
                                 for name, leaf in leaf_layers(network).items()
                                 if isinstance(leaf, (keras.layers.Dense, keras.layers.Conv2D))}
        return self._lora_layers

    def _prompt_loras(self, prompts: list[str]) -> tuple[list[str], list[LoraTag]]:
        """The prompts without their extra-network tags, and the LoRA tags of the first (A1111's rule)."""
        stripped = [lora_tags(p) for p in prompts]
        return [text for text, _ in stripped], stripped[0][1]

    def apply_loras(self, tags: list[LoraTag]) -> None:
        """Merges exactly these LoRAs (registered by `load_lora`) into the weights, putting back the base weights of
        layers no longer changed; nothing happens when they are already applied. `apply_loras([])` restores the
        base model bit for bit."""
        wanted = tuple((t.name, t.te, t.unet) for t in tags)
        if wanted == self._active_loras:
            return
        for tag in tags:
            if tag.name not in self.loras:
                raise InputError(f"<lora:{tag.name}>: no LoRA named {tag.name!r} is loaded (pipe.load_lora(path), "
                                 f"or --lora / --lora-dir on the command line)")
        layers = self._lora_targets()
        totals: dict[tuple[str, str], tf.Tensor] = {}
        for tag in tags:
            for module in self.loras[tag.name].modules:
                weight = tag.te if module.part == "text_encoder" else tag.unet
                if weight == 0:
                    continue
                key = (module.part, module.layer)
                delta = _keras_delta(module, layers[key], weight)
                totals[key] = totals[key] + delta if key in totals else delta
        self._active_loras = None  # until every layer is done
        for key in [k for k in self._lora_backups if k not in totals]:
            layers[key].kernel.assign(self._lora_backups.pop(key))
        for key, delta in totals.items():
            kernel = layers[key].kernel
            if key not in self._lora_backups:  # a copy of the base kernel, not a view of the variable's buffer
                self._lora_backups[key] = tf.raw_ops.DeepCopy(x=kernel.value)
            base = tf.cast(self._lora_backups[key], "float32")
            kernel.assign(tf.cast(base + delta, kernel.dtype))
        self._active_loras = wanted

    def _chunks(self, prompt: str):
        t = self.tokenizer
        embeddings = {tuple(t.encode(name)): (name, len(v)) for name, v in self.embeddings.items()}
        return chunk_prompt(prompt, t.encode, t.bos_token_id, t.eos_token_id, self._comma_id,
                            length=t.max_length - 2, embeddings=embeddings)

    def _encode_text(self, ids: np.ndarray, clip_skip: int, fixes=None) -> np.ndarray:
        """Token ids (B, 77) -> the text encoder's last hidden state, or with clip skip N the N-th last layer's
        output through the final layer norm; float32. `fixes[b]` lists (position, embedding name) of row b."""
        replacements = None
        if fixes and any(fixes):
            mask = np.zeros((*ids.shape, 1), bool)
            vectors = np.zeros((*ids.shape, self.config.text_encoder.hidden_size), np.float32)
            for row, row_fixes in enumerate(fixes):
                for position, name in row_fixes:
                    v = self.embeddings[name]
                    mask[row, position:position + len(v)] = True
                    vectors[row, position:position + len(v)] = v
            replacements = (mask, vectors)
        if clip_skip == 1:
            z = self.text_encoder(ids, replacements=replacements)
        else:
            _, hidden = self.text_encoder(ids, output_hidden_states=True, replacements=replacements)
            z = self.text_encoder.final_layer_norm(hidden[-clip_skip])
        return np.asarray(ops.convert_to_numpy(z), dtype=np.float32)

    def predict_noise(self, latents, timesteps, context) -> np.ndarray:
        """UNet output (epsilon, or v for v-prediction models) for latents (B, h, w, C), timesteps (int or (B,))
        and text context (B, 77, width), as one compiled call (traced once per input shape; XLA with jit_compile)."""
        latents = np.asarray(latents, dtype=np.float32)
        timesteps = np.ascontiguousarray(np.broadcast_to(np.asarray(timesteps, np.float32), (latents.shape[0],)))
        return self._unet_step(latents, timesteps, np.asarray(context, dtype=np.float32)).numpy()

    def prepare(self, height: int | None = None, width: int | None = None, batch_size: int = 1,
                guidance_scale: float = 7.5) -> None:
        """Traces the compiled UNet step for a generation of this size, so that its first step does not."""
        height, width = height or self.default_size, width or self.default_size
        batch = batch_size * (2 if guidance_scale > 1.0 else 1)
        latents = np.zeros((batch, height // 8, width // 8, self.config.unet.in_channels), np.float32)
        context = np.zeros((batch, self.tokenizer.max_length, self.config.unet.cross_attention_dim), np.float32)
        self._unet_step.get_concrete_function(latents, np.zeros((batch,), np.float32), context)

    def decode_latents(self, latents, tiled: bool | None = None) -> np.ndarray:
        """Scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) float32 in [0, 1] (see `decoding.ImageDecoder`:
        tiled above 768 px, redone in float32 if a reduced-precision decode overflows)."""
        return self._decoder(latents, tiled)

    def encode_image(self, images) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> posterior mean times the scaling factor (B, H/8, W/8, 4)."""
        mean, _ = self._encode(np.asarray(images, dtype=np.float32) * 2 - 1)
        return mean * np.float32(self.config.vae.scaling_factor)

    def _encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, H, W, 3) in [-1, 1] -> the VAE posterior's mean and log-variance, float32."""
        mean, logvar = self._encode_step(np.asarray(images, dtype=np.float32))
        return mean.numpy(), logvar.numpy()

    def _posterior_sample(self, images: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Images (1, H, W, 3) in [-1, 1] -> (mean + std * eps) * scaling factor for eps (B, H/8, W/8, C):
        diffusers' `vae.encode(images).latent_dist.sample(generator)` with each image's noise."""
        mean, logvar = self._encode(images)
        return (mean + np.exp(0.5 * logvar) * eps) * np.float32(self.config.vae.scaling_factor)

    def _float32_vae(self):
        """A float32 VAE for decodes that overflow in reduced precision: read again from the checkpoint, so
        that it decodes as the float32 model does; without a file, the 16-bit weights widened."""
        if self.source is not None:
            return load_vae(self.source, self.config.vae, "float32")
        vae = AutoencoderKL(self.config.vae, name="vae", dtype="float32")
        vae.build()
        vae.set_weights(self.vae.get_weights())  # same class and config: same variable order
        return vae

    # -- generation ----------------------------------------------------------------------------------------

    @property
    def default_size(self) -> int:
        """The side the model was trained at: its config's sample_size when it has one, else 768 for SD 2.x
        v-prediction models and 512 otherwise."""
        if self.config.sample_size:
            return self.config.sample_size
        v_prediction = self.scheduler_config.prediction_type == "v_prediction"
        return 768 if self.config.family == "sd2" and v_prediction else 512

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                      batch_size: int = 1, latents=None, output_type: str = "pil",
                      callback: Callback | None = None, clip_skip: int = 1) -> GenerationResult:
        """Generates images from text (Rombach et al. 2022), matching diffusers' StableDiffusionPipeline.

        height and width default to the model's `default_size`. Prompts use AUTOMATIC1111's syntax (see
        `encode_prompt`, which also explains `clip_skip`; `<lora:name:weight>` tags: `load_lora`).
        """
        self._check_regular_unet()
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        job = self._job(prompt, negative_prompt, batch_size, seed, height, width, num_inference_steps,
                        guidance_scale, sampler, output_type, clip_skip)
        x = initial_latent(job.first_draw(latents), job.schedule)
        x0 = sample(sampler, self._denoiser(job, guidance_scale), x, job.schedule, noise=job.draw, callback=callback)
        return self._finish(job, x0, output_type)

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
        checks.check_clip_skip(clip_skip, self.config.text_encoder.num_hidden_layers)
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

    def _denoiser(self, job: _Job, guidance_scale: float, extra_channels=None):
        guided = guidance_scale > 1.0  # diffusers: CFG only above 1
        prompts, weights = _subprompts(job.texts)
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
            cond = lambda call: conditioning(call)[:b]  # noqa: E731
            uncond = (lambda call: conditioning(call)[b:]) if guided else None
        return make_denoiser(self.predict_noise, cond, uncond, guidance_scale,
                             self.scheduler_config.prediction_type, extra_channels, weights)

    def _scheduled_conditioning(self, schedules, clip_skip: int, chunks: int):
        """`conditioning(call)`: the rows of every prompt at the denoiser's call `call`, A1111's way: call i uses
        the first text of its prompt's schedule whose last step is at least i. Each prompt's texts are encoded
        together, once."""
        encoded = []
        for schedule in schedules:
            texts = [text for _, text in schedule]
            encoded.append(self._encode_texts(texts, clip_skip, chunks, [list(range(len(texts)))]))

        def conditioning(call: int) -> np.ndarray:
            rows = []
            for schedule, z in zip(schedules, encoded):
                index = next((i for i, (last, _) in enumerate(schedule) if call <= last), len(schedule) - 1)
                rows.append(z[index])
            return np.stack(rows)

        return conditioning

    def _finish(self, job: _Job, x0: np.ndarray, output_type: str, composite=None) -> GenerationResult:
        """Checks the final latents, decodes them and attaches each image's recipe; `composite(images)` pastes."""
        if not np.all(np.isfinite(x0)):
            raise StableDiffusionError("the generation produced NaN or infinite latents (try precision float32)")
        images = self.decode_latents(x0)
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
        extra = (*extra, f"Precision: {precisions.WEIGHT_DTYPES[self.precision]}")
        return infotext(prompt, negative_prompt, steps, sampler, scale, seed, size, model, extra)

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash of the loaded file (`recipe.model_hash`, computed once)."""
        if self._model_hash is None:
            self._model_hash = model_hash(self.source)
        return self._model_hash


def _subprompts(prompts: list[str]) -> tuple[list[str], np.ndarray | None]:
    """Prompts split on AND (`prompts.split_and`): the subprompts, image-major, and their weights (B, K), where
    shorter prompts are padded with weight-0 copies of their first subprompt; (prompts, None) without AND or
    weights."""
    parts = [split_and(p) for p in prompts]
    k = max(len(p) for p in parts)
    if k == 1 and all(w == 1.0 for p in parts for _, w in p):
        return prompts, None
    texts, weights = [], np.zeros((len(prompts), k))
    for row, p in enumerate(parts):
        p = p + [(p[0][0], 0.0)] * (k - len(p))
        texts += [text for text, _ in p]
        weights[row] = [w for _, w in p]
    return texts, weights


def _keras_delta(module, leaf, weight: float) -> tf.Tensor:
    """weight * a LoRA module's update, float32 in the layout of the layer's Keras kernel. A plain LoRA on a Dense
    layer is one multi-threaded matmul, down^T @ up^T (in, out); other updates are built in torch's layout."""
    scale = np.float32(module.scale * weight)
    t = module.tensors
    if isinstance(leaf, keras.layers.Dense) and module.kind == "lora" and "lora_mid.weight" not in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        return tf.matmul(down, up * scale, transpose_a=True, transpose_b=True)
    delta = module.delta(torch_shape(leaf, "weight", leaf.kernel.shape)) * np.float32(weight)
    return tf.constant(delta.T if isinstance(leaf, keras.layers.Dense) else delta.transpose(2, 3, 1, 0))


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
