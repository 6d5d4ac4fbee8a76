"""The latent-diffusion UNet (Rombach et al. 2022, Sec. 3.3), laid out as diffusers' UNet2DConditionModel."""

from __future__ import annotations

import keras
from keras import ops

from .config import UNetConfig
from .layers import (Block, Downsample2D, Network, ResnetBlock2D, ResolutionBlock, Transformer2DModel, Upsample2D,
                     build_leaf, conv, dense, group_norm, timestep_embedding)


class TimestepEmbedding(Block):
    """linear_1 -> SiLU -> linear_2 on the sinusoidal timestep features."""

    def __init__(self, in_dim, dim, **kwargs):
        super().__init__(**kwargs)
        self.in_dim, self.dim = in_dim, dim
        self.linear_1 = dense(dim, name="linear_1", dtype=self.dtype_policy)
        self.linear_2 = dense(dim, name="linear_2", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        build_leaf(self.linear_1, self.in_dim, rank=2)
        build_leaf(self.linear_2, self.dim, rank=2)

    def call(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))


class UNetBlock(ResolutionBlock):
    """One resolution level: resnets, each optionally followed by a spatial transformer, then a resampler.

    Used for down blocks (`downsamplers.0`), up blocks (`upsamplers.0`, skip inputs concatenated)
    and, with one transformer between two resnets, the mid block.
    """

    def __init__(self, resnets, attentions, downsample=None, upsample=None, mid=False, **kwargs):
        super().__init__(resnets, attentions, downsample, upsample, **kwargs)
        self.mid = mid

    def call(self, x, temb, context, skips=None, upsample_size=None):
        """Returns the output and, for down blocks, the hidden states each sub-step adds to the skips."""
        outputs = []
        if self.mid:
            x = self.resnets[0](x, temb)
            x = self.attentions[0](x, context)
            return self.resnets[1](x, temb), outputs
        for i, resnet in enumerate(self.resnets):
            if skips is not None:  # the up path consumes the skips last-in, first-out
                x = ops.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            outputs.append(x)
        if self.downsamplers:
            x = self.downsamplers[0](x)
            outputs.append(x)
        if self.upsamplers:
            x = self.upsamplers[0](x, size=upsample_size)
        return x, outputs


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class UNet(Network):
    """eps_theta(z_t, t, c): noise prediction from latents (B, h, w, C), timesteps (B,) and text (B, 77, D)."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        dt = self.dtype_policy
        ch = config.block_out_channels
        groups, eps = config.norm_num_groups, config.norm_eps
        n = len(ch)

        def resnet(cin, cout, name):
            return ResnetBlock2D(cin, cout, groups, eps, temb_channels=config.time_embed_dim, name=name, dtype=dt)

        def transformer(channels, heads, level, name):
            return Transformer2DModel(channels, heads, config.depth(level), groups, config.cross_attention_dim,
                                      upcast=config.upcast_attention, name=name, dtype=dt)

        self.conv_in = conv(ch[0], 3, "conv_in", dt)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim, name="time_embedding", dtype=dt)
        if config.addition_time_embed_dim:  # SDXL: pooled text + Fourier-embedded time ids, added to the time embedding
            self.add_embedding = TimestepEmbedding(config.addition_input_dim, config.time_embed_dim,
                                                   name="add_embedding", dtype=dt)

        self.down_blocks = []
        skip_channels = [ch[0]]
        for i in range(n):
            cin, cout, attn = ch[max(i - 1, 0)], ch[i], config.attention_levels[i]
            prefix = f"down_blocks.{i}"
            resnets = [resnet(cin if j == 0 else cout, cout, f"resnets.{j}") for j in range(config.layers_per_block)]
            attentions = [transformer(cout, config.num_attention_heads[i], i, f"attentions.{j}")
                          for j in range(config.layers_per_block)] if attn else None
            down = Downsample2D(cout, name="downsamplers.0", dtype=dt) if i < n - 1 else None
            self.down_blocks.append(UNetBlock(resnets, attentions, downsample=down, name=prefix, dtype=dt))
            skip_channels += [cout] * (config.layers_per_block + (1 if down else 0))

        self.mid_block = UNetBlock(
            [resnet(ch[-1], ch[-1], "resnets.0"), resnet(ch[-1], ch[-1], "resnets.1")],
            [transformer(ch[-1], config.num_attention_heads[-1], -1, "attentions.0")],
            mid=True, name="mid_block", dtype=dt,
        )

        self.up_blocks = []
        prev = ch[-1]
        for i, level in enumerate(reversed(range(n))):
            cout, attn = ch[level], config.attention_levels[level]
            resnets = []
            for j in range(config.layers_per_block + 1):
                resnets.append(resnet((prev if j == 0 else cout) + skip_channels.pop(), cout, f"resnets.{j}"))
            attentions = [transformer(cout, config.num_attention_heads[level], level, f"attentions.{j}")
                          for j in range(config.layers_per_block + 1)] if attn else None
            up = Upsample2D(cout, name="upsamplers.0", dtype=dt) if level > 0 else None
            self.up_blocks.append(UNetBlock(resnets, attentions, upsample=up, name=f"up_blocks.{i}", dtype=dt))
            prev = cout

        self.conv_norm_out = group_norm(groups, eps, "conv_norm_out", dt, silu=True)
        self.conv_out = conv(config.out_channels, 3, "conv_out", dt)

    def build(self, input_shape=None):
        """Creates every variable from the config's sizes (no forward pass)."""
        ch = self.config.block_out_channels
        build_leaf(self.conv_in, self.config.in_channels)
        added = [self.add_embedding] if self.config.addition_time_embed_dim else []
        for block in (self.time_embedding, *added, *self.down_blocks, self.mid_block, *self.up_blocks):
            block.build()
        build_leaf(self.conv_norm_out, ch[0])
        build_leaf(self.conv_out, ch[0])

    def call(self, latents, timesteps, context, text_embeds=None, time_ids=None):
        """latents (B, h, w, in_channels), timesteps (B,) float, context (B, L, cross_attention_dim); SDXL also
        takes the pooled text embedding (B, P) and the time ids (B, n): size, crop, target size or aesthetic score."""
        temb = self.time_embedding(ops.cast(timestep_embedding(timesteps, self.config.block_out_channels[0]),
                                            self.compute_dtype))
        if self.config.addition_time_embed_dim:
            batch = ops.shape(latents)[0]
            time_embeds = ops.reshape(timestep_embedding(ops.reshape(time_ids, (-1,)),
                                                         self.config.addition_time_embed_dim), (batch, -1))
            added = ops.concatenate([ops.cast(text_embeds, "float32"), time_embeds], axis=-1)
            temb = temb + self.add_embedding(ops.cast(added, self.compute_dtype))
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips += outputs
        x, _ = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            size = tuple(skips[-n - 1].shape[1:3]) if len(skips) > n else None  # diffusers' forward_upsample_size
            x, _ = block(x, temb, context, skips=skips[-n:], upsample_size=size)
            del skips[-n:]
        x = self.conv_norm_out(x)
        return self.conv_out(x)
