"""A pixel classifier for the shapes pictures: what a picture shows, read back from its pixels alone.

Each pixel takes the nearest palette colour; the background is the commonest colour of the border, the shape's
colour the commonest other colour, and the shape follows from how much of its bounding box it fills: a square
fills all of it, a circle pi/4 of it, an upright triangle half of it.
"""

import numpy as np

from stable_diffusion_tf.training.data import PALETTE

NAMES = list(PALETTE)
COLOURS = np.array([PALETTE[n] for n in NAMES], np.float64)
SQUARE_FILL, TRIANGLE_FILL = 0.89, 0.64  # fill above SQUARE_FILL: square; below TRIANGLE_FILL: triangle


def labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index of each pixel's nearest palette colour."""
    pixels = np.asarray(image, np.float64)[..., :3]
    return np.argmin(((pixels[..., None, :] - COLOURS) ** 2).sum(-1), axis=-1)


def classify(image: np.ndarray) -> tuple[str, str | None, str]:
    """(shape colour, shape or None, background colour) of an (H, W, 3) uint8 picture."""
    lab = labels(image)
    border = np.concatenate([lab[:2].ravel(), lab[-2:].ravel(), lab[:, :2].ravel(), lab[:, -2:].ravel()])
    background = np.bincount(border, minlength=len(NAMES)).argmax()
    counts = np.bincount(lab.ravel(), minlength=len(NAMES))
    counts[background] = 0
    colour = counts.argmax()
    mask = lab == colour
    rows, cols = np.flatnonzero(mask.sum(1) >= 2), np.flatnonzero(mask.sum(0) >= 2)  # ignore stray pixels
    if len(rows) < 3 or len(cols) < 3:
        return NAMES[colour], None, NAMES[background]
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = box.mean()
    shape = "square" if fill > SQUARE_FILL else "triangle" if fill < TRIANGLE_FILL else "circle"
    return NAMES[colour], shape, NAMES[background]


def scores(pictures, scenes) -> dict[str, float]:
    """Fractions of pictures whose shape colour, background and shape are read as their prompt says."""
    read = [classify(np.asarray(p)) for p in pictures]
    n = len(read)
    return {"colour": sum(r[0] == s[0] for r, s in zip(read, scenes)) / n,
            "background": sum(r[2] == s[2] for r, s in zip(read, scenes)) / n,
            "shape": sum(r[1] == s[1] for r, s in zip(read, scenes)) / n}
