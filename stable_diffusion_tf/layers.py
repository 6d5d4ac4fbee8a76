"""Blocks shared by the UNet and the VAE, named after the diffusers modules they load from.

Attribute names equal checkpoint names (`norm1`, `conv1`, `to_q`, `to_out.0`, ...), so that
`weights.load` can fill every variable by walking attributes. Tensors are channels-last.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import keras
import tensorflow as tf
from keras import ops

_EMPTY = contextvars.ContextVar("empty_weights", default=False)


class Init(keras.initializers.Initializer):
    """A Keras initializer (random or constant, as usual) that makes empty tensors inside `empty_weights()`."""

    def __init__(self, initializer="glorot_uniform"):
        self.initializer = keras.initializers.get(initializer)

    def __call__(self, shape, dtype=None):
        if _EMPTY.get():  # memory allocated, not written: the loader assigns every variable
            return tf.raw_ops.Empty(shape=list(shape), dtype=tf.as_dtype(dtype or "float32"), init=False)
        return self.initializer(shape, dtype=dtype)

    def get_config(self):
        return {"initializer": keras.initializers.serialize(self.initializer)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.initializers.deserialize(config["initializer"]))


@contextlib.contextmanager
def empty_weights():
    """Layers built inside get variables without values (no random draw over a billion weights), for a
    loader that assigns every one of them; outside, the same layers start from Keras' usual initial values."""
    token = _EMPTY.set(True)
    try:
        yield
    finally:
        _EMPTY.reset(token)


class Block(keras.layers.Layer):
    """Base of every container layer: `build()` creates all its variables from the sizes it was made with.

    Containers build their sublayers explicitly (keras-hub style), so a whole network is built without
    running it: no dummy forward pass, whatever the input shape given (the sizes come from the config).
    """

    def build(self, input_shape=None):
        raise NotImplementedError


def build_leaf(layer: keras.layers.Layer, channels: int, rank: int = 4) -> None:
    """Builds a Dense/Conv2D/norm layer for inputs of `rank` dimensions with `channels` on the last axis."""
    layer.build((None,) * (rank - 1) + (channels,))


def conv(filters: int, kernel: int, name: str, dtype, strides: int = 1) -> Conv2D:
    """A Conv2D that pads like torch's `padding=kernel//2` (only for stride 1; strided convs pad explicitly)."""
    padding = "same" if strides == 1 else "valid"
    return Conv2D(filters, kernel, strides=strides, padding=padding, name=name, dtype=dtype,
                  kernel_initializer=Init("glorot_uniform"), bias_initializer=Init("zeros"))


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


def dense(units: int, name: str, dtype, use_bias: bool = True) -> keras.layers.Dense:
    """A Dense layer (torch Linear); its variables are made empty inside `empty_weights()`."""
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=dtype,
                              kernel_initializer=Init("glorot_uniform"), bias_initializer=Init("zeros"))


def embedding(count: int, dim: int, name: str, dtype) -> keras.layers.Embedding:
    """An Embedding table (torch Embedding); its variable is made empty inside `empty_weights()`."""
    return keras.layers.Embedding(count, dim, embeddings_initializer=Init("uniform"), name=name, dtype=dtype)


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


def group_norm(groups: int, eps: float, name: str, dtype, silu: bool = False) -> GroupNorm:
    """GroupNorm (statistics in float32, weights float32), then SiLU if `silu`; output in `dtype`'s compute dtype."""
    return GroupNorm(groups, eps, silu=silu, output_dtype=keras.dtype_policies.get(dtype).compute_dtype,
                     name=name, dtype=_float32_policy(dtype), gamma_initializer=Init("ones"),
                     beta_initializer=Init("zeros"))


def layer_norm(eps: float, name: str, dtype) -> keras.layers.LayerNormalization:
    """LayerNorm over the last axis, statistics in float32."""
    return keras.layers.LayerNormalization(epsilon=eps, name=name, dtype=_float32_policy(dtype),
                                           gamma_initializer=Init("ones"), beta_initializer=Init("zeros"))


def _float32_policy(dtype):
    """Keeps normalisation in float32 in reduced precision (as torch autocast does)."""
    policy = keras.dtype_policies.get(dtype)
    return "float32" if policy.compute_dtype != "float32" else policy


def timestep_embedding(timesteps, dim: int):
    """Sinusoidal embedding with diffusers' flip_sin_to_cos=True, freq_shift=0 (cos first)."""
    half = dim // 2
    exponent = -math.log(10000.0) * ops.arange(half, dtype="float32") / half
    args = ops.cast(ops.reshape(timesteps, (-1, 1)), "float32") * ops.exp(exponent)[None, :]
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


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


class ResnetBlock2D(Block):
    """diffusers ResnetBlock2D: GN-SiLU-conv, optional time embedding add, GN-SiLU-conv, shortcut."""

    def __init__(self, in_channels, out_channels, groups, eps, temb_channels=None, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.in_channels, self.out_channels, self.temb_channels = in_channels, out_channels, temb_channels
        self.norm1 = group_norm(groups, eps, "norm1", dt, silu=True)
        self.conv1 = conv(out_channels, 3, "conv1", dt)
        self.time_emb_proj = dense(out_channels, name="time_emb_proj", dtype=dt) if temb_channels else None
        self.norm2 = group_norm(groups, eps, "norm2", dt, silu=True)
        self.conv2 = conv(out_channels, 3, "conv2", dt)
        self.conv_shortcut = conv(out_channels, 1, "conv_shortcut", dt) if in_channels != out_channels else None

    def build(self, input_shape=None):
        for layer in (self.norm1, self.conv1, self.conv_shortcut):
            if layer is not None:
                build_leaf(layer, self.in_channels)
        if self.time_emb_proj is not None:
            build_leaf(self.time_emb_proj, self.temb_channels, rank=2)
        build_leaf(self.norm2, self.out_channels)
        build_leaf(self.conv2, self.out_channels)

    def call(self, x, temb=None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(ops.silu(temb))[:, None, None, :]
        h = self.conv2(self.norm2(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(Block):
    """diffusers Attention: to_q/to_k/to_v without bias (VAE: with bias), to_out.0 with bias."""

    def __init__(self, dim, heads, bias=False, upcast=False, context_dim=None, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.heads = heads
        self.upcast = upcast
        self.dim, self.context_dim = dim, context_dim or dim
        self.to_q = dense(dim, use_bias=bias, name="to_q", dtype=dt)
        self.to_k = dense(dim, use_bias=bias, name="to_k", dtype=dt)
        self.to_v = dense(dim, use_bias=bias, name="to_v", dtype=dt)
        self.to_out = [dense(dim, name="to_out.0", dtype=dt)]

    def build(self, input_shape=None):
        for layer, channels in ((self.to_q, self.dim), (self.to_k, self.context_dim), (self.to_v, self.context_dim),
                                (self.to_out[0], self.dim)):
            build_leaf(layer, channels, rank=3)

    def call(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(Block):
    """GELU-gated linear unit (Shazeer 2020): proj -> (h, gate) -> h * gelu(gate), exact erf GELU."""

    def __init__(self, dim, inner, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.proj = dense(inner * 2, name="proj", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        build_leaf(self.proj, self.dim, rank=3)

    def call(self, x):
        h, gate = ops.split(self.proj(x), 2, axis=-1)
        g = ops.cast(gate, "float32")  # written out: about twice as fast on CPU as ops.gelu, the same function
        return h * ops.cast(0.5 * g * (1.0 + ops.erf(g * math.sqrt(0.5))), h.dtype)


class FeedForward(Block):
    """diffusers FeedForward: `net.0` GEGLU, `net.1` dropout (identity at inference), `net.2` Linear."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.inner = dim * 4
        self.net = [GEGLU(dim, self.inner, name="net.0", dtype=dt), keras.layers.Identity(name="net.1"),
                    dense(dim, name="net.2", dtype=dt)]

    def build(self, input_shape=None):
        self.net[0].build()
        build_leaf(self.net[2], self.inner, rank=3)

    def call(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(Block):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim, heads, context_dim, upcast=False, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.dim = dim
        self.norm1 = layer_norm(1e-5, "norm1", dt)
        self.attn1 = Attention(dim, heads, upcast=upcast, name="attn1", dtype=dt)
        self.norm2 = layer_norm(1e-5, "norm2", dt)
        self.attn2 = Attention(dim, heads, upcast=upcast, context_dim=context_dim, name="attn2", dtype=dt)
        self.norm3 = layer_norm(1e-5, "norm3", dt)
        self.ff = FeedForward(dim, name="ff", dtype=dt)

    def build(self, input_shape=None):
        for norm in (self.norm1, self.norm2, self.norm3):
            build_leaf(norm, self.dim, rank=3)
        for block in (self.attn1, self.attn2, self.ff):
            block.build()

    def call(self, x, context):
        cast = lambda t: ops.cast(t, self.compute_dtype)  # noqa: E731
        x = x + self.attn1(cast(self.norm1(x)))
        x = x + self.attn2(cast(self.norm2(x)), context)
        return x + self.ff(cast(self.norm3(x)))


class Transformer2DModel(Block):
    """Spatial transformer: GN, proj_in, transformer blocks over H*W tokens, proj_out, residual.

    proj_in/proj_out are Dense: SD 2.x's linear projections and SD 1.x's 1x1 convs (the same map) both load.
    """

    def __init__(self, channels, heads, depth, groups, context_dim, upcast=False, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.channels = channels
        self.norm = group_norm(groups, 1e-6, "norm", dt)
        self.proj_in = dense(channels, name="proj_in", dtype=dt)
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, context_dim, upcast, name=f"transformer_blocks.{i}", dtype=dt)
            for i in range(depth)
        ]
        self.proj_out = dense(channels, name="proj_out", dtype=dt)

    def build(self, input_shape=None):
        build_leaf(self.norm, self.channels)
        build_leaf(self.proj_in, self.channels, rank=3)
        for block in self.transformer_blocks:
            block.build()
        build_leaf(self.proj_out, self.channels, rank=3)

    def call(self, x, context):
        b, h, w, c = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2], x.shape[-1]
        t = self.proj_in(ops.reshape(self.norm(x), (b, h * w, c)))
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + ops.reshape(self.proj_out(t), (b, h, w, c))


class ResolutionBlock(Block):
    """Resnets, optional attentions and an optional down/up sampler at one resolution (UNet and VAE blocks)."""

    def __init__(self, resnets, attentions=None, downsample=None, upsample=None, **kwargs):
        super().__init__(**kwargs)
        self.resnets = resnets
        self.attentions = attentions
        self.downsamplers = [downsample] if downsample is not None else None
        self.upsamplers = [upsample] if upsample is not None else None

    def build(self, input_shape=None):
        for layer in [*self.resnets, *(self.attentions or []), *(self.downsamplers or []), *(self.upsamplers or [])]:
            layer.build()


class Downsample2D(Block):
    """Stride-2 3x3 conv; pads (1,1) like the UNet's torch conv, or (0,1) like the VAE encoder."""

    def __init__(self, channels, asymmetric=False, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.pad = ((0, 1), (0, 1)) if asymmetric else ((1, 1), (1, 1))
        self.conv = conv(channels, 3, "conv", self.dtype_policy, strides=2)

    def build(self, input_shape=None):
        build_leaf(self.conv, self.channels)

    def call(self, x):
        return self.conv(ops.pad(x, ((0, 0), *self.pad, (0, 0))))


class Upsample2D(Block):
    """Nearest-neighbour upsampling (2x, or to the skip's size when the latent size is odd) then a 3x3 conv."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = conv(channels, 3, "conv", self.dtype_policy)

    def build(self, input_shape=None):
        build_leaf(self.conv, self.channels)

    def call(self, x, size=None):
        h, w = x.shape[1], x.shape[2]
        if size is None or tuple(size) == (2 * h, 2 * w):
            return self._upsample_conv(x)
        # torch's F.interpolate(mode="nearest", size=...) takes source index floor(i * in / out)
        rows = (ops.arange(size[0]) * h) // size[0]
        cols = (ops.arange(size[1]) * w) // size[1]
        return self.conv(ops.take(ops.take(x, rows, axis=1), cols, axis=2))

    def _upsample_conv(self, x):
        """conv3x3(nearest_2x(x)) as four 2x2 convs on x, one per output pixel parity, interleaved.

        Output row 2i+p sees input rows (i-1, i, i) when p = 0 and (i, i, i+1) when p = 1, so the 3x3
        kernel folds into 2x2 kernels (taps summed in float32): 16 multiply-adds per output instead of 36.
        The four outputs are concatenated as channels (p, q, c) and spread by depth_to_space: one copy.
        """
        h, w = x.shape[1], x.shape[2]
        # folded when x is ready: in a compiled call the fold needs only the weights, and would otherwise run
        # at the start and hold its kernels (~0.4 GB for the SD UNet's upsamplers) through the whole down path
        with tf.control_dependencies([x]):
            kernel = ops.cast(tf.identity(self.conv.kernel), "float32")
        x = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        outputs = []
        for p in (0, 1):
            k_rows = _fold_taps(kernel, 0, p)
            outputs += [conv2d(x[:, p:p + h + 1, q:q + w + 1], ops.cast(_fold_taps(k_rows, 1, q), x.dtype),
                               "valid")
                        for q in (0, 1)]
        bias = ops.tile(ops.cast(self.conv.bias, x.dtype), (4,))
        return tf.nn.depth_to_space(ops.concatenate(outputs, axis=-1) + bias, 2)


def _fold_taps(kernel, axis: int, parity: int):
    """The 3 taps of `kernel` along `axis` folded to the 2 that a nearest-2x-upsampled input reduces them to."""
    t0, t1, t2 = (ops.take(kernel, i, axis=axis) for i in range(3))
    return ops.stack([t0, t1 + t2] if parity == 0 else [t0 + t1, t2], axis=axis)
