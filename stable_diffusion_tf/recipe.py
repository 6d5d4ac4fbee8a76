"""An image's recipe: AUTOMATIC1111's `parameters` text (the "infotext"), and the model hash it names."""

from __future__ import annotations

import hashlib
import os
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_KEY = "parameters"  # the PNG text chunk AUTOMATIC1111 writes and reads
SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "lms": "LMS", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "unipc": "UniPC",
                  "lcm": "LCM"}


def infotext(prompt: str, negative_prompt: str, steps: int, sampler: str, scale: float, seed: int,
             size: tuple[int, int], model: tuple[str, str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """The text that lets a person regenerate an image: the prompt, the negative prompt, then the settings.

    `size` is (width, height); `model` is (hash, name); `extra` are more "Key: value" fields.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_LABELS[sampler]}", f"CFG scale: {scale:g}", f"Seed: {seed}",
              f"Size: {size[0]}x{size[1]}"]
    if model is not None:
        fields += [f"Model hash: {model[0]}", f"Model: {model[1]}"]
    return "\n".join(lines + [", ".join(fields + list(extra))])


def model_hash(source: str | os.PathLike, digits: int = 10) -> str:
    """AUTOMATIC1111's model hash: the first 10 hex digits of the weights file's SHA-256 (a diffusers folder: its
    UNet file's); embeddings and LoRAs use the first 12."""
    path = os.fspath(source)
    if os.path.isdir(path):
        unet = os.path.join(path, "unet")
        path = next(os.path.join(unet, f) for f in sorted(os.listdir(unet)) if not f.endswith(".json"))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def model_name(source: str | os.PathLike) -> str:
    """The name AUTOMATIC1111 shows for a model: its file or folder name without the extension."""
    return os.path.splitext(os.path.basename(os.path.normpath(os.fspath(source))))[0]


def pnginfo(text: str | None) -> PngInfo:
    """A PNG text chunk holding the recipe (tEXt when latin-1 encodable, else Pillow writes iTXt, UTF-8)."""
    info = PngInfo()
    if text is not None:
        info.add_text(PNG_KEY, text)
    return info


class GeneratedImage(Image.Image):
    """A PIL image that carries its recipe: `image.info["parameters"]`, written into every PNG it is saved as.

    `image.save("x.png")` keeps the recipe, as AUTOMATIC1111's files do; pass `pnginfo=` to write your own.
    """

    def save(self, fp, format=None, **params):
        name = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else ""
        is_png = (format or "").upper() == "PNG" or (not format and name.lower().endswith(".png"))
        if is_png and "pnginfo" not in params and PNG_KEY in self.info:
            params["pnginfo"] = pnginfo(self.info[PNG_KEY])
        return super().save(fp, format, **params)


def with_recipe(image: Image.Image, text: str) -> GeneratedImage:
    """`image` as a GeneratedImage holding `text` as its recipe (the same pixels, not a copy)."""
    image.__class__ = GeneratedImage
    image.info[PNG_KEY] = text
    return image


# "Key: value" fields of the settings line; a value is up to the next comma, or a double-quoted string
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of an AUTOMATIC1111 `parameters` text, read as A1111 reads it: the
    last line holds the settings when it has at least three "Key: value" fields; lines from one starting with
    "Negative prompt:" on are the negative prompt. Quoted values are unquoted."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines and len(fields := _FIELD.findall(lines[-1])) >= 3:
        lines.pop()
        for key, value in fields:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            settings[key.strip()] = value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), settings


def sampler_from_label(label: str, schedule: str | None = None) -> str | None:
    """Our sampler name for an A1111 sampler label (newer A1111 writes the Karras schedule as its own field)."""
    if schedule and schedule.lower() == "karras" and not label.endswith("Karras"):
        label = f"{label} Karras"
    names = {v.lower(): k for k, v in SAMPLER_LABELS.items()}
    return names.get(label.strip().lower())
