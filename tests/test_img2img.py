"""image_to_image against diffusers' StableDiffusionImg2ImgPipeline on the same tiny random weights, image and
noise; img2img.py end to end."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reference import diffusers_pipeline, diffusers_scheduler, inject_noise
from stable_diffusion_tf import InputError, StableDiffusion, cli
from stable_diffusion_tf.images import load_image
from stable_diffusion_tf.pipeline import draw, noise_generators

PROMPT, NEGATIVE = "an astronaut riding a horse, oil painting", "blurry, low quality"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = (5, 8, 4)  # a 70 x 45 image snaps to 64 x 40 as diffusers does
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpm++2m", "dpm++2m_karras", "unipc"]


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


@pytest.fixture(scope="module")
def diffusers_img2img(reference, tmp_path_factory):
    return diffusers_pipeline("StableDiffusionImg2ImgPipeline", *reference, str(tmp_path_factory.mktemp("tokenizer")))


def odd_image(seed=0):
    """70 x 45: diffusers rounds it down to 64 x 40 with Lanczos, and so do we."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))


def seed_draws(seed: int, count: int) -> list[np.ndarray]:
    """What image_to_image draws from the seed's generator, in order: the initial noise, the VAE posterior noise."""
    generators = noise_generators([seed])
    return [draw(generators, LATENT) for _ in range(count)]


@pytest.mark.parametrize("sampler, strength", [(s, 0.6) for s in DETERMINISTIC] + [("ddim", 1.0), ("dpm++2m", 1.0),
                                                                                 ("plms", 0.2)])
def test_matches_diffusers_pipeline(pipe, diffusers_img2img, monkeypatch, sampler, strength):
    image, steps = odd_image(), 5
    ours = pipe.image_to_image(PROMPT, image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                               sampler=sampler, seed=7, output_type="np").images
    noise, posterior = seed_draws(7, 2)
    left = inject_noise(monkeypatch, noise, [posterior])  # diffusers samples the VAE posterior with our noise
    diffusers_img2img.scheduler = diffusers_scheduler(sampler)
    with torch.no_grad():
        ref = diffusers_img2img(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE,
                                num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    assert left == []
    assert ours.shape == ref.shape == (1, 40, 64, 3)
    assert ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_strength_0_is_the_vae_round_trip(pipe):
    image = odd_image(1)
    seen = []
    result = pipe.image_to_image(PROMPT, image, strength=0, seed=3, output_type="np",
                                 callback=lambda *args: seen.append(args))
    _, posterior = seed_draws(3, 2)
    latents = pipe._posterior_sample(load_image(image)[None] * 2 - 1, posterior)
    assert seen == []  # no denoising step
    np.testing.assert_allclose(result.images, pipe.decode_latents(latents), atol=1e-6, rtol=0)


def test_strength_decides_the_steps_as_diffusers(pipe):
    seen = []
    for strength in (1.0, 0.75, 0.5, 0.24):
        pipe.image_to_image(PROMPT, odd_image(), strength=strength, num_inference_steps=4, seed=0, output_type="np",
                            callback=lambda step, total, latents: seen.append(total) if step == 0 else None)
    assert seen == [4, 3, 2]  # int(4 * 0.75) = 3 of 4 steps; int(4 * 0.24) = 0 runs none


def test_seed_gives_the_same_image_alone_and_in_a_batch(pipe):
    kw = dict(strength=0.5, num_inference_steps=4, sampler="euler_a", output_type="np")
    batch = pipe.image_to_image([PROMPT, "a cat"], odd_image(), seed=11, batch_size=2, **kw)
    alone = pipe.image_to_image("a cat", odd_image(), seed=12, **kw)
    assert batch.seeds == [11, 12]
    np.testing.assert_allclose(batch.images[1], alone.images[0], atol=1e-4, rtol=0)


def test_result_and_recipe(pipe):
    result = pipe.image_to_image(PROMPT, odd_image(), strength=0.6, negative_prompt="fog", num_inference_steps=2,
                                 seed=5)
    assert [im.size for im in result.images] == [(64, 40)] and result.seeds == [5]
    lines = result.parameters[0].splitlines()
    assert lines[:2] == [PROMPT, "Negative prompt: fog"]
    assert lines[2].startswith("Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x40, Model hash: ")
    assert lines[2].endswith(", Denoising strength: 0.6, Precision: float32")


@pytest.mark.parametrize("kwargs", [dict(strength=-0.1), dict(strength=1.5), dict(strength=float("nan")),
                                    dict(strength="0.5"), dict(strength=True), dict(image=None),
                                    dict(image="/no/such/image.png"), dict(sampler="nope"), dict(batch_size=0)])
def test_bad_arguments_raise_input_error(pipe, kwargs):
    kwargs = {"image": odd_image(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(InputError):
        pipe.image_to_image(PROMPT, **kwargs)


# -- img2img.py ---------------------------------------------------------------------------------------------------


def _never_generate(args, paths):
    raise AssertionError("weights were loaded before every flag was checked")


@pytest.mark.parametrize("flags", [
    ["--strength", "1.5"], ["--strength", "nan"], ["--init-image", "{tmp}/missing.png"],
    ["--init-image", "{tmp}/notes.png"], ["--init-image", "{tmp}/tiny.png"], ["--H", "64"], ["--steps", "0"],
    ["--output", "{tmp}/old.png"],
], ids=" ".join)
def test_bad_flags_exit_2_before_loading(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setattr(cli, "_generate", _never_generate)
    odd_image().save(tmp_path / "in.png")
    Image.new("RGB", (6, 6)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "old.png").write_bytes(b"old")
    before = sorted(os.listdir(tmp_path))
    argv = ["--prompt", "x", "--init-image", str(tmp_path / "in.png"), "--output", str(tmp_path / "new.png")]
    assert cli.img2img(argv + [f.format(tmp=tmp_path) for f in flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("img2img: error: "), err
    assert sorted(os.listdir(tmp_path)) == before


def _run(*flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "img2img.py", *map(str, flags)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_img2img_script(checkpoints, tmp_path):
    odd_image().save(tmp_path / "in.png")
    (tmp_path / "in.jpg").write_bytes(b"\xff\xd8 truncated")
    proc = _run("--prompt", "x", "--image", tmp_path / "in.jpg", "--output", tmp_path / "bad.png")
    assert proc.returncode == 2 and proc.stderr.startswith("img2img: error: image ") and str(tmp_path) in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "bad.png").exists()

    proc = _run("--weights", checkpoints["safetensors"], "--prompt", "a red cube", "--init-image", tmp_path / "in.png",
                "--strength", 0.5, "--steps", 4, "--seed", 42, "--sampler", "dpm++2m", "--output", tmp_path / "x.png",
                "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"wrote {tmp_path / 'x.png'} (seed 42)\n"
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (64, 40)
        assert "a red cube" in im.text["parameters"] and "Denoising strength: 0.5" in im.text["parameters"]
