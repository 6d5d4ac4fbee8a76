"""The speed forms: each computes what a plain form computes (up to float rounding), faster on CPU.

Each has a test holding it to its plain twin (tests/test_fast_forms.py, tests/test_memory.py):
- `conv2d` / `Conv2D`: a convolution whose output is smaller than its kernel as one matmul (plain: `ops.conv`);
- `GroupNorm`: one fused statistics pass, the normalisation as one scale-and-shift (plain: Keras'
  GroupNormalization);
- `upsample_conv`: a 3x3 convolution of a nearest-2x upsampled image as four 2x2 convolutions of the small one;
- `attention`: scaled dot-product attention in query chunks of at most MAX_SCORES scores, bfloat16 scores
  kept unwidened (plain: one softmax over all the scores).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class Conv2D(keras.layers.Conv2D):
    """keras Conv2D that convolves through `conv2d` (a matmul where the kernel outweighs the patches)."""

    def convolution_op(self, inputs, kernel):
        return conv2d(inputs, kernel, self.padding, self.strides[0])


def conv2d(x, kernel, padding: str = "same", stride: int = 1):
    """Convolution of channels-last x; one matmul over its patches when they are smaller than the kernel.

    oneDNN copies a convolution's kernel into its own blocked layout on every call. For the SD UNet's
    1280-channel convolutions at 16x16 and 8x8 that copy (59-118 MB in float32, fresh pages each time) costs
    more than the convolution. When the output has fewer positions than the kernel has filters, the kh*kw
    shifted views of x stacked as channels (in the kernel's (kh, kw, in) order) are smaller than the kernel,
    and one matmul with the kernel reshaped to (kh*kw*in, out) reads it as it is. Same numbers up to float
    rounding. "same" is only used with stride 1 here, padded as TensorFlow pads it (an even kernel's extra
    row and column at the end).
    """
    b, h, w, c = x.shape
    kh, kw, _, out = kernel.shape
    same = padding == "same"
    if not same and None not in (h, w):
        h, w = (h - kh) // stride + 1, (w - kw) // stride + 1
    if None in (b, h, w) or (same and stride != 1) or b * h * w >= out:
        return ops.conv(x, kernel, strides=stride, padding=padding)
    if same:
        x = ops.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    views = [x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
             for i in range(kh) for j in range(kw)]
    patches = ops.concatenate(views, axis=-1) if len(views) > 1 else views[0]
    y = ops.matmul(ops.reshape(patches, (b * h * w, kh * kw * c)), ops.reshape(kernel, (kh * kw * c, out)))
    return ops.reshape(y, (b, h, w, out))


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class GroupNorm(keras.layers.GroupNormalization):
    """GroupNorm over the channel axis with float32 statistics, optionally followed by SiLU.

    Statistics are per channel (mean, then variance about that mean: two passes, no cancellation),
    pooled per group by the law of total variance; the normalisation is then one scale-and-shift per
    channel. On CPU this is several times faster than Keras' reshape-and-moments layer. The output is
    in `output_dtype` (the block's compute dtype).
    """

    def __init__(self, groups, epsilon, silu=False, output_dtype="float32", **kwargs):
        super().__init__(groups=groups, epsilon=epsilon, **kwargs)
        self.silu, self.output_dtype = silu, output_dtype

    def get_config(self) -> dict:
        return {**super().get_config(), "silu": self.silu, "output_dtype": self.output_dtype}

    def call(self, x):
        b, c, g = ops.shape(x)[0], x.shape[-1], self.groups
        x32 = ops.cast(x, "float32")  # Keras has widened it already under mixed precision
        # (B, 1, 1, C) each; the variance is the mean of squared_difference(x, mean): one fused pass
        channel_mean, channel_var = ops.moments(x32, axes=(1, 2), keepdims=True)
        channel_mean = ops.reshape(channel_mean, (b, g, c // g))
        mean = ops.mean(channel_mean, axis=-1, keepdims=True)  # (B, G, 1)
        var = ops.mean(ops.reshape(channel_var, (b, g, c // g)), axis=-1, keepdims=True) + ops.mean(
            ops.square(channel_mean - mean), axis=-1, keepdims=True)
        per_channel = lambda t: ops.reshape(ops.broadcast_to(t, (b, g, c // g)), (b, 1, 1, c))  # noqa: E731
        scale = per_channel(ops.rsqrt(var + self.epsilon)) * self.gamma
        shift = self.beta - per_channel(mean) * scale
        y = ops.cast(x32 * scale + shift, self.output_dtype)
        return ops.silu(y) if self.silu else y


MAX_SCORES = 2**24  # attention scores per image held at once (64 MB in float32); larger attention is chunked


def attention(q, k, v, heads: int, bias=None, upcast: bool = False):
    """Multi-head scaled dot-product attention on (B, N, heads*d) tensors; softmax accumulates in float32.

    `bias` is added to the float32 scores (e.g. a causal mask of 0 / -inf). With `upcast`, q.k is also
    computed in float32 under mixed precision (diffusers' upcast_attention, which SD 2.1 needs in float16).
    """
    b, n = ops.shape(q)[0], ops.shape(q)[1]
    d = q.shape[-1] // heads

    def split(x):
        return ops.transpose(ops.reshape(x, (b, -1, heads, d)), (0, 2, 1, 3))

    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k = ops.cast(q, "float32"), ops.cast(k, "float32")
    q = q * ops.cast(d**-0.5, q.dtype)  # scaled before q.k: one pass over q instead of one over the scores
    k_t = ops.transpose(k, (0, 1, 3, 2))

    def attend(q_rows, bias_rows):
        scores = ops.matmul(q_rows, k_t)
        # bfloat16 scores (rounded so by the matmul already) are not widened: TensorFlow's bfloat16 softmax
        # accumulates in float32 and rounds once, as the cast back would, and saves two passes over the scores
        if scores.dtype != "bfloat16" or bias_rows is not None:
            scores = ops.cast(scores, "float32")
            scores = scores if bias_rows is None else scores + ops.cast(bias_rows, "float32")
        return ops.matmul(ops.cast(ops.softmax(scores, axis=-1), v.dtype), v)

    n_q, n_k = q.shape[2], k.shape[2]
    if n_q is None or n_k is None:  # shapes unknown while tracing: one block
        out = attend(q, bias)
    else:  # memory-efficient form: queries in chunks, at most MAX_SCORES scores per image at once
        rows = max(1, min(n_q, MAX_SCORES // (heads * n_k)))
        chunks = [attend(q[:, :, i:i + rows], None if bias is None else bias[..., i:i + rows, :])
                  for i in range(0, n_q, rows)]
        out = ops.concatenate(chunks, axis=2) if len(chunks) > 1 else chunks[0]
    return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, n, heads * d))


def upsample_conv(x, conv: Conv2D):
    """conv(nearest_2x(x)) for a 3x3 `conv`, as four 2x2 convs on x, one per output pixel parity, interleaved.

    Output row 2i+p sees input rows (i-1, i, i) when p = 0 and (i, i, i+1) when p = 1, so the 3x3
    kernel folds into 2x2 kernels (taps summed in float32): 16 multiply-adds per output instead of 36.
    The four outputs are concatenated as channels (p, q, c) and spread by depth_to_space: one copy.
    """
    h, w = x.shape[1], x.shape[2]
    # folded when x is ready: in a compiled call the fold needs only the weights, and would otherwise run
    # at the start and hold its kernels (~0.4 GB for the SD UNet's upsamplers) through the whole down path
    with tf.control_dependencies([x]):
        kernel = ops.cast(tf.identity(conv.kernel), "float32")
    x = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    outputs = []
    for p in (0, 1):
        k_rows = _fold_taps(kernel, 0, p)
        outputs += [conv2d(x[:, p:p + h + 1, q:q + w + 1], ops.cast(_fold_taps(k_rows, 1, q), x.dtype),
                           "valid")
                    for q in (0, 1)]
    bias = ops.tile(ops.cast(conv.bias, x.dtype), (4,))
    return tf.nn.depth_to_space(ops.concatenate(outputs, axis=-1) + bias, 2)


def _fold_taps(kernel, axis: int, parity: int):
    """The 3 taps of `kernel` along `axis` folded to the 2 that a nearest-2x-upsampled input reduces them to."""
    t0, t1, t2 = (ops.take(kernel, i, axis=axis) for i in range(3))
    return ops.stack([t0, t1 + t2] if parity == 0 else [t0 + t1, t2], axis=axis)
