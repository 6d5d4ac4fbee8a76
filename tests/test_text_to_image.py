"""text_to_image against diffusers' StableDiffusionPipeline on the same tiny random weights and noise."""

import numpy as np
import pytest
import torch

from reference import SCHEDULER, reference_tokenizer, to_nchw
from stable_diffusion_tf import InputError, StableDiffusion

DETERMINISTIC = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
PROMPT, NEGATIVE = "an astronaut riding a horse, oil painting", "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


@pytest.fixture(scope="module")
def diffusers_pipe(reference, tmp_path_factory):
    import diffusers

    text_encoder, unet, vae = reference
    tokenizer = reference_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def run_diffusers(diffusers_pipe, sampler, latents, height, width, steps):
    import diffusers

    name, extra = DETERMINISTIC[sampler]
    # as users switch samplers: from the loaded SD 1.5 scheduler's config, which carries no timestep_spacing
    sd15 = diffusers.PNDMScheduler.from_config(SCHEDULER).config
    diffusers_pipe.scheduler = getattr(diffusers, name).from_config(sd15, **extra)
    with torch.no_grad():
        out = diffusers_pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                             num_inference_steps=steps, guidance_scale=7.5, latents=to_nchw(latents),
                             output_type="np")
    return out.images


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_matches_diffusers_pipeline(pipe, diffusers_pipe, sampler):
    height, width, steps = 64, 96, 6
    latents = np.random.default_rng(3).standard_normal((1, height // 8, width // 8, 4)).astype(np.float32)
    ours = pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                              guidance_scale=7.5, sampler=sampler, latents=latents, output_type="np").images
    ref = run_diffusers(diffusers_pipe, sampler, latents, height, width, steps)
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert ref.std() > 0.01  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_odd_latent_size_matches_diffusers(pipe, diffusers_pipe):
    height, width = 72, 40  # latents 9 x 5: the UNet upsamples to the skip sizes as diffusers does
    latents = np.random.default_rng(4).standard_normal((1, 9, 5, 4)).astype(np.float32)
    ours = pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=3,
                              sampler="dpm++2m", latents=latents, output_type="np").images
    np.testing.assert_allclose(ours, run_diffusers(diffusers_pipe, "dpm++2m", latents, height, width, 3),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "lcm"])
def test_seed_gives_the_same_image_alone_and_in_a_batch(pipe, sampler):
    kw = dict(height=64, width=64, num_inference_steps=3, sampler=sampler, output_type="np")
    batch = pipe.text_to_image(PROMPT, seed=11, batch_size=3, **kw)
    alone = pipe.text_to_image(PROMPT, seed=12, **kw)
    assert batch.seeds == [11, 12, 13] and alone.seeds == [12]
    np.testing.assert_allclose(batch.images[1], alone.images[0], atol=1e-4, rtol=0)
    assert np.abs(batch.images[0] - batch.images[1]).max() > 1e-2  # different seeds, different images


def test_result_object_and_recipe(pipe, checkpoints):
    result = pipe.text_to_image(["a red cube", "a blue ball"], negative_prompt="fog", height=64, width=64,
                                num_inference_steps=2, sampler="dpm++2m_karras", seed=5)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.seeds == [5, 6]
    first = result.parameters[0].splitlines()
    assert first[0] == "a red cube" and first[1] == "Negative prompt: fog"
    assert "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: " in first[2]
    assert "Seed: 6" in result.parameters[1] and result.parameters[1].startswith("a blue ball")
    import hashlib

    with open(checkpoints["safetensors"], "rb") as f:
        assert f"Model hash: {hashlib.sha256(f.read()).hexdigest()[:10]}" in first[2]


def test_images_keep_their_recipe_when_saved_the_obvious_way(pipe, tmp_path):
    from PIL import Image

    result = pipe.text_to_image(["a red cube", "a blue ball"], height=64, width=64, num_inference_steps=1, seed=5)
    for i, image in enumerate(result.images):
        assert image.info["parameters"] == result.parameters[i]
        image.save(tmp_path / f"{i}.png")
        with Image.open(tmp_path / f"{i}.png") as saved:
            assert saved.text["parameters"] == result.parameters[i]
            np.testing.assert_array_equal(np.asarray(saved), np.asarray(image))
    result.images[0].save(tmp_path / "own.png", pnginfo=None)  # a caller's own pnginfo (here: none) wins
    with Image.open(tmp_path / "own.png") as saved:
        assert "parameters" not in saved.text
    result.images[0].save(tmp_path / "x.jpg")  # other formats are written as Pillow writes them
    with Image.open(tmp_path / "x.jpg") as saved:
        assert saved.size == (64, 64)


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.text_to_image("x", height=64, width=64, num_inference_steps=4, sampler="heun", seed=0, output_type="np",
                       callback=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and {s[1] for s in seen} == {4}
    assert seen[0][2] == (1, 8, 8, 4)


@pytest.mark.parametrize("kwargs", [dict(height=60), dict(width=0), dict(num_inference_steps=0),
                                    dict(guidance_scale=float("nan")), dict(sampler="nope"), dict(seed=-1),
                                    dict(batch_size=0), dict(latents=np.zeros((1, 4, 4, 4)))])
def test_bad_arguments_raise_input_error(pipe, kwargs):
    with pytest.raises(InputError):
        pipe.text_to_image("x", **{"height": 64, "width": 64, "num_inference_steps": 2, **kwargs})
