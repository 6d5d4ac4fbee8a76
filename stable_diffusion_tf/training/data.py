"""The demo model's data: captioned pictures of one flat shape on a flat background, made on the fly.

Every example is a pure function of (seed, index): the same run sees the same pictures in the same order,
a resumed run continues where it stopped, and a split over several devices sees the same examples.
Captions follow `CAPTION`; some (colour, shape, background) combinations are never shown (`HELD_OUT`),
so that quality can be measured on prompts the model has not seen.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

CAPTION = "a {colour} {shape} on a {background} background"
# Distinct in RGB, so that a picture's colours are read back by the nearest palette entry.
PALETTE = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (250, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (250, 135, 0), "purple": (140, 50, 190),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Left out of training: every colour is held out once as a shape colour and once as a background.
HELD_OUT = (
    ("red", "circle", "blue"), ("green", "square", "yellow"), ("blue", "triangle", "white"),
    ("yellow", "circle", "black"), ("white", "square", "orange"), ("black", "triangle", "purple"),
    ("orange", "circle", "green"), ("purple", "square", "red"),
)
SIZE = 64  # the demo model's pixel size
SUPERSAMPLE = 4  # shapes are drawn this much larger, then reduced: anti-aliased edges


class Scene(NamedTuple):
    """One picture's content: what the caption says, and where the shape is."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]  # in pixels
    size: float  # side of the shape's bounding box, in pixels

    @property
    def caption(self) -> str:
        return CAPTION.format(colour=self.colour, shape=self.shape, background=self.background)


def combinations(held_out: bool = False) -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with colour != background, training ones or the held-out ones."""
    every = [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]
    return [t for t in every if (t in HELD_OUT) == held_out]


TRAINING = combinations()


def scene(seed: int, index: int, size: int = SIZE, choices=TRAINING) -> Scene:
    """Example `index` of the run seeded `seed`: a combination from `choices`, a size and a position."""
    rng = np.random.default_rng([seed, index, 0])
    colour, shape, background = choices[rng.integers(len(choices))]
    side = rng.uniform(0.35, 0.65) * size
    margin = side / 2 + 2
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    return Scene(colour, shape, background, centre, side)


def render(s: Scene, size: int = SIZE) -> np.ndarray:
    """The picture of a scene, (size, size, 3) uint8."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[s.background])
    draw = ImageDraw.Draw(image)
    x, y = s.centre[0] * SUPERSAMPLE, s.centre[1] * SUPERSAMPLE
    r = s.size * SUPERSAMPLE / 2
    fill = PALETTE[s.colour]
    if s.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:  # upright, as wide as it is tall
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


class Batch(NamedTuple):
    """One training batch; every random draw of the step is made here, per example, from (seed, index)."""

    images: np.ndarray  # (B, H, W, 3) float32 in [-1, 1]
    ids: np.ndarray  # (B, 77) int32 caption tokens ("" for the examples whose caption is dropped)
    noise: np.ndarray  # (B, H/8, W/8, C) float32: the diffusion noise
    posterior: np.ndarray  # (B, H/8, W/8, C) float32: the draw from the VAE posterior
    timesteps: np.ndarray  # (B,) int32 in [0, num_train_timesteps)


class Examples:
    """Batches of the run seeded `seed`; batch `step` holds examples step*B ... step*B + B - 1."""

    def __init__(self, tokenizer, seed: int = 0, batch_size: int = 32, size: int = SIZE, latent_channels: int = 4,
                 caption_dropout: float = 0.1, num_train_timesteps: int = 1000):
        self.tokenizer, self.seed, self.batch_size, self.size = tokenizer, seed, batch_size, size
        self.latent_channels, self.caption_dropout = latent_channels, caption_dropout
        self.num_train_timesteps = num_train_timesteps
        self._ids: dict[str, np.ndarray] = {}

    def tokens(self, caption: str) -> np.ndarray:
        if caption not in self._ids:
            self._ids[caption] = self.tokenizer(caption)[0]
        return self._ids[caption]

    def example(self, index: int):
        s = scene(self.seed, index, self.size)
        rng = np.random.default_rng([self.seed, index, 1])
        latent = (self.size // 8, self.size // 8, self.latent_channels)
        caption = "" if rng.random() < self.caption_dropout else s.caption
        return (render(s, self.size).astype(np.float32) / 127.5 - 1, self.tokens(caption),
                rng.standard_normal(latent, dtype=np.float32), rng.standard_normal(latent, dtype=np.float32),
                np.int32(rng.integers(self.num_train_timesteps)))

    def batch(self, step: int) -> Batch:
        rows = [self.example(step * self.batch_size + i) for i in range(self.batch_size)]
        return Batch(*(np.stack(column) for column in zip(*rows)))

    def dataset(self, start: int, stop: int):
        """A `tf.data.Dataset` of the batches start ... stop - 1, made in a background thread."""
        import tensorflow as tf

        signature = Batch(
            tf.TensorSpec((self.batch_size, self.size, self.size, 3), tf.float32),
            tf.TensorSpec((self.batch_size, self.tokenizer.max_length), tf.int32),
            *[tf.TensorSpec((self.batch_size, self.size // 8, self.size // 8, self.latent_channels), tf.float32)] * 2,
            tf.TensorSpec((self.batch_size,), tf.int32),
        )
        steps = range(start, stop)
        return tf.data.Dataset.from_generator(lambda: (self.batch(s) for s in steps),
                                              output_signature=signature).prefetch(2)
