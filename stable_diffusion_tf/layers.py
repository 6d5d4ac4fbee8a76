"""The plain blocks of the three networks, named after the diffusers modules they load from.

Attribute names equal checkpoint names (`norm1`, `conv1`, `to_q`, `to_out.0`, ...), so that
`weights.load` can fill every variable by walking attributes. Tensors are channels-last. Each block is
`__init__` (sublayers from sizes) / `build` (every variable, no forward pass) / `call` / `get_config`
(keras-hub's anatomy); the speed forms they run on live in `fast.py`, each tested against its plain twin.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import keras
import tensorflow as tf
from keras import ops

from .fast import Conv2D, GroupNorm, attention, upsample_conv

_EMPTY = contextvars.ContextVar("empty_weights", default=False)


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
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

    def get_config(self) -> dict:
        return {**super().get_config(), **self.arguments()}

    def arguments(self) -> dict:
        """The constructor's arguments (other than name and dtype), for `get_config`."""
        return {}


class Network(keras.Model):
    """A whole network (text encoder, UNet, VAE) made from one frozen config dataclass (`config_class`)."""

    config_class: type

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy), "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.pop("config").items()}
        config["dtype"] = keras.dtype_policies.deserialize(config["dtype"]) if isinstance(config.get("dtype"), dict) \
            else config.get("dtype")
        return cls(cls.config_class(**fields), **config)


def build_leaf(layer: keras.layers.Layer, channels: int, rank: int = 4) -> None:
    """Builds a Dense/Conv2D/norm layer for inputs of `rank` dimensions with `channels` on the last axis."""
    layer.build((None,) * (rank - 1) + (channels,))


def conv(filters: int, kernel: int, name: str, dtype, strides: int = 1) -> Conv2D:
    """A Conv2D that pads like torch's `padding=kernel//2` (only for stride 1; strided convs pad explicitly)."""
    padding = "same" if strides == 1 else "valid"
    return Conv2D(filters, kernel, strides=strides, padding=padding, name=name, dtype=dtype,
                  kernel_initializer=Init("glorot_uniform"), bias_initializer=Init("zeros"))


def dense(units: int, name: str, dtype, use_bias: bool = True) -> keras.layers.Dense:
    """A Dense layer (torch Linear); its variables are made empty inside `empty_weights()`."""
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=dtype,
                              kernel_initializer=Init("glorot_uniform"), bias_initializer=Init("zeros"))


def embedding(count: int, dim: int, name: str, dtype) -> keras.layers.Embedding:
    """An Embedding table (torch Embedding); its variable is made empty inside `empty_weights()`."""
    return keras.layers.Embedding(count, dim, embeddings_initializer=Init("uniform"), name=name, dtype=dtype)


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


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class ResnetBlock2D(Block):
    """diffusers ResnetBlock2D: GN-SiLU-conv, optional time embedding add, GN-SiLU-conv, shortcut."""

    def __init__(self, in_channels, out_channels, groups, eps, temb_channels=None, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.in_channels, self.out_channels, self.temb_channels = in_channels, out_channels, temb_channels
        self.groups, self.eps = groups, eps
        self.norm1 = group_norm(groups, eps, "norm1", dt, silu=True)
        self.conv1 = conv(out_channels, 3, "conv1", dt)
        self.time_emb_proj = dense(out_channels, name="time_emb_proj", dtype=dt) if temb_channels else None
        self.norm2 = group_norm(groups, eps, "norm2", dt, silu=True)
        self.conv2 = conv(out_channels, 3, "conv2", dt)
        self.conv_shortcut = conv(out_channels, 1, "conv_shortcut", dt) if in_channels != out_channels else None

    def arguments(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, groups=self.groups, eps=self.eps,
                    temb_channels=self.temb_channels)

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


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class Attention(Block):
    """diffusers Attention: to_q/to_k/to_v without bias (VAE: with bias), to_out.0 with bias."""

    def __init__(self, dim, heads, bias=False, upcast=False, context_dim=None, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.heads, self.bias, self.upcast = heads, bias, upcast
        self.dim, self.context_dim = dim, context_dim or dim
        self.to_q = dense(dim, use_bias=bias, name="to_q", dtype=dt)
        self.to_k = dense(dim, use_bias=bias, name="to_k", dtype=dt)
        self.to_v = dense(dim, use_bias=bias, name="to_v", dtype=dt)
        self.to_out = [dense(dim, name="to_out.0", dtype=dt)]

    def arguments(self) -> dict:
        return dict(dim=self.dim, heads=self.heads, bias=self.bias, upcast=self.upcast, context_dim=self.context_dim)

    def build(self, input_shape=None):
        for layer, channels in ((self.to_q, self.dim), (self.to_k, self.context_dim), (self.to_v, self.context_dim),
                                (self.to_out[0], self.dim)):
            build_leaf(layer, channels, rank=3)

    def call(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out)


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class GEGLU(Block):
    """GELU-gated linear unit (Shazeer 2020): proj -> (h, gate) -> h * gelu(gate), exact erf GELU."""

    def __init__(self, dim, inner, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.inner = dim, inner
        self.proj = dense(inner * 2, name="proj", dtype=self.dtype_policy)

    def arguments(self) -> dict:
        return dict(dim=self.dim, inner=self.inner)

    def build(self, input_shape=None):
        build_leaf(self.proj, self.dim, rank=3)

    def call(self, x):
        h, gate = ops.split(self.proj(x), 2, axis=-1)
        g = ops.cast(gate, "float32")  # written out: about twice as fast on CPU as ops.gelu, the same function
        return h * ops.cast(0.5 * g * (1.0 + ops.erf(g * math.sqrt(0.5))), h.dtype)


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class FeedForward(Block):
    """diffusers FeedForward: `net.0` GEGLU, `net.1` dropout (identity at inference), `net.2` Linear."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.dim, self.inner = dim, dim * 4
        self.net = [GEGLU(dim, self.inner, name="net.0", dtype=dt), keras.layers.Identity(name="net.1"),
                    dense(dim, name="net.2", dtype=dt)]

    def arguments(self) -> dict:
        return dict(dim=self.dim)

    def build(self, input_shape=None):
        self.net[0].build()
        build_leaf(self.net[2], self.inner, rank=3)

    def call(self, x):
        return self.net[2](self.net[0](x))


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class BasicTransformerBlock(Block):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim, heads, context_dim, upcast=False, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.dim, self.heads, self.context_dim, self.upcast = dim, heads, context_dim, upcast
        self.norm1 = layer_norm(1e-5, "norm1", dt)
        self.attn1 = Attention(dim, heads, upcast=upcast, name="attn1", dtype=dt)
        self.norm2 = layer_norm(1e-5, "norm2", dt)
        self.attn2 = Attention(dim, heads, upcast=upcast, context_dim=context_dim, name="attn2", dtype=dt)
        self.norm3 = layer_norm(1e-5, "norm3", dt)
        self.ff = FeedForward(dim, name="ff", dtype=dt)

    def arguments(self) -> dict:
        return dict(dim=self.dim, heads=self.heads, context_dim=self.context_dim, upcast=self.upcast)

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


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class Transformer2DModel(Block):
    """Spatial transformer: GN, proj_in, transformer blocks over H*W tokens, proj_out, residual.

    proj_in/proj_out are Dense: SD 2.x's linear projections and SD 1.x's 1x1 convs (the same map) both load.
    """

    def __init__(self, channels, heads, depth, groups, context_dim, upcast=False, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.channels, self.heads, self.depth, self.groups = channels, heads, depth, groups
        self.context_dim, self.upcast = context_dim, upcast
        self.norm = group_norm(groups, 1e-6, "norm", dt)
        self.proj_in = dense(channels, name="proj_in", dtype=dt)
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, context_dim, upcast, name=f"transformer_blocks.{i}", dtype=dt)
            for i in range(depth)
        ]
        self.proj_out = dense(channels, name="proj_out", dtype=dt)

    def arguments(self) -> dict:
        return dict(channels=self.channels, heads=self.heads, depth=self.depth, groups=self.groups,
                    context_dim=self.context_dim, upcast=self.upcast)

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


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class Downsample2D(Block):
    """Stride-2 3x3 conv; pads (1,1) like the UNet's torch conv, or (0,1) like the VAE encoder."""

    def __init__(self, channels, asymmetric=False, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.asymmetric = channels, asymmetric
        self.pad = ((0, 1), (0, 1)) if asymmetric else ((1, 1), (1, 1))
        self.conv = conv(channels, 3, "conv", self.dtype_policy, strides=2)

    def arguments(self) -> dict:
        return dict(channels=self.channels, asymmetric=self.asymmetric)

    def build(self, input_shape=None):
        build_leaf(self.conv, self.channels)

    def call(self, x):
        return self.conv(ops.pad(x, ((0, 0), *self.pad, (0, 0))))


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class Upsample2D(Block):
    """Nearest-neighbour upsampling (2x, or to the skip's size when the latent size is odd) then a 3x3 conv."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = conv(channels, 3, "conv", self.dtype_policy)

    def arguments(self) -> dict:
        return dict(channels=self.channels)

    def build(self, input_shape=None):
        build_leaf(self.conv, self.channels)

    def call(self, x, size=None):
        h, w = x.shape[1], x.shape[2]
        if size is None or tuple(size) == (2 * h, 2 * w):
            return upsample_conv(x, self.conv)
        # torch's F.interpolate(mode="nearest", size=...) takes source index floor(i * in / out)
        rows = (ops.arange(size[0]) * h) // size[0]
        cols = (ops.arange(size[1]) * w) // size[1]
        return self.conv(ops.take(ops.take(x, rows, axis=1), cols, axis=2))
