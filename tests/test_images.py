"""images.py: every input kind and PIL mode, EXIF orientation, snapping as diffusers does, and refused files."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from reference import to_nhwc
from stable_diffusion_tf.errors import InputError
from stable_diffusion_tf.images import MAX_PIXELS, gaussian_blur, load_image, load_image_and_mask

RED, BLUE = (220, 20, 30), (10, 40, 200)


def _noise_image(width=70, height=45, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _halves(width=24, height=16):
    """Left half red, right half blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2], a[:, width // 2 :] = RED, BLUE
    return Image.fromarray(a)


def _u8(x):
    return np.round(np.asarray(x) * 255).astype(int)


# -- sizes: rounded down to multiples of 8 as diffusers' VaeImageProcessor ------------------------------------------


def test_odd_sizes_snap_as_diffusers_preprocess():
    from diffusers.image_processor import VaeImageProcessor

    image = _noise_image()  # 70 x 45 -> 64 x 40, Lanczos for PIL images
    ref = (to_nhwc(VaeImageProcessor(vae_scale_factor=8).preprocess(image))[0] + 1) / 2
    ours = load_image(image)
    assert ours.shape == ref.shape == (40, 64, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)

    array = np.asarray(image).astype(np.float32) / 255  # arrays: nearest neighbour
    ref = (to_nhwc(VaeImageProcessor(vae_scale_factor=8).preprocess(array[None]))[0] + 1) / 2
    np.testing.assert_allclose(load_image(array), ref, atol=1e-6, rtol=0)

    mask = image.convert("L")
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_convert_grayscale=True)
    _, ours = load_image_and_mask(image, mask)
    np.testing.assert_array_equal(ours, processor.preprocess(mask)[0, 0].numpy())


@pytest.mark.parametrize("size", [(7, 64), (64, 5), (2056, 64)])
def test_sizes_out_of_range(size):
    with pytest.raises(InputError, match="between 8 and 2048"):
        load_image(Image.new("RGB", size))


def test_image_and_mask_must_have_the_same_size():
    with pytest.raises(InputError, match="the mask is 64x40 but the image is 70x45"):
        load_image_and_mask(_noise_image(), Image.new("L", (64, 40)))


# -- PIL modes ----------------------------------------------------------------------------------------------------


def _palette_with_transparency():
    im = Image.new("P", (16, 8), 1)
    im.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    im.paste(0, (0, 0, 8, 8))
    im.info["transparency"] = 0
    return im


def _rgba():
    im = Image.new("RGBA", (16, 8), RED + (255,))
    im.paste((0, 0, 0, 0), (0, 0, 8, 8))
    return im


# (image, format to save it in, expected 8-bit RGB of the left and the right half)
MODES = {
    "RGB": (lambda: _halves(16, 8), "PNG", RED, BLUE),
    "RGBA": (_rgba, "PNG", (255, 255, 255), RED),  # transparent -> white
    "LA": (lambda: Image.merge("LA", [Image.new("L", (16, 8), 90), _rgba().getchannel("A")]), "PNG",
           (255, 255, 255), (90, 90, 90)),
    "P+transparency": (_palette_with_transparency, "GIF", (255, 255, 255), RED),
    "CMYK": (lambda: Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0), (255, 0, 0)),
    "L": (lambda: Image.new("L", (16, 8), 77), "BMP", (77,) * 3, (77,) * 3),
    "1": (lambda: Image.new("1", (16, 8), 1), "TIFF", (255,) * 3, (255,) * 3),
    "I;16": (lambda: Image.fromarray(np.full((8, 16), 32896, np.uint16)), "PNG", (128,) * 3, (128,) * 3),
    "I": (lambda: Image.fromarray(np.full((8, 16), 65535, np.int32)), "TIFF", (255,) * 3, (255,) * 3),
    "F": (lambda: Image.fromarray(np.full((8, 16), 0.5, np.float32)), "TIFF", (128,) * 3, (128,) * 3),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("as_file", [False, True], ids=["pil", "file"])
def test_every_mode_becomes_rgb(tmp_path, mode, as_file):
    make, fmt, left, right = MODES[mode]
    image = make()
    if as_file:
        path = tmp_path / f"x.{fmt.lower()}"
        image.save(path, format=fmt)
        with Image.open(path) as im:
            assert im.mode == image.mode or mode == "P+transparency"
        image = path
    out = _u8(load_image(image))
    assert out.shape == (8, 16, 3)
    tolerance = 3 if fmt == "JPEG" else 0
    np.testing.assert_allclose(out[:, :8], np.broadcast_to(left, (8, 8, 3)), atol=tolerance)
    np.testing.assert_allclose(out[:, 8:], np.broadcast_to(right, (8, 8, 3)), atol=tolerance)


@pytest.mark.parametrize("mask, expected", [
    (lambda: Image.new("L", (16, 8), 200), 200),
    (lambda: Image.new("1", (16, 8), 1), 255),
    (lambda: Image.new("RGB", (16, 8), (255, 255, 255)), 255),
    (lambda: Image.new("RGBA", (16, 8), (0, 0, 0, 255)), 0),  # opaque everywhere: the luminance
    (lambda: Image.fromarray(np.full((8, 16), 65535, np.uint16)), 255),
])
def test_mask_modes(mask, expected):
    _, m = load_image_and_mask(Image.new("RGB", (16, 8)), mask())
    assert m.shape == (8, 16) and np.all(_u8(m) == expected)


def test_mask_with_transparency_is_its_alpha():
    mask = Image.new("RGBA", (16, 8), (0, 0, 0, 0))  # black strokes on a transparent sheet
    mask.paste((0, 0, 0, 255), (0, 0, 8, 8))
    _, m = load_image_and_mask(Image.new("RGB", (16, 8)), mask)
    assert np.all(m[:, :8] == 1) and np.all(m[:, 8:] == 0)


def test_unconvertible_mode():
    with pytest.raises(InputError, match="mode La"):
        load_image(Image.new("La", (16, 8)))


# -- EXIF orientation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation, top_left, shape", [(1, RED, (16, 24)), (3, BLUE, (16, 24)), (6, RED, (24, 16)),
                                                         (8, BLUE, (24, 16))])
def test_exif_orientation_is_applied(tmp_path, orientation, top_left, shape):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    _halves().save(path, exif=exif)
    out = _u8(load_image(path))
    assert out.shape == (*shape, 3)
    assert tuple(out[0, 0]) == top_left
    # the mask is compared with the upright image: a mask drawn on what people see fits
    _, m = load_image_and_mask(path, Image.new("L", shape[::-1], 255))
    assert m.shape == shape


def test_exif_orientation_of_an_opened_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _halves().save(tmp_path / "photo.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "photo.jpg") as im:
        out = _u8(load_image(im))
    assert out.shape == (24, 16, 3)
    np.testing.assert_allclose(out[0, 0], RED, atol=8)
    np.testing.assert_allclose(out[-1, 0], BLUE, atol=8)


# -- arrays -------------------------------------------------------------------------------------------------------


def test_arrays():
    rgb = np.asarray(_halves(16, 8))
    expected = rgb / 255
    np.testing.assert_allclose(load_image(rgb), expected, atol=1e-7)
    np.testing.assert_allclose(load_image(rgb[None].astype(np.float64) / 255), expected, atol=1e-7)
    np.testing.assert_allclose(load_image(rgb.astype(np.uint16) * 257), expected, atol=1e-7)
    np.testing.assert_array_equal(load_image(np.ones((8, 16), bool)), np.ones((8, 16, 3)))
    rgba = np.concatenate([rgb, np.zeros((8, 16, 1), np.uint8)], axis=-1)
    np.testing.assert_array_equal(load_image(rgba), np.ones((8, 16, 3)))  # transparent -> white
    _, m = load_image_and_mask(rgb, np.full((8, 16, 1), 0.25))
    np.testing.assert_allclose(m, 0.25)


@pytest.mark.parametrize("array, message", [
    (np.full((8, 16, 3), 1.5), r"in \[0, 1\]"), (np.full((8, 16, 3), np.nan), r"in \[0, 1\]"),
    (np.zeros((8, 16, 3), np.int64), "dtype int64"), (np.zeros((8, 16, 2)), "shape"), (np.zeros((2, 8, 16, 3)), "shape"),
])
def test_bad_arrays(array, message):
    with pytest.raises(InputError, match=message):
        load_image(array)


@pytest.mark.parametrize("value", [None, 3, "not a path\0", [[0.5]]])
def test_other_inputs(value):
    with pytest.raises(InputError):
        load_image(value)


# -- refused files: one line naming the file ----------------------------------------------------------------------


def _png_header(width, height):
    """A PNG that declares width x height pixels of 1-bit grey and holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _truncated(path, fmt):
    _noise_image(64, 64).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, message", [
    ("missing.png", None, "no such file"),
    ("notes.png", lambda p: p.write_text("hello"), "not a PNG, JPEG, WEBP, BMP, GIF or TIFF image"),
    ("image.tga", lambda p: _noise_image().save(p, format="TGA"), "not a PNG"),
    ("image.ppm", lambda p: _noise_image().save(p, format="PPM"), "not a PNG"),
    ("truncated.png", lambda p: _truncated(p, "PNG"), "cannot read it"),
    ("truncated.jpg", lambda p: _truncated(p, "JPEG"), "cannot read it"),
    ("bomb.png", lambda p: p.write_bytes(_png_header(8193, 8192)), "decompression bomb"),  # our cap
    ("bomb2.png", lambda p: p.write_bytes(_png_header(10000, 10000)), "decompression bomb"),  # PIL's warning
    ("bomb3.png", lambda p: p.write_bytes(_png_header(20000, 20000)), "decompression bomb"),  # PIL's error
    ("folder.png", lambda p: p.mkdir(), "cannot read it"),
])
def test_refused_files(tmp_path, name, write, message):
    path = tmp_path / name
    if write:
        write(path)
    with pytest.raises(InputError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match=message):
        load_image_and_mask(Image.new("RGB", (64, 64)), path)


def test_pixel_cap_is_8192_squared():
    assert MAX_PIXELS == 8192 * 8192


# -- mask blur ----------------------------------------------------------------------------------------------------


def test_mask_blur_is_a_gaussian_of_that_standard_deviation():
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = np.zeros((40, 64), np.float32)
    mask[10:30, 20:44] = 1
    for sigma in (1, 2.5, 4):
        # cv2.GaussianBlur as AUTOMATIC1111 calls it: radius int(2.5 sigma + 0.5), BORDER_REFLECT_101
        ref = ndimage.gaussian_filter(mask.astype(np.float64), sigma, truncate=2.5, mode="mirror")
        np.testing.assert_allclose(gaussian_blur(mask, sigma), ref, atol=1e-6)
    np.testing.assert_array_equal(gaussian_blur(mask, 0), mask)
    _, blurred = load_image_and_mask(Image.new("RGB", (64, 40)), Image.fromarray(np.uint8(mask * 255)), 2.5)
    np.testing.assert_allclose(blurred, gaussian_blur(mask, 2.5), atol=1e-6)


@pytest.mark.parametrize("blur", [-1, float("nan"), 1000, "2", True])
def test_bad_mask_blur(blur):
    with pytest.raises(InputError, match="mask_blur"):
        load_image_and_mask(Image.new("RGB", (16, 8)), Image.new("L", (16, 8)), blur)


def test_blur_keeps_a_uniform_mask():
    np.testing.assert_allclose(gaussian_blur(np.full((8, 16), 0.3, np.float32), 3), 0.3, atol=1e-6)
