"""The fast forms against the plain ones: one-pass group norm, folded upsample convolution, 16-bit weights."""

import keras
import numpy as np
import pytest
from keras import ops

from stable_diffusion_tf import StableDiffusion, fast, layers
from stable_diffusion_tf.weights.assign import leaf_layers


def _group_norm_float64(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    return ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + eps)).reshape(x.shape)


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_group_norm_is_exact_even_when_channel_means_dwarf_the_spread(offset):
    """Per-channel statistics about each channel's own mean: no E[x^2] - E[x]^2 cancellation."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 12, 10, 64)) + offset * (1 + 0.1 * rng.standard_normal(64))).astype(np.float32)
    norm = layers.group_norm(32, 1e-6, "norm", "float32")
    out = np.asarray(norm(x))
    # float32 inputs of size ~offset carry rounding of offset * 6e-8; the normalised values inherit it
    np.testing.assert_allclose(out, _group_norm_float64(x, 32, 1e-6), atol=2e-6 + offset * 1e-7, rtol=0)


def test_group_norm_matches_keras_layer_with_silu_and_output_dtype():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32) * 3 + 1
    ours = layers.group_norm(8, 1e-5, "norm", "float32", silu=True)
    plain = keras.layers.GroupNormalization(groups=8, epsilon=1e-5)
    ours.build(x.shape), plain.build(x.shape)
    for layer in (ours, plain):
        layer.gamma.assign(np.linspace(0.5, 2, 32)), layer.beta.assign(np.linspace(-1, 1, 32))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(ops.silu(plain(x))), atol=1e-5)
    half = layers.group_norm(8, 1e-5, "norm", "bfloat16", silu=True)
    assert half.dtype_policy.name == "float32" and half(x).dtype == "bfloat16"  # float32 inside, bfloat16 out


@pytest.mark.parametrize("shape", [(1, 5, 7, 6), (2, 4, 4, 16)])
def test_folded_upsample_conv_equals_conv_of_nearest_upsample(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    up = layers.Upsample2D(shape[-1], dtype="float32")
    up(x)  # builds the conv on first use
    up.conv.kernel.assign(rng.standard_normal(up.conv.kernel.shape).astype(np.float32))
    up.conv.bias.assign(rng.standard_normal(up.conv.bias.shape).astype(np.float32))
    folded = np.asarray(up(x))
    plain = np.asarray(up.conv(np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)))
    assert folded.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
    np.testing.assert_allclose(folded, plain, atol=1e-5, rtol=2e-6)  # the same sums in another order
    odd = (2 * shape[1] + 1, 2 * shape[2] - 1)  # sizes set by an odd skip connection take the plain path
    assert np.asarray(up(x, size=odd)).shape[1:3] == odd


@pytest.mark.parametrize("shape, kernel, out, padding, stride", [
    ((2, 4, 4, 24), 3, 40, "same", 1), ((1, 3, 5, 8), 3, 20, "same", 1), ((2, 5, 5, 8), 2, 64, "valid", 1),
    ((2, 4, 4, 8), 2, 40, "same", 1), ((1, 9, 9, 8), 3, 20, "valid", 2), ((1, 10, 10, 8), 3, 20, "valid", 2),
    ((2, 3, 3, 16), 1, 20, "same", 1), ((2, 8, 8, 8), 3, 16, "same", 1)])
def test_convolution_as_one_matmul_equals_the_convolution(monkeypatch, shape, kernel, out, padding, stride):
    """conv2d: patches times the reshaped kernel where the output has fewer positions than filters."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, shape[-1], out)).astype(np.float32)
    expected = np.asarray(ops.conv(x, w, strides=stride, padding=padding))
    matmuls = []
    monkeypatch.setattr(fast.ops, "matmul", lambda a, b: matmuls.append(a.shape) or ops.numpy.matmul(a, b))
    got = np.asarray(fast.conv2d(ops.convert_to_tensor(x), ops.convert_to_tensor(w), padding, stride))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    positions = int(np.prod(expected.shape[:3]))
    assert matmuls == ([(positions, kernel * kernel * shape[-1])] if positions < out else [])


@pytest.fixture(scope="module")
def pipes(checkpoints):
    return (StableDiffusion.from_pretrained(checkpoints["safetensors"]),
            StableDiffusion.from_pretrained(checkpoints["safetensors"], precision="mixed_bfloat16"))


def test_reduced_precision_holds_weights_in_bfloat16(pipes):
    full, half = pipes
    for a, b in [(full.unet, half.unet), (full.vae, half.vae), (full.text_encoder, half.text_encoder)]:
        norms = (keras.layers.GroupNormalization, keras.layers.LayerNormalization)
        for name, leaf in leaf_layers(b).items():
            want = "float32" if isinstance(leaf, norms) else "bfloat16"
            assert {v.dtype for v in leaf.weights} == {want}, name
        for va, vb in zip(a.weights, b.weights):  # the same file values, rounded once to bfloat16
            np.testing.assert_array_equal(np.asarray(va).astype(vb.dtype), np.asarray(vb))
    bytes_ = lambda m: sum(np.asarray(v).nbytes for v in m.weights)  # noqa: E731
    assert bytes_(half.unet) < 0.51 * bytes_(full.unet)


def test_bfloat16_generation_stays_near_float32(pipes):
    kw = dict(height=64, width=48, num_inference_steps=4, seed=3, output_type="np", negative_prompt="blur")
    full, half = (p.text_to_image("a red cube", **kw).images for p in pipes)
    diff = np.abs(full - half)
    assert diff.max() < 0.15 and diff.mean() < 0.02, (diff.max(), diff.mean())  # bfloat16 keeps ~3 digits


def test_bfloat16_attention_matches_float64_within_bfloat16_rounding():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 300, 64)).astype(np.float32) for _ in range(3))
    half = [ops.cast(x, "bfloat16") for x in (q, k, v)]
    out = np.asarray(ops.cast(fast.attention(*half, heads=2), "float32"))
    q64, k64, v64 = (np.asarray(ops.cast(x, "float32"), np.float64).reshape(2, 300, 2, 32) for x in half)
    scores = np.einsum("bnhd,bmhd->bhnm", q64, k64) / np.sqrt(32)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhnm,bmhd->bnhd", probs / probs.sum(-1, keepdims=True), v64).reshape(2, 300, 64)
    assert np.abs(out - expected).max() < 0.01  # inputs exact in both; bfloat16 q, scores, probabilities, output
    np.testing.assert_allclose(out.mean(), expected.mean(), atol=1e-3)
