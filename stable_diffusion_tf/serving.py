"""What the server runs: one model at a time, a bounded first-come queue of jobs on one worker thread, the progress
of the running job (with a preview of its latents), interrupt and skip, and AUTOMATIC1111's txt2img / img2img
requests turned into pipeline calls with A1111's answers (`images`, `parameters`, `info`).

Nothing here knows HTTP: `server.py` maps these calls and errors onto routes and status codes.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import re
import secrets
import threading
import time
from typing import Any, Callable

import numpy as np

from . import checks
from .config import REFINER_SWITCH
from .errors import InputError, StableDiffusionError
from .hub import CHECKPOINT_SUFFIXES, find_files
from .lora import lora_files, lora_tags
from .embeddings import embedding_files
from .recipe import SAMPLER_LABELS, model_name, parse_infotext, sampler_from_label

VERSION = "stable-diffusion-tf"
MAX_IMAGES = checks.MAX_BATCH  # batch_size * n_iter of one request
MAX_LORAS = 8  # LoRA files kept read in memory; more are read again when a prompt names them
SAMPLER_ALIASES = {"euler_a": ["k_euler_a", "k_euler_ancestral"], "euler": ["k_euler"], "lms": ["k_lms"],
                   "heun": ["k_heun"], "dpm++2m": ["k_dpmpp_2m"], "dpm++2m_karras": ["k_dpmpp_2m_ka"]}


class QueueFull(StableDiffusionError):
    """The queue holds as many waiting jobs as it may."""


class NotFound(StableDiffusionError):
    """A named thing (sampler, model) that does not exist."""


class _Stop(Exception):
    """Raised in a generation callback to end the running image early (interrupt or skip)."""


@dataclasses.dataclass
class Progress:
    """The running job as A1111's `/progress` tells it."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    latents: np.ndarray | None = None  # the running image's latents, VP form, for the preview
    preview_step: int = -1


def decode_base64_image(text: Any, what: str):
    """A1111's image fields: base64 of an image file, with or without a `data:image/...;base64,` prefix."""
    from .images import decode_image

    if not isinstance(text, str) or not text:
        raise InputError(f"{what} must be a base64-encoded image")
    if text.startswith("data:"):
        text = text.split(";", 1)[-1].split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise InputError(f"{what}: not valid base64") from None
    return decode_image(data, what)


def png_base64(image) -> str:
    """A PIL image as base64 PNG (with its recipe chunk when it carries one), no data-URL prefix (A1111's form)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sampler_name(request: dict) -> str:
    """Our sampler for A1111's `sampler_name` / `sampler_index` (labels such as "DPM++ 2M Karras", our names, or
    k-diffusion aliases) with its `scheduler` ("karras" adds Karras sigmas); NotFound otherwise."""
    label = request.get("sampler_name") or request.get("sampler_index") or "Euler"
    if not isinstance(label, str):
        raise InputError("sampler_name must be a string")
    scheduler = request.get("scheduler")
    scheduler = scheduler if isinstance(scheduler, str) and scheduler.lower() not in ("automatic", "") else None
    for name, aliases in SAMPLER_ALIASES.items():
        if label.lower() in aliases:
            return name
    if label in SAMPLER_LABELS:
        ours = label
    else:  # "Karras" where we have a Karras form (DPM++ 2M), else the sampler's own schedule
        ours = sampler_from_label(label, scheduler) or sampler_from_label(label)
    if ours is None or ours not in SAMPLER_LABELS:
        raise NotFound("Sampler not found")
    return ours


def _int(request: dict, key: str, default: int, low: int, high: int) -> int:
    value = request.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or \
            value != int(value):  # the range first: it refuses NaN and the infinities, which int() raises on
        raise InputError(f"{key} must be an integer between {low} and {high}, got {value!r}")
    return int(value)


def _float(request: dict, key: str, default: float, low: float, high: float) -> float:
    value = request.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{key} must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _text(request: dict, key: str) -> str:
    value = request.get(key) or ""
    if not isinstance(value, str):
        raise InputError(f"{key} must be a string")
    return value


@dataclasses.dataclass
class Generation:
    """One checked txt2img or img2img request, ready to run."""

    mode: str  # "txt2img", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str
    seed: int
    batch_size: int
    n_iter: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: str
    clip_skip: int
    strength: float = 0.75
    image: Any = None
    mask: Any = None
    mask_blur: int = 4
    refiner: str | None = None  # A1111's refiner_checkpoint: a model title (txt2img)
    refiner_switch: float = REFINER_SWITCH  # refiner_switch_at
    fields: dict = dataclasses.field(default_factory=dict)  # the request as sent, for the answer's `parameters`


def read_generation(request: dict, mode: str, clip_skip: int) -> Generation:
    """Checks an A1111 txt2img / img2img body (unknown keys are ignored, as A1111's models do) and decodes its
    images; `clip_skip` is the server's current CLIP_stop_at_last_layers."""
    if not isinstance(request, dict):
        raise InputError("the request body must be a JSON object")
    width = _int(request, "width", 512, checks.MIN_SIZE, checks.MAX_SIZE)
    height = _int(request, "height", 512, checks.MIN_SIZE, checks.MAX_SIZE)
    batch_size = _int(request, "batch_size", 1, 1, MAX_IMAGES)
    n_iter = _int(request, "n_iter", 1, 1, MAX_IMAGES)
    if batch_size * n_iter > MAX_IMAGES:
        raise InputError(f"batch_size x n_iter is {batch_size * n_iter}; at most {MAX_IMAGES} images a request")
    seed = _int(request, "seed", -1, -1, checks.MAX_SEED)
    if seed == -1:
        seed = secrets.randbelow(checks.MAX_SEED + 2 - batch_size * n_iter)
    elif seed + batch_size * n_iter - 1 > checks.MAX_SEED:
        raise InputError(f"seed must be at most {checks.MAX_SEED - batch_size * n_iter + 1} for this many images")
    overrides = request.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InputError("override_settings must be an object")
    clip_skip = _int(overrides, "CLIP_stop_at_last_layers", clip_skip, 1, 48)
    fields = dict(request)
    if not request.get("include_init_images"):  # A1111 echoes the request without its images
        fields.update({k: None for k in ("init_images", "mask") if k in fields})
    generation = Generation(
        mode, _text(request, "prompt"), _text(request, "negative_prompt"), seed, batch_size, n_iter,
        _int(request, "steps", 50, 1, checks.MAX_STEPS), _float(request, "cfg_scale", 7.0, 0, 100), width, height,
        sampler_name(request), clip_skip, fields=fields)
    refiner = request.get("refiner_checkpoint")
    if refiner not in (None, "", "None"):  # A1111 clients send "None" for none
        if not isinstance(refiner, str):
            raise InputError("refiner_checkpoint must be a model title")
        if mode != "txt2img":
            raise InputError("refiner_checkpoint: this server runs a refiner in txt2img only")
        generation.refiner = refiner
        generation.refiner_switch = _float(request, "refiner_switch_at", REFINER_SWITCH, 0, 1)
        if generation.refiner_switch == 0:
            raise InputError("refiner_switch_at must be above 0")
    if mode == "txt2img":
        return generation
    images = request.get("init_images")
    if not isinstance(images, list) or not images:
        raise InputError("init_images must be a list holding one base64-encoded image")
    from PIL import Image

    size = ((width // 8) * 8, (height // 8) * 8)
    image = decode_base64_image(images[0], "init_images[0]")
    generation.strength = _float(request, "denoising_strength", 0.75, 0, 1)
    try:
        image = image.convert("RGB")
        generation.image = image.resize(size, Image.LANCZOS) if image.size != size else image  # A1111's "just resize"
        if request.get("mask") is not None:
            generation.mask = _mask(decode_base64_image(request["mask"], "mask"), size,
                                    bool(request.get("inpainting_mask_invert")))
    except (ValueError, OSError) as e:
        raise InputError(f"cannot convert the image: {e}") from None
    if generation.mask is not None:
        generation.mask_blur = _int(request, "mask_blur", 4, 0, 64)
        generation.mode = "inpaint"
    return generation


def _mask(mask, size: tuple[int, int], invert: bool):
    """A1111's `create_binary_mask`: the alpha channel, cut at 128, of an RGBA mask that has transparency; else
    its luminance. Then inverted when asked, and resized to the image."""
    from PIL import Image

    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        mask = mask.convert("L")
    if invert:
        mask = mask.point(lambda v: 255 - v)
    return mask.resize(size, Image.LANCZOS) if mask.size != size else mask


class Engine:
    """One loaded model, a queue of at most `queue_size` waiting jobs and a worker thread running them in order."""

    def __init__(self, weights: str | None, models_dir: str | None = None, lora_dir: str | None = None,
                 embeddings_dir: str | None = None, precision: str = "auto", queue_size: int = 16,
                 step_delay: float = 0.0):
        self.models_dir, self.lora_dir, self.embeddings_dir = models_dir, lora_dir, embeddings_dir
        self.precision, self.queue_size = precision, queue_size
        self.step_delay = step_delay  # seconds added to every step: a test hook that makes progress visible
        self.weights = weights
        self.pipe = None
        self.model_title = ""
        self.clip_skip = 1
        self.progress = Progress()
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._projection: np.ndarray | None = None  # latents -> RGB for previews, fitted per model
        self._lora_order: list[str] = []  # LoRAs this server loaded from --lora-dir, oldest first
        self._worker = threading.Thread(target=self._run, name="generation", daemon=True)

    # -- models --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Loads the first model (in the caller's thread, so a bad one fails at startup) and starts the worker."""
        self._load(self.weights)
        self._worker.start()

    def models(self) -> dict[str, str]:
        """Title -> path of every model offered: --models-dir's checkpoints and diffusers folders, and the loaded
        model; a title is its file name relative to the folder, as A1111 shows it."""
        found = find_files(self.models_dir, CHECKPOINT_SUFFIXES, folders=True)
        if self.model_title and self.model_title not in found:
            found[self.model_title] = self.weights
        return found

    def _load(self, source: str | None) -> None:
        from .pipeline import StableDiffusion

        pipe = StableDiffusion.from_pretrained(source, precision=self.precision)
        folder = os.path.abspath(self.models_dir) if self.models_dir else None
        path = os.path.abspath(pipe.source)
        title = os.path.relpath(path, folder) if folder and path.startswith(folder + os.sep) else \
            os.path.basename(path)
        projection = _latent_to_rgb(pipe)
        # everything computed first, then swapped in together: readers never see half a switch
        self.pipe, self.weights, self.model_title, self._projection = pipe, pipe.source, title, projection
        self._lora_order = []

    def switch_model(self, title: str) -> concurrent.futures.Future | None:
        """Queues loading the model of that title (or name without the extension) from the list: never a path from
        a request; NotFound otherwise. None when it is the loaded one; the job runs between generations."""
        if not isinstance(title, str):
            raise InputError("sd_model_checkpoint must be a string")
        match, path = self._find_model(title)
        if match == self.model_title:
            return None
        return self.submit(lambda: self._load(path), "switch model")

    def _find_model(self, title: str) -> tuple[str, str]:
        """(title, path) of the listed model a request names by title or name; NotFound otherwise."""
        models = self.models()
        plain = re.sub(r"\s*\[[0-9a-f]{8,}\]$", "", title)  # A1111 titles may end in " [hash]"
        match = next((t for t in models if plain in (t, model_name(t))), None)
        if match is None:
            raise NotFound(f"model {title!r} is not in --models-dir; see /sdapi/v1/sd-models")
        return match, models[match]

    def _refiner_pipe(self, title: str):
        """The refiner a request names, kept by the model's pipeline (`load_refiner`); the model when it is that."""
        match, path = self._find_model(title)
        return self.pipe if match == self.model_title else self.pipe.load_refiner(path)

    def _refiner_for(self, g: Generation):
        """The request's refiner with the embeddings its prompts name (an SDXL embedding's clip_g serves it)."""
        refiner = self._refiner_pipe(g.refiner)
        text = f"{g.prompt}\n{g.negative_prompt}"
        for name, path in self.embeddings().items():
            if name in text and name not in refiner.embeddings:
                refiner.load_embedding(path, name)
        return refiner

    def loras(self) -> dict[str, str]:
        return lora_files(self.lora_dir)

    def embeddings(self) -> dict[str, str]:
        return embedding_files(self.embeddings_dir)

    # -- the queue ----------------------------------------------------------------------------------------------

    def submit(self, work: Callable[[], Any], name: str) -> concurrent.futures.Future:
        """Queues `work` (run on the worker thread, in arrival order); QueueFull when queue_size jobs wait."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); try again later")
            self._queue.append((work, name, future))
            self._wake.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                work, name, future = self._queue.popleft()
                self.progress = Progress(job=name, job_count=1, started=time.time(),
                                         job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as e:  # handed to the waiting request, which answers with it
                    future.set_exception(e)
            with self._wake:
                self.progress = Progress()

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not counting the running one."""
        return len(self._queue)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def skip(self) -> None:
        self.progress.skipped = True

    # -- generation ---------------------------------------------------------------------------------------------

    def queue(self, generation: Generation) -> concurrent.futures.Future:
        """Queues a checked request (QueueFull when the queue is full); the future gives A1111's answer: images,
        parameters, info."""
        if generation.refiner is not None:
            self._find_model(generation.refiner)  # an unknown title is answered now, not after the queue
        return self.submit(lambda: self._generate(generation), generation.mode)

    def _prepare_names(self, prompt: str, negative: str) -> None:
        """Loads the LoRAs the prompt's tags name and the embeddings whose names appear, from their folders."""
        pipe = self.pipe
        _, tags = lora_tags(prompt)
        available = self.loras()
        for tag in tags:
            if tag.name not in pipe.loras:
                if tag.name not in available:
                    raise InputError(f"<lora:{tag.name}>: no LoRA named {tag.name!r} in --lora-dir")
                pipe.load_lora(available[tag.name], tag.name)
                self._lora_order.append(tag.name)
        wanted = {tag.name for tag in tags}
        for name in [n for n in self._lora_order if n not in wanted][:max(0, len(self._lora_order) - MAX_LORAS)]:
            self._lora_order.remove(name)  # the oldest beyond MAX_LORAS leave memory (read again when named)
            pipe.loras.pop(name, None)
        text = f"{prompt}\n{negative}"
        for name, path in self.embeddings().items():
            if name in text and name not in pipe.embeddings:
                pipe.load_embedding(path, name)

    def _generate(self, g: Generation) -> dict:
        from .schedules import make_schedule

        pipe = self.pipe
        self._prepare_names(g.prompt, g.negative_prompt)
        schedule = make_schedule(g.sampler, g.steps, pipe.scheduler_config)
        progress = self.progress
        progress.sampling_steps = g.steps
        progress.job_count = g.n_iter  # A1111's: the images' iterations of the running job
        images, infotexts, seeds = [], [], []
        for iteration in range(g.n_iter):
            progress.job_no = iteration
            if progress.interrupted:
                break
            progress.skipped = False
            latest: dict = {}

            def callback(k: int, total: int, latents: np.ndarray) -> None:
                index = len(schedule.timesteps) - total + k + 1
                sigma = float(schedule.sigmas[min(index, len(schedule.sigmas) - 1)])
                vp = latents if schedule.vp else latents / np.sqrt(1 + sigma**2)
                latest["latents"] = vp
                progress.sampling_step = g.steps - total + k + 1
                progress.latents = vp
                if self.step_delay:
                    time.sleep(self.step_delay)
                if progress.interrupted or progress.skipped:
                    raise _Stop

            seed = g.seed + iteration * g.batch_size
            try:
                result = self._call(g, seed, callback)
            except _Stop:
                if "latents" not in latest:
                    continue
                result = self._unfinished(g, seed, latest["latents"])
            images += result.images
            infotexts += result.parameters
            seeds += result.seeds
        return self._answer(g, images, infotexts, seeds)

    def _call(self, g: Generation, seed: int, callback):
        common = dict(negative_prompt=g.negative_prompt, num_inference_steps=g.steps, guidance_scale=g.cfg_scale,
                      sampler=g.sampler, seed=seed, batch_size=g.batch_size, callback=callback, clip_skip=g.clip_skip)
        if g.mode == "txt2img":
            refiner = self._refiner_for(g) if g.refiner is not None else None
            return self.pipe.text_to_image(g.prompt, height=g.height, width=g.width, refiner=refiner,
                                           refiner_switch=g.refiner_switch, **common)
        if g.mode == "img2img":
            return self.pipe.image_to_image(g.prompt, g.image, strength=g.strength, **common)
        return self.pipe.inpaint(g.prompt, g.image, g.mask, strength=g.strength, mask_blur=g.mask_blur, **common)

    def _unfinished(self, g: Generation, seed: int, latents: np.ndarray):
        """An interrupted image as A1111 gives it: its latents at the step reached, decoded, with the recipe."""
        from PIL import Image

        from .pipeline import GenerationResult
        from .recipe import with_recipe

        pixels = self.pipe.decode_latents(latents)
        seeds = list(range(seed, seed + len(pixels)))
        texts = [self.pipe.recipe(g.prompt, g.negative_prompt, g.steps, g.sampler, g.cfg_scale, s,
                                  (g.width, g.height), ("Interrupted: yes",)) for s in seeds]
        pictures = [with_recipe(Image.fromarray(np.round(p * 255).astype(np.uint8)), t) for p, t in zip(pixels, texts)]
        return GenerationResult(pictures, seeds, texts)

    def _answer(self, g: Generation, images: list, infotexts: list[str], seeds: list[int]) -> dict:
        """A1111's response: base64 PNGs (recipe inside), the request's fields, and `info` as a JSON string."""
        first = infotexts[0] if infotexts else ""
        info = {
            "prompt": g.prompt, "all_prompts": [g.prompt] * len(seeds), "negative_prompt": g.negative_prompt,
            "all_negative_prompts": [g.negative_prompt] * len(seeds), "seed": g.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": g.width,
            "height": g.height, "sampler_name": SAMPLER_LABELS[g.sampler], "cfg_scale": g.cfg_scale,
            "steps": g.steps, "batch_size": g.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model_name(self.model_title), "sd_model_hash": self.pipe.model_hash,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": g.strength if g.mode != "txt2img" else 0,
            "extra_generation_params": parse_infotext(first)[2] if first else {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": self.progress.job_timestamp, "clip_skip": g.clip_skip,
            "is_using_inpainting_conditioning": g.mode == "inpaint" and
            self.pipe.config.unet.in_channels > self.pipe.config.vae.latent_channels,
            "version": VERSION}
        return {"images": [png_base64(im) for im in images], "parameters": g.fields, "info": json.dumps(info)}

    # -- progress -----------------------------------------------------------------------------------------------

    def progress_answer(self, with_image: bool = True) -> dict:
        """A1111's `/progress`: fraction done, relative ETA, the state, and a preview PNG of the running latents."""
        p = self.progress
        done = 0.0
        if p.job and p.sampling_steps:
            done = min(1.0, (p.job_no + p.sampling_step / p.sampling_steps) / max(1, p.job_count))
        elapsed = time.time() - p.started if p.job else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        image = None
        if with_image and p.latents is not None:
            image = self._preview(p.latents)
        state = {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False, "job": p.job,
                 "job_count": p.job_count, "job_timestamp": p.job_timestamp, "job_no": p.job_no,
                 "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps}
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}

    def _preview(self, latents: np.ndarray) -> str:
        """The first image's latents as RGB through a linear map fitted to this model's VAE (cheap: no decode)."""
        from PIL import Image

        projection = self._projection
        rgb = np.concatenate([latents[0], np.ones((*latents.shape[1:3], 1), latents.dtype)], -1) @ projection
        picture = Image.fromarray(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
        return png_base64(picture)


def _latent_to_rgb(pipe) -> np.ndarray:
    """(C + 1, 3) least-squares map from a model's scaled latents (and 1) to RGB in [0, 1], for previews: fitted on
    its VAE encoder's latents of flat colours and smooth colour ramps."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    images = [np.broadcast_to(rng.random(3, dtype=np.float32), (64, 64, 3)) for _ in range(12)]
    images += [np.stack([ramp[:, None] * np.ones(64), np.ones(64)[:, None] * ramp, rng.random() * np.ones((64, 64))],
                        -1).astype(np.float32) for _ in range(4)]
    images = np.stack(images)
    latents = pipe.encode_image(images)  # (B, 8, 8, C)
    pooled = images.reshape(len(images), 8, 8, 8, 8, 3).mean(axis=(2, 4))  # the 8x8 pixels of each latent
    x = np.concatenate([latents.reshape(-1, latents.shape[-1]), np.ones((latents[..., :1].size, 1))], -1)
    return np.linalg.lstsq(x, pooled.reshape(-1, 3), rcond=None)[0].astype(np.float32)
