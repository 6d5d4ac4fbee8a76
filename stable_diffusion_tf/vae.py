"""The KL-regularised autoencoder (Rombach et al. 2022, Sec. 3.1), laid out as diffusers' AutoencoderKL."""

from __future__ import annotations

import numpy as np
import keras
from keras import ops

from .config import VAEConfig
from .layers import (Attention, Block, Downsample2D, Network, ResnetBlock2D, ResolutionBlock, Upsample2D, build_leaf,
                     conv, group_norm)

EPS = 1e-6  # every norm in the VAE


class VAEAttention(Attention):
    """Single-head self-attention over H*W with its own GroupNorm and a residual (diffusers `mid_block.attentions.0`)."""

    def __init__(self, channels, groups, **kwargs):
        super().__init__(channels, 1, bias=True, **kwargs)
        self.group_norm = group_norm(groups, EPS, "group_norm", self.dtype_policy)

    def build(self, input_shape=None):
        build_leaf(self.group_norm, self.dim)
        super().build()

    def call(self, x):
        b, h, w, c = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2], x.shape[-1]
        t = ops.reshape(self.group_norm(x), (b, h * w, c))
        return x + ops.reshape(super().call(t), (b, h, w, c))


class VAEBlock(ResolutionBlock):
    """Resnets (no time embedding) and an optional down/up sampler; with `mid`, resnet-attention-resnet."""

    def call(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions and i == 0:
                x = self.attentions[0](x)
        if self.downsamplers:
            x = self.downsamplers[0](x)
        if self.upsamplers:
            x = self.upsamplers[0](x)
        return x


def _resnet(cin, cout, groups, name, dt):
    return ResnetBlock2D(cin, cout, groups, EPS, name=name, dtype=dt)


def _mid_block(channels, groups, dt):
    return VAEBlock([_resnet(channels, channels, groups, "resnets.0", dt),
                     _resnet(channels, channels, groups, "resnets.1", dt)],
                    [VAEAttention(channels, groups, name="attentions.0", dtype=dt)], name="mid_block", dtype=dt)


class Encoder(Block):
    """Image (B, H, W, 3) in [-1, 1] -> moments (B, H/8, W/8, 2 * latent_channels)."""

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        dt, ch, g = self.dtype_policy, config.block_out_channels, config.norm_num_groups
        self.config = config
        self.conv_in = conv(ch[0], 3, "conv_in", dt)
        self.down_blocks = []
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            resnets = [_resnet(cin if j == 0 else cout, cout, g, f"resnets.{j}", dt)
                       for j in range(config.layers_per_block)]
            # CompVis pads (right, bottom) by one before the stride-2 conv, unlike the UNet
            down = Downsample2D(cout, asymmetric=True, name="downsamplers.0", dtype=dt) if i < len(ch) - 1 else None
            self.down_blocks.append(VAEBlock(resnets, downsample=down, name=f"down_blocks.{i}", dtype=dt))
        self.mid_block = _mid_block(ch[-1], g, dt)
        self.conv_norm_out = group_norm(g, EPS, "conv_norm_out", dt, silu=True)
        self.conv_out = conv(2 * config.latent_channels, 3, "conv_out", dt)

    def build(self, input_shape=None):
        build_leaf(self.conv_in, self.config.in_channels)
        for block in (*self.down_blocks, self.mid_block):
            block.build()
        build_leaf(self.conv_norm_out, self.config.block_out_channels[-1])
        build_leaf(self.conv_out, self.config.block_out_channels[-1])

    def call(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(Block):
    """Latents (B, h, w, latent_channels) -> image (B, 8h, 8w, 3) in about [-1, 1]."""

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        dt, ch, g = self.dtype_policy, config.block_out_channels, config.norm_num_groups
        self.config = config
        self.conv_in = conv(ch[-1], 3, "conv_in", dt)
        self.mid_block = _mid_block(ch[-1], g, dt)
        self.up_blocks = []
        prev = ch[-1]
        for i, level in enumerate(reversed(range(len(ch)))):
            cout = ch[level]
            resnets = [_resnet(prev if j == 0 else cout, cout, g, f"resnets.{j}", dt)
                       for j in range(config.layers_per_block + 1)]
            up = Upsample2D(cout, name="upsamplers.0", dtype=dt) if level > 0 else None
            self.up_blocks.append(VAEBlock(resnets, upsample=up, name=f"up_blocks.{i}", dtype=dt))
            prev = cout
        self.conv_norm_out = group_norm(g, EPS, "conv_norm_out", dt, silu=True)
        self.conv_out = conv(config.out_channels, 3, "conv_out", dt)

    def build(self, input_shape=None):
        build_leaf(self.conv_in, self.config.latent_channels)
        for block in (self.mid_block, *self.up_blocks):
            block.build()
        build_leaf(self.conv_norm_out, self.config.block_out_channels[0])
        build_leaf(self.conv_out, self.config.block_out_channels[0])

    def call(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class AutoencoderKL(Network):
    """Encoder/decoder pair with the 1x1 `quant_conv` / `post_quant_conv` around the latent."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.config = config
        self.encoder = Encoder(config, name="encoder", dtype=dt)
        self.decoder = Decoder(config, name="decoder", dtype=dt)
        self.quant_conv = conv(2 * config.latent_channels, 1, "quant_conv", dt)
        self.post_quant_conv = conv(config.latent_channels, 1, "post_quant_conv", dt)

    def build(self, input_shape=None):
        """Creates every variable from the config's sizes (no forward pass)."""
        self.encoder.build()
        self.decoder.build()
        build_leaf(self.quant_conv, 2 * self.config.latent_channels)
        build_leaf(self.post_quant_conv, self.config.latent_channels)

    def encode(self, images):
        """Images (B, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, H/8, W/8, C), unscaled."""
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = ops.split(moments, 2, axis=-1)
        return mean, ops.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents (B, h, w, C) -> images (B, 8h, 8w, 3) in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def call(self, images):
        return self.decode(self.encode(images)[0])


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """Fades the last `extent` rows (axis 1) or columns (axis 2) of `a` into the first ones of `b`, in place."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    for y in range(extent):
        w = y / extent
        if axis == 1:
            b[:, y] = a[:, y - extent] * (1 - w) + b[:, y] * w
        else:
            b[:, :, y] = a[:, :, y - extent] * (1 - w) + b[:, :, y] * w


def tiled_decode(decode, latents: np.ndarray, tile: int = 64, overlap: float = 0.25, factor: int = 8) -> np.ndarray:
    """Decodes (B, h, w, C) latents in overlapping tiles whose seams are blended linearly.

    The algorithm of diffusers' AutoencoderKL.tiled_decode (tiles of `tile` latents, stepping by
    tile * (1 - overlap), blending tile * factor * overlap pixels), so memory stays that of one tile.
    """
    step = int(tile * (1 - overlap))
    extent = int(tile * factor * overlap)
    limit = tile * factor - extent
    rows = [[np.array(decode(latents[:, i:i + tile, j:j + tile]), dtype=np.float32)
             for j in range(0, latents.shape[2], step)] for i in range(0, latents.shape[1], step)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, piece in enumerate(row):  # blended in place: later tiles blend with already blended ones
            if i > 0:
                _blend(rows[i - 1][j], piece, extent, axis=1)
            if j > 0:
                _blend(row[j - 1], piece, extent, axis=2)
        out_rows.append(np.concatenate([piece[:, :limit, :limit] for piece in row], axis=2))
    return np.concatenate(out_rows, axis=1)
