"""StableDiffusion: the loaded networks, the public steps (encode the prompt, predict noise, decode), and the
three generation modes as short functions over those steps."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from . import checks, precision as precisions
from .config import END_TOKEN_ID, OPEN_CLIP_PAD_TOKEN_ID, ModelConfig
from .decoding import ImageDecoder
from .denoiser import make_denoiser, rowwise
from .errors import CheckpointError, InputError, StableDiffusionError, StableDiffusionWarning
from .embeddings import XL_KEYS, embedding_name, read_embedding
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
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the SDXL refiner's time ids (diffusers' defaults)


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
        self._active_loras: tuple | None = ()  # (name, te, unet) of the LoRAs merged now; None: unknown
        unet = self.unet
        self._unet_step = tf.function(lambda x, t, c, *added: ops.cast(unet(x, t, c, *added), "float32"),
                                      jit_compile=jit_compile)
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
        source = os.fspath(source)
        if not os.path.exists(source):
            raise InputError(f"VAE {source}: no such file or folder")
        self._set_vae(load_vae(source, self.config.vae, precisions.WEIGHT_DTYPES[self.precision]), source)

    def _set_vae(self, vae: AutoencoderKL, source: str | None) -> None:
        """The VAE and its compiled encode and decode (a new VAE needs new ones: a trace holds its variables)."""
        self.vae, self.vae_source = vae, source
        self._encode_step = tf.function(lambda x: [ops.cast(t, "float32") for t in vae.encode(x)])
        self._decoder = ImageDecoder(vae, self.config.vae.scaling_factor, self._float32_vae)

    # -- the steps every mode is made of (keras-hub's encode / denoise / decode steps) -----------------------

    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1, chunks: int = 1) -> np.ndarray:
        """Prompts in AUTOMATIC1111's syntax -> the weighted text conditioning (B, 77 * k, width); for SDXL the pair
        (context, pooled): both text encoders' penultimate layers side by side, and bigG's projected pooled output of
        the first chunk (B, projection_dim), as diffusers' encode_prompt and A1111 compute them.

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
        self._check_clip_skip(clip_skip)
        chunked = [self._chunks(p) for p in prompts]
        count = max(chunks, *(len(c.ids) for c in chunked))
        if count > checks.MAX_CHUNKS:
            raise InputError(f"prompt too long: {count} chunks of 75 tokens, at most {checks.MAX_CHUNKS}")
        empty = self._chunks("")
        ids = np.array([c.ids + empty.ids * (count - len(c.ids)) for c in chunked], np.int32)
        weights = np.array([c.weights + empty.weights * (count - len(c.ids)) for c in chunked], np.float32)
        fixes = [c.fixes + empty.fixes * (count - len(c.ids)) for c in chunked]
        out, pooled = [], None
        for j in range(count):
            parts = []
            for index, (encoder, pad) in enumerate(self._encoders()):
                z, pool = self._encode_text(_padded(ids[:, j], pad), clip_skip, [f[j] for f in fixes], encoder,
                                            index)
                pooled = pool if j == 0 else pooled  # SDXL's pooled vector: the first chunk's (A1111)
                w = weights[:, j, :, None]
                for rows in groups:  # each encoder's own mean (A1111), in float64: the ratio is ill-conditioned
                    if np.any(w[rows] != 1):  # when it is near 0
                        mean = z[rows].mean(dtype=np.float64)
                        weighted = z[rows] * w[rows]
                        z[rows] = weighted * np.float32(mean / weighted.mean(dtype=np.float64))
                parts.append(z)
            out.append(np.concatenate(parts, axis=-1))
        context = np.concatenate(out, axis=1)
        return (context, pooled) if self.config.xl else context

    def _encoders(self) -> list[tuple]:
        """(text encoder, pad token id) in the order their outputs are concatenated; SDXL's bigG pads with 0."""
        encoders = [(self.text_encoder, self.config.pad_token_id)] if self.text_encoder is not None else []
        if self.text_encoder_2 is not None:
            encoders.append((self.text_encoder_2, OPEN_CLIP_PAD_TOKEN_ID))
        return encoders

    def _check_clip_skip(self, clip_skip) -> None:
        """Clip skip N within every text encoder's depth (SDXL already reads the penultimate layer at N = 1)."""
        deepest = min(c.num_hidden_layers for c in self.config.encoder_configs) - (1 if self.config.xl else 0)
        checks.check_clip_skip(clip_skip, deepest)

    def chunk_count(self, prompt: str) -> int:
        """How many 77-token chunks `prompt` takes (see `encode_prompt`)."""
        return len(self._chunks(prompt).ids)

    def load_embedding(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Registers a textual-inversion embedding (see `embeddings.py`) under `name` (default: the file's stem);
        prompts and negative prompts use it by that name. Returns the name."""
        widths = tuple(c.hidden_size for c in self.config.encoder_configs)
        xl_keys = XL_KEYS[-len(widths):] if self.config.xl else ()  # the refiner reads clip_g alone
        vectors = read_embedding(path, widths, xl_keys)
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
        text, text_2 = ([layer for part, layer in layers if part == name]
                        for name in ("text_encoder", "text_encoder_2"))
        compvis = (lambda layer: unet_compvis(f"{layer}.weight", self.config.unet)
                   .removeprefix(UNET_PREFIX).removesuffix(".weight"))
        shapes = {key: torch_shape(leaf, "weight", leaf.kernel.shape) for key, leaf in layers.items()}
        lora = read_lora(path, target_names(unet, text, compvis, text_2, self.config.xl), shapes, self.config.family)
        name = lora_name(path) if name is None else name
        if not isinstance(name, str) or not re.fullmatch(r"[^<>:]+", name) or name != name.strip():
            raise InputError(f"LoRA name {name!r} cannot be written in a <lora:name:weight> tag; give another name")
        self.loras[name] = lora
        if any(active[0] == name for active in self._active_loras or ()):
            self._active_loras = None  # the same name, another file: apply again
        return name

    def _lora_targets(self) -> dict:
        if self._lora_layers is None:
            networks = (("unet", self.unet), ("text_encoder", self.text_encoder),
                        ("text_encoder_2", self.text_encoder_2))
            self._lora_layers = {(part, name): leaf for part, network in networks if network is not None
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
                weight = tag.unet if module.part == "unet" else tag.te
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
        embeddings = {tuple(t.encode(name)): (name, len(v[0])) for name, v in self.embeddings.items()}
        return chunk_prompt(prompt, t.encode, t.bos_token_id, t.eos_token_id, self._comma_id,
                            length=t.max_length - 2, embeddings=embeddings)

    def _encode_text(self, ids: np.ndarray, clip_skip: int, fixes=None, encoder=None, index: int = 0):
        """Token ids (B, 77) -> (the text encoder's last hidden state, or with clip skip N the N-th last layer's
        output through the final layer norm; None), float32. SDXL's encoders give their (N+1)-th last layer without
        the norm (diffusers' hidden_states[-(clip_skip + 2)] for its clip_skip N - 1), and bigG its projected pooled
        output in place of None. `fixes[b]` lists (position, embedding name) of row b; `index` says which of the
        model's text encoders `encoder` is (which of an embedding's vectors it reads)."""
        encoder = encoder or self.text_encoder
        numpy = lambda t: np.asarray(ops.convert_to_numpy(t), dtype=np.float32)  # noqa: E731
        replacements = None
        if fixes and any(fixes):
            mask = np.zeros((*ids.shape, 1), bool)
            vectors = np.zeros((*ids.shape, encoder.config.hidden_size), np.float32)
            for row, row_fixes in enumerate(fixes):
                for position, name in row_fixes:
                    v = self.embeddings[name][index]
                    mask[row, position:position + len(v)] = True
                    vectors[row, position:position + len(v)] = v
            replacements = (mask, vectors)
        if self.config.xl:
            last, hidden = encoder(ids, output_hidden_states=True, replacements=replacements)
            pooled = numpy(encoder.pooled(last, ids)) if encoder.config.projection_dim else None
            return numpy(hidden[-(clip_skip + 1)]), pooled
        if clip_skip == 1:
            z = encoder(ids, replacements=replacements)
        else:
            _, hidden = encoder(ids, output_hidden_states=True, replacements=replacements)
            z = encoder.final_layer_norm(hidden[-clip_skip])
        return numpy(z), None

    def predict_noise(self, latents, timesteps, context, text_embeds=None, time_ids=None) -> np.ndarray:
        """UNet output (epsilon, or v for v-prediction models) for latents (B, h, w, C), timesteps (int or (B,))
        and text context (B, 77, width), as one compiled call (traced once per input shape; XLA with jit_compile).
        SDXL also takes the pooled text embedding (B, P) and the time ids (B, 6), or (B, 5) for the refiner;
        `context` may be the tuple (context, text_embeds, time_ids) the samplers' conditioning is."""
        if isinstance(context, tuple):
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
            unet, pooled = self.config.unet, self.config.text_encoder_2.projection_dim
            ids = (unet.addition_input_dim - pooled) // unet.addition_time_embed_dim
            added = [np.zeros((batch, pooled), np.float32), np.zeros((batch, ids), np.float32)]
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
                      refiner_switch: float = 0.8) -> GenerationResult:
        """Generates images from text (Rombach et al. 2022), matching diffusers' StableDiffusionPipeline (and
        StableDiffusionXLPipeline for SDXL models).

        height and width default to the model's `default_size`. Prompts use AUTOMATIC1111's syntax (see
        `encode_prompt`, which also explains `clip_skip`; `<lora:name:weight>` tags: `load_lora`).
        `refiner` (a pipeline, or a path to load one in this precision) takes over the denoising at
        `refiner_switch`, the ensemble of experts diffusers runs with `denoising_end` on this model and
        `denoising_start` on the refiner: the steps whose timestep is below (1 - switch) x 1000 are the refiner's,
        which also decodes.
        """
        self._check_regular_unet()
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        extra = ()
        if refiner is not None:
            refiner = self._refiner(refiner, refiner_switch)
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
        x0 = sample(sampler, refiner._denoiser(job, guidance_scale), x, job.schedule, noise=job.draw,
                    callback=on(switch), start_index=switch)
        return self._finish(job, x0, output_type, decoder=refiner)

    def _refiner(self, refiner, switch) -> "StableDiffusion":
        """The refiner pipeline, loaded if given as a path, checked against this model."""
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch <= 1:
            raise InputError(f"refiner_switch must be a number in (0, 1], got {switch!r}")
        if not isinstance(refiner, StableDiffusion):
            refiner = StableDiffusion.from_pretrained(refiner, precision=self.precision)
        if refiner.config.vae.latent_channels != self.config.vae.latent_channels:
            raise InputError("the refiner's latents do not match this model's")
        refiner._check_regular_unet()
        return refiner

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
            cond = lambda call: rowwise(lambda z: z[:b], conditioning(call))  # noqa: E731
            uncond = (lambda call: rowwise(lambda z: z[b:], conditioning(call))) if guided else None
        if self.config.xl:
            cond, uncond = self._added_conditioning(job, cond, uncond)
        return make_denoiser(self.predict_noise, cond, uncond, guidance_scale,
                             self.scheduler_config.prediction_type, extra_channels, weights)

    def _added_conditioning(self, job: _Job, cond, uncond):
        """SDXL: (context, pooled) -> (context, pooled, time ids), the negative zeroed when empty (see
        `force_zeros_for_empty_prompt`). Time ids as diffusers' defaults: original size = target size = the image's,
        crop (0, 0); the refiner has an aesthetic score in place of the target size, 6 for the prompt and 2.5 for
        the negative prompt."""
        width, height = job.settings["size"]
        refiner = self.config.family == "sdxl-refiner"
        ids = lambda score: [height, width, 0, 0, score] if refiner else [height, width, 0, 0, height, width]  # noqa
        zeros = self.force_zeros_for_empty_prompt and all(n == "" for n in job.negatives)

        def added(conditioning, score, zero):
            def add(c):
                context, pooled = (np.zeros_like(c[0]), np.zeros_like(c[1])) if zero else c
                return context, pooled, np.tile(np.float32(ids(score)), (len(context), 1))
            return (lambda call: add(conditioning(call))) if callable(conditioning) else add(conditioning)

        return (added(cond, AESTHETIC_SCORE, False),
                added(uncond, NEGATIVE_AESTHETIC_SCORE, zeros) if uncond is not None else None)

    def _scheduled_conditioning(self, schedules, clip_skip: int, chunks: int):
        """`conditioning(call)`: the rows of every prompt at the denoiser's call `call`, A1111's way: call i uses
        the first text of its prompt's schedule whose last step is at least i. Each prompt's texts are encoded
        together, once."""
        encoded = []
        for schedule in schedules:
            texts = [text for _, text in schedule]
            encoded.append(self._encode_texts(texts, clip_skip, chunks, [list(range(len(texts)))]))

        def conditioning(call: int):
            rows = []
            for schedule, z in zip(schedules, encoded):
                index = next((i for i, (last, _) in enumerate(schedule) if call <= last), len(schedule) - 1)
                rows.append(rowwise(lambda part: part[index], z))
            return rowwise(lambda *parts: np.stack(parts), *rows)

        return conditioning

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


def _padded(ids: np.ndarray, pad: int) -> np.ndarray:
    """Token ids with every position after the first end token set to `pad` (as SD 2.x's and SDXL bigG's
    tokenizers pad), or unchanged when the end token is the pad."""
    if pad == END_TOKEN_ID:
        return ids
    end = ids == END_TOKEN_ID
    return np.where(np.cumsum(end, axis=-1) - end > 0, pad, ids).astype(np.int32)


def _first_step(steps: int, strength: float) -> int:
    """The grid step image-to-image starts at: diffusers' get_timesteps `t_start`."""
    return steps - min(int(steps * strength), steps)
