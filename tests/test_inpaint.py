"""inpaint against diffusers' StableDiffusionInpaintPipeline, with a 9-channel inpainting UNet and with the regular
4-channel one, on the same tiny random weights, image, mask and noise; inpaint.py end to end."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reference import diffusers_pipeline, diffusers_scheduler, inject_noise, to_nchw, to_nhwc
from stable_diffusion_tf import InputError, StableDiffusion, cli
from stable_diffusion_tf.images import load_image_and_mask
from stable_diffusion_tf.pipeline import draw, noise_generators

PROMPT, NEGATIVE = "a red sofa in a living room", "blurry"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT, LATENT = 64, 40, (5, 8, 4)
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpm++2m", "dpm++2m_karras", "unipc"]


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


@pytest.fixture(scope="module")
def pipe9(inpainting_checkpoint):
    return StableDiffusion.from_pretrained(inpainting_checkpoint)


@pytest.fixture(scope="module")
def diffusers_inpaint(reference, tmp_path_factory):
    return diffusers_pipeline("StableDiffusionInpaintPipeline", *reference, str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def diffusers_inpaint9(reference, inpainting_unet, tmp_path_factory):
    text_encoder, _, vae = reference
    return diffusers_pipeline("StableDiffusionInpaintPipeline", text_encoder, inpainting_unet, vae,
                              str(tmp_path_factory.mktemp("tokenizer")))


def image_and_mask(width=WIDTH, height=HEIGHT, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 5: -height // 5, width // 4: -width // 4] = 255  # white: repaint
    return image, Image.fromarray(mask)


def test_inpainting_checkpoints_load(pipe9, inpainting_unet, checkpoints, tmp_path):
    """A 9-channel UNet from a single file (conv_in's shape says 9) and from a diffusers folder (config.json)."""
    folder = tmp_path / "tiny-inpainting-diffusers"
    shutil.copytree(checkpoints["diffusers"], folder)
    shutil.rmtree(folder / "unet")
    inpainting_unet.save_pretrained(folder / "unet")
    rng = np.random.default_rng(0)
    x, context = rng.standard_normal((2, 5, 8, 9)), rng.standard_normal((2, 77, 128))
    x, context, t = x.astype(np.float32), context.astype(np.float32), np.array([10.0, 500.0], np.float32)
    with torch.no_grad():
        ref = to_nhwc(inpainting_unet(to_nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    for loaded in (pipe9, StableDiffusion.from_pretrained(str(folder))):
        assert loaded.config.family == "sd1-inpainting" and loaded.config.unet.in_channels == 9
        np.testing.assert_allclose(loaded.predict_noise(x, t, context), ref, atol=1e-4, rtol=0)


def run_both(ours_pipe, diffusers_pipe, monkeypatch, sampler, strength, steps=5):
    """Our inpaint and diffusers' on the same image, mask and noise (diffusers' own mask binarisation is a no-op
    on a black-and-white mask; keep_unmasked is ours alone)."""
    image, mask = image_and_mask()
    nine = diffusers_pipe.unet.config.in_channels == 9
    generators = noise_generators([7])
    noise, posterior, masked_posterior = (draw(generators, LATENT) for _ in range(3))
    latents = None
    if strength == 1:  # also the `latents` argument: the initial noise in place of the seed's
        latents = noise = np.random.default_rng(1).standard_normal((1, *LATENT)).astype(np.float32)
    ours = ours_pipe.inpaint(PROMPT, image, mask, strength=strength, negative_prompt=NEGATIVE,
                             num_inference_steps=steps, sampler=sampler, seed=7, latents=latents,
                             keep_unmasked=False, output_type="np").images
    # diffusers encodes the image unless an inpainting UNet starts from pure noise, then always the masked image
    left = inject_noise(monkeypatch, noise, [masked_posterior] if nine and strength == 1 else
                        [posterior, masked_posterior])
    diffusers_pipe.scheduler = diffusers_scheduler(sampler)
    with torch.no_grad():
        ref = diffusers_pipe(PROMPT, image=image, mask_image=mask, height=HEIGHT, width=WIDTH, strength=strength,
                             negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                             output_type="np").images
    assert left == []
    return ours, ref


@pytest.mark.parametrize("sampler, strength", [("ddim", 1.0), ("dpm++2m", 1.0), ("ddim", 0.6), ("dpm++2m", 0.6)])
def test_inpainting_unet_matches_diffusers(pipe9, diffusers_inpaint9, monkeypatch, sampler, strength):
    ours, ref = run_both(pipe9, diffusers_inpaint9, monkeypatch, sampler, strength)
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3) and ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("sampler, strength", [(s, 0.6) for s in DETERMINISTIC] + [("ddim", 1.0), ("dpm++2m", 1.0)])
def test_regular_unet_matches_diffusers(pipe, diffusers_inpaint, monkeypatch, sampler, strength):
    # after each step the kept region is the image latents noised to diffusers' next timestep, for every sampler
    ours, ref = run_both(pipe, diffusers_inpaint, monkeypatch, sampler, strength)
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3) and ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("blur", [0, 3])
def test_pixels_under_black_are_the_input_exactly(pipe, blur):
    image, mask = image_and_mask(seed=2)
    out = pipe.inpaint(PROMPT, image, mask, num_inference_steps=3, seed=1, mask_blur=blur).images[0]
    kept = load_image_and_mask(image, mask, blur)[1] == 0
    assert kept.sum() > 500 and (~kept).sum() > 300
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(image)[kept])
    assert np.abs(np.asarray(out, float)[~kept] - np.asarray(image, float)[~kept]).mean() > 5  # repainted


def test_grey_mask_is_soft(pipe):
    image, _ = image_and_mask(seed=3)
    ramp = np.tile(np.linspace(0, 1, WIDTH, dtype=np.float32), (HEIGHT, 1))  # black to white, left to right
    kw = dict(num_inference_steps=3, sampler="euler", seed=4, mask_blur=2, output_type="np")
    kept = pipe.inpaint(PROMPT, image, ramp, **kw).images
    raw = pipe.inpaint(PROMPT, image, ramp, keep_unmasked=False, **kw).images
    pixels, mask = load_image_and_mask(image, ramp, 2)
    np.testing.assert_allclose(kept[0], pixels * (1 - mask[..., None]) + raw[0] * mask[..., None], atol=1e-6)


def test_strength_0_is_the_round_trip_of_image_to_image(pipe):
    image, mask = image_and_mask(seed=5)
    ours = pipe.inpaint(PROMPT, image, mask, strength=0, seed=9, keep_unmasked=False, output_type="np").images
    np.testing.assert_array_equal(ours, pipe.image_to_image(PROMPT, image, strength=0, seed=9, output_type="np").images)


def test_odd_sizes_and_recipe(pipe9):
    image, mask = image_and_mask(70, 45)  # both snap to 64 x 40
    result = pipe9.inpaint(PROMPT, image, mask, strength=0.8, num_inference_steps=2, seed=3, mask_blur=4,
                           batch_size=2)
    assert [im.size for im in result.images] == [(64, 40)] * 2 and result.seeds == [3, 4]
    assert result.parameters[1].endswith(", Seed: 4, Size: 64x40, Model hash: " + pipe9.model_hash +
                                         ", Model: tiny-inpainting, Denoising strength: 0.8, Mask blur: 4, Precision: float32")


def test_inpainting_checkpoint_only_inpaints(pipe9):
    image, _ = image_and_mask()
    with pytest.raises(InputError, match="inpainting checkpoint"):
        pipe9.image_to_image(PROMPT, image)
    with pytest.raises(InputError, match="inpainting checkpoint"):
        pipe9.text_to_image(PROMPT, height=64, width=64)


@pytest.mark.parametrize("kwargs", [dict(mask=Image.new("L", (64, 48))), dict(mask_blur=-1), dict(keep_unmasked=1),
                                    dict(strength=2), dict(latents=np.zeros((1, 4, 4, 4))), dict(mask=None),
                                    dict(latents=np.full((1, *LATENT), np.nan))])
def test_bad_arguments_raise_input_error(pipe, kwargs):
    image, mask = image_and_mask()
    kwargs = {"mask": mask, "num_inference_steps": 2, **kwargs}
    with pytest.raises(InputError):
        pipe.inpaint(PROMPT, image, **kwargs)


# -- inpaint.py ---------------------------------------------------------------------------------------------------


def _never_generate(args, paths):
    raise AssertionError("weights were loaded before every flag was checked")


@pytest.mark.parametrize("flags", [
    ["--mask", "{tmp}/small.png"], ["--mask", "{tmp}/missing.png"], ["--mask-blur", "65"], ["--mask-blur", "-1"],
    ["--strength", "-0.5"], ["--W", "64"], ["--output", "{tmp}/out.jpg"], ["--no-mask"],
], ids=" ".join)
def test_bad_flags_exit_2_before_loading(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setattr(cli, "_generate", _never_generate)
    image, mask = image_and_mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    mask.resize((32, 20)).save(tmp_path / "small.png")
    before = sorted(os.listdir(tmp_path))
    argv = ["--prompt", "x", "--image", str(tmp_path / "in.png"), "--output", str(tmp_path / "new.png")]
    if flags == ["--no-mask"]:  # --mask is required
        flags = []
    else:  # a --mask in flags comes last and wins
        argv += ["--mask", str(tmp_path / "mask.png")]
    assert cli.inpaint(argv + [f.format(tmp=tmp_path) for f in flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("inpaint: error: "), err
    assert sorted(os.listdir(tmp_path)) == before


def test_inpaint_script(checkpoints, tmp_path):
    image, mask = image_and_mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1")
    flags = ["--weights", checkpoints["safetensors"], "--prompt", "a red sofa", "--image", tmp_path / "in.png",
             "--mask", tmp_path / "mask.png", "--mask-blur", 2, "--steps", 3, "--seed", 5, "--batch", 2,
             "--output", tmp_path / "out.png", "--quiet"]
    proc = subprocess.run([sys.executable, "inpaint.py", *map(str, flags)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"wrote {tmp_path / 'out-0.png'} (seed 5), {tmp_path / 'out-1.png'} (seed 6)\n"
    for name, seed in [("out-0.png", 5), ("out-1.png", 6)]:
        with Image.open(tmp_path / name) as im:
            assert im.size == (WIDTH, HEIGHT)
            text = im.text["parameters"]
            assert f"Seed: {seed}" in text  # the CLI's precision is "auto": whichever suits this CPU
            assert re.search(r"Denoising strength: 1, Mask blur: 2, Precision: (float32|bfloat16)$", text), text
            assert np.array_equal(np.asarray(im)[:3], np.asarray(image)[:3])  # black beyond the blur: kept exactly
