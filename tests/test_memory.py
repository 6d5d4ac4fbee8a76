"""Memory-efficient forms against the plain ones: chunked attention, tiled VAE decode, float32 retry."""

import numpy as np
import pytest
import torch

from reference import to_nchw, to_nhwc
from stable_diffusion_tf import StableDiffusion, fast
from stable_diffusion_tf.vae import tiled_decode


def test_chunked_attention_equals_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 64)).astype(np.float32) for _ in range(3))
    causal = np.triu(np.full((300, 300), -np.inf, np.float32), 1)
    whole = [np.asarray(fast.attention(q, k, v, 4)), np.asarray(fast.attention(q, k, v, 4, bias=causal))]
    monkeypatch.setattr(fast, "MAX_SCORES", 4 * 300 * 7)  # 7 query rows per chunk: 43 chunks, the last short
    chunked = [np.asarray(fast.attention(q, k, v, 4)), np.asarray(fast.attention(q, k, v, 4, bias=causal))]
    for a, b in zip(whole, chunked):  # same sums, chunked in another order: float32 rounding apart
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


def test_tiled_decode_matches_diffusers_and_stays_near_untiled(pipe, reference):
    vae = reference[2]
    vae.tile_latent_min_size, vae.tile_sample_min_size = 4, 32  # tiny tiles: 3 x 4 tiles over 10 x 13 latents
    latents = np.random.default_rng(2).standard_normal((1, 10, 13, 4)).astype(np.float32)
    with torch.no_grad():
        ref = to_nhwc(vae.tiled_decode(to_nchw(latents / 0.18215)).sample)
    ours = tiled_decode(lambda z: np.asarray(pipe.vae.decode(z)), latents / 0.18215, tile=4)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_tiled_decode_approaches_untiled_as_tiles_grow(pipe):
    """One tile covering everything is the plain decode; seams cost less as tiles grow (random weights)."""
    latents = np.random.default_rng(2).standard_normal((1, 32, 32, 4)).astype(np.float32) / 0.18215
    decode = lambda z: np.asarray(pipe.vae.decode(z))  # noqa: E731
    untiled = decode(latents)
    np.testing.assert_array_equal(tiled_decode(decode, latents, tile=48), untiled)  # step 36: one tile
    errors = [np.abs(tiled_decode(decode, latents, tile=t) - untiled).mean() / np.abs(untiled).mean()
              for t in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]


def test_decode_latents_tiles_large_images_only(pipe, monkeypatch):
    from stable_diffusion_tf import decoding

    calls = []
    monkeypatch.setattr(decoding, "tiled_decode", lambda decode, z: calls.append(z.shape) or decode(z))
    monkeypatch.setattr(decoding, "TILED_ABOVE", 8)
    pipe.decode_latents(np.zeros((1, 8, 8, 4), np.float32))
    assert calls == []
    pipe.decode_latents(np.zeros((1, 8, 9, 4), np.float32))
    assert calls == [(1, 8, 9, 4)]


def test_reduced_precision_decode_that_overflows_is_redone_in_float32(checkpoints, pipe, monkeypatch):
    mixed = StableDiffusion.from_pretrained(checkpoints["safetensors"], precision="mixed_bfloat16")
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    real = type(mixed.vae).decode
    monkeypatch.setattr(type(mixed.vae), "decode",
                        lambda self, z: real(self, z) * (np.nan if self is mixed.vae else 1.0))
    images = mixed.decode_latents(latents)
    assert np.isfinite(images).all()
    np.testing.assert_allclose(images, pipe.decode_latents(latents), atol=1e-4, rtol=0)
