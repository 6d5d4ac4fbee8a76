"""Parity of the three networks with diffusers / transformers, loaded from every file layout."""

import numpy as np
import pytest
import torch

from reference import CLIP_KW, assert_unet_matches, to_nchw, to_nhwc
from stable_diffusion_tf import StableDiffusion

LAYOUTS = ["safetensors", "ckpt", "diffusers"]
TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "", "masterpiece, a cat 🐱 on a mat, 4k"]


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


@pytest.mark.parametrize("network", ["text_encoder", "unet", "vae"])
def test_networks_round_trip_through_their_config(checkpoints, network):
    """get_config / from_config rebuild the same network: same variables, and with the same weights, same output."""
    pipe = StableDiffusion.from_pretrained(checkpoints["safetensors"])
    original = getattr(pipe, network)
    copy = type(original).from_config(original.get_config())
    copy.build()
    assert copy.config == original.config and copy.name == original.name
    assert [(v.path, tuple(v.shape)) for v in copy.weights] == [(v.path, tuple(v.shape)) for v in original.weights]
    copy.set_weights(original.get_weights())
    rng = np.random.default_rng(0)
    if network == "text_encoder":
        inputs = (pipe.tokenizer(["a cat"]),)
    elif network == "unet":
        inputs = (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([10.0], np.float32),
                  pipe.encode_prompt(["a cat"]))
    else:
        inputs = (rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32),)
    np.testing.assert_array_equal(np.asarray(copy(*inputs)), np.asarray(original(*inputs)))


def test_blocks_round_trip_through_their_config():
    from stable_diffusion_tf import layers

    for block in [layers.ResnetBlock2D(8, 16, 4, 1e-5, temb_channels=12, name="r"),
                  layers.Attention(16, 2, bias=True, upcast=True, context_dim=12, name="a"),
                  layers.Transformer2DModel(16, 2, 1, 4, 12, name="t"), layers.Downsample2D(8, True, name="d"),
                  layers.Upsample2D(8, name="u"), layers.group_norm(4, 1e-6, "g", "mixed_bfloat16", silu=True)]:
        config = block.get_config()
        assert type(block).from_config(config).get_config() == config
