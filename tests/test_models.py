"""Parity of the three networks with diffusers / transformers, loaded from every file layout."""

import numpy as np
import pytest
import torch

from reference import CLIP_KW, assert_unet_matches, to_nchw, to_nhwc
from stable_diffusion_tf import StableDiffusion

LAYOUTS = ["safetensors", "ckpt", "diffusers"]
TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "", "(masterpiece:1.2), a cat 🐱 on a mat, 4k"]


@pytest.fixture(scope="module", params=LAYOUTS)
def pipe(request, checkpoints):
    return StableDiffusion.from_pretrained(checkpoints[request.param])


def test_text_encoder_matches_transformers(pipe, reference):
    text_encoder = reference[0]
    ids = pipe.tokenizer(PROMPTS)
    with torch.no_grad():
        ref = text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    np.testing.assert_allclose(pipe.encode_prompt(PROMPTS), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    last, hidden = pipe.text_encoder(ids, output_hidden_states=True)
    assert len(hidden) == CLIP_KW["num_hidden_layers"] + 1
    for ours, theirs in zip(hidden, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=0)


def test_unet_matches_diffusers(pipe, reference):
    latents, context, ref = assert_unet_matches(pipe, reference[1], CLIP_KW["hidden_size"], TOL)
    single = pipe.predict_noise(latents[:1], 981, context[:1])  # an int timestep broadcasts
    np.testing.assert_allclose(single, ref[:1], atol=TOL, rtol=0)


def test_vae_matches_diffusers(pipe, reference):
    vae = reference[2]
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
    images = rng.uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)
    with torch.no_grad():
        decoded = vae.decode(to_nchw(latents) / vae.config.scaling_factor).sample
        mean = vae.encode(to_nchw(images) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    ref_images = np.clip(to_nhwc(decoded) / 2 + 0.5, 0, 1)
    ours = pipe.decode_latents(latents)
    assert ours.shape == (2, 64, 48, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref_images, atol=TOL, rtol=0)
    np.testing.assert_allclose(pipe.encode_image(images), to_nhwc(mean), atol=TOL, rtol=0)
