"""The pictures image_to_image and inpaint start from: a path, a PIL image or an array -> float32 arrays in [0, 1].

Files are opened only as PNG, JPEG, WebP, BMP, GIF or TIFF (the first frame), refused above MAX_PIXELS before
any pixel is decoded, and turned upright by their EXIF orientation. Sizes are snapped down to multiples of 8
as diffusers' VaeImageProcessor does: PIL images resized with Lanczos, arrays with nearest neighbour.
Numpy only (no TensorFlow), so the command line checks its inputs before loading a model.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from .checks import MAX_SIZE as MAX_SIDE, MIN_SIZE, SIZE_MULTIPLE as MULTIPLE
from .errors import InputError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard, checked from the header
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's convert("L")


def load_image(image) -> np.ndarray:
    """An image as (H, W, 3) float32 RGB in [0, 1]; transparency is flattened onto white (AUTOMATIC1111's default)."""
    return _snap(_rgb(_open(image, "image")), "image")


def load_image_and_mask(image, mask, mask_blur: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """The image and its mask (H, W) float32 in [0, 1]: 1 (white) is repainted, 0 (black) kept, grey is soft.

    A mask with transparency is its alpha channel (opaque = repaint), as AUTOMATIC1111 reads uploaded masks;
    otherwise its luminance. `mask_blur` feathers it with a Gaussian of that standard deviation in pixels.
    """
    picture, mask = _open(image, "image"), _open(mask, "mask")
    if _size(picture) != _size(mask):
        (w, h), (mw, mh) = _size(picture), _size(mask)
        raise InputError(f"the mask is {mw}x{mh} but the image is {w}x{h}; they must be the same size")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float)) or not 0 <= mask_blur <= 256:
        raise InputError(f"mask_blur must be a number of pixels between 0 and 256, got {mask_blur!r}")
    return _snap(_rgb(picture), "image"), gaussian_blur(_snap(_grey(mask), "mask"), mask_blur)


def gaussian_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """AUTOMATIC1111's mask blur: cv2.GaussianBlur with standard deviation sigma, kernel radius int(2.5 sigma + 0.5),
    reflected borders, along each axis."""
    radius = int(2.5 * sigma + 0.5)
    if radius == 0:
        return mask
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-taps**2 / (2 * sigma**2))
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")  # cv2's BORDER_REFLECT_101
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return np.clip(out, 0, 1).astype(np.float32)


# -- reading -----------------------------------------------------------------------------------------------------


def _open(source, what: str):
    """A path, PIL image or array -> an upright PIL image, or a float32 array in [0, 1] (H, W[, 3 or 4])."""
    if isinstance(source, (str, os.PathLike)):
        return _decode(os.fspath(source), f"{what} {os.fspath(source)!r}")
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), what)
    if isinstance(source, Image.Image):
        return _decode(source, what)
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    raise InputError(f"{what} must be a file path, encoded bytes, a PIL image or a NumPy array, "
                     f"got {type(source).__name__}")


def decode_image(data: bytes, label: str = "image") -> Image.Image:
    """An encoded image file's bytes (PNG, JPEG, ...) -> an upright PIL image, with the checks of a file path."""
    return _decode(io.BytesIO(data), label)


def _decode(source: str | io.BytesIO | Image.Image, label: str) -> Image.Image:
    """Opens, checks the size from the header, decodes and applies the EXIF orientation; errors name `label`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source, formats=FORMATS) if isinstance(source, (str, io.BytesIO)) else \
                contextlib.nullcontext(source)
            with opened as im:
                _check_pixels(*im.size, label)
                im.load()
                return ImageOps.exif_transpose(im)  # a new image, also when upright
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{label}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{label}: too many pixels (over {MAX_PIXELS}), refused as a decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        # truncated files (OSError), broken headers and EXIF blocks (the others)
        raise InputError(f"{label}: cannot read it ({' '.join(str(e).split()) or type(e).__name__})") from None


def _check_pixels(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise InputError(f"{label} is {width}x{height}: over {MAX_PIXELS} pixels, refused as a decompression bomb")


def _from_array(a: np.ndarray, what: str) -> np.ndarray:
    """uint8 (0-255), uint16 (0-65535), bool, or float in [0, 1]; (H, W), (H, W, 1|3|4), or one of those batched."""
    shape = a.shape
    if a.ndim == 4 and shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or a.ndim == 3 and a.shape[-1] in (3, 4)):
        raise InputError(f"{what} array has shape {shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    _check_pixels(a.shape[1], a.shape[0], f"{what} array")
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return (a / np.iinfo(a.dtype).max).astype(np.float32)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min(initial=0) < 0 or a.max(initial=0) > 1:
            raise InputError(f"{what} array of floats must hold finite values in [0, 1]")
        return a.astype(np.float32)
    raise InputError(f"{what} array has dtype {a.dtype}; expected uint8, uint16, bool or float in [0, 1]")


def _size(picture) -> tuple[int, int]:
    return picture.size if isinstance(picture, Image.Image) else (picture.shape[1], picture.shape[0])


# -- to RGB / grey ---------------------------------------------------------------------------------------------


def _convert(im: Image.Image, mode: str) -> Image.Image:
    try:
        return im.convert(mode)
    except ValueError:
        raise InputError(f"images of PIL mode {im.mode} cannot be converted to {mode}") from None


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit (I;16*, and I as 16-bit PNGs open) scaled from 0-65535 and float (F) from 0-1 to 8-bit L;
    PIL's own conversion would clip them to 0-255."""
    if im.mode != "F" and im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    scale = 255.0 if im.mode == "F" else 255 / 65535
    values = np.nan_to_num(np.asarray(im, dtype=np.float64) * scale)
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def _rgb(picture):
    """RGB, transparent areas over white."""
    if isinstance(picture, np.ndarray):
        if picture.ndim == 2:
            return np.repeat(picture[..., None], 3, axis=-1)
        if picture.shape[-1] == 4:
            alpha = picture[..., 3:]
            return picture[..., :3] * alpha + (1 - alpha)
        return picture
    im = _eight_bit(picture)
    if _has_alpha(im):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), _convert(im, "RGBA"))
    return _convert(im, "RGB")


def _grey(picture):
    """One channel: the alpha channel where some pixel is transparent, else the luminance."""
    if isinstance(picture, np.ndarray):
        if picture.ndim == 3 and picture.shape[-1] == 4 and picture[..., 3].min() < 1:
            return picture[..., 3]
        return picture if picture.ndim == 2 else picture[..., :3] @ LUMA
    im = _eight_bit(picture)
    if _has_alpha(im):
        alpha = _convert(im, "RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return _convert(im, "L")


def _snap(picture, what: str) -> np.ndarray:
    """Float32 array with both sides rounded down to a multiple of 8: diffusers' get_default_height_width + resize."""
    w, h = _size(picture)
    width, height = w - w % MULTIPLE, h - h % MULTIPLE
    if min(width, height) < MIN_SIZE or max(width, height) > MAX_SIDE:
        raise InputError(f"{what} is {w}x{h}; each side must be between {MIN_SIZE} and {MAX_SIDE} pixels "
                         f"(after rounding down to a multiple of {MULTIPLE})")
    if isinstance(picture, Image.Image):
        if (width, height) != (w, h):
            picture = picture.resize((width, height), resample=Image.Resampling.LANCZOS)
        return np.asarray(picture, dtype=np.float32) / 255.0
    # torch.nn.functional.interpolate(mode="nearest"): source index floor(i * in / out), the scale in float32
    rows = np.minimum(np.floor(np.arange(height, dtype=np.float32) * (np.float32(h) / height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(width, dtype=np.float32) * (np.float32(w) / width)).astype(int), w - 1)
    return np.ascontiguousarray(picture[rows][:, cols], dtype=np.float32)
