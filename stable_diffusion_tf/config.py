"""Frozen configs for the three networks, presets for SD 1.x and 2.x, and readers of diffusers' config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _known_fields(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP text transformer (Radford et al. 2021), named as transformers' CLIPTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "CLIPConfig":
        """Reads a transformers CLIPTextConfig config.json dict."""
        cfg = cfg.get("text_config", cfg)
        return cls(**_known_fields(cls, cfg))


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel; `attention_levels[i]` says whether down level i (and its mirror) has cross-attention."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False  # q.k in float32 under mixed precision too (SD 2.1)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Reads diffusers' unet/config.json; diffusers' `attention_head_dim` is really a head count."""
        levels = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
        ups = tuple(t.startswith("CrossAttn") for t in cfg["up_block_types"])
        if ups != levels[::-1]:
            raise ValueError(f"unsupported UNet: up blocks {cfg['up_block_types']} do not mirror the down blocks")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if isinstance(heads, int):
            heads = (heads,) * len(levels)
        layers = cfg.get("transformer_layers_per_block", 1)
        if not isinstance(layers, int):
            raise ValueError("unsupported UNet: per-level transformer depth (SDXL-style)")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg["block_out_channels"]),
            attention_levels=levels,
            layers_per_block=cfg.get("layers_per_block", 2),
            num_attention_heads=tuple(heads),
            transformer_layers_per_block=layers,
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=cfg.get("use_linear_projection", False),
            upcast_attention=cfg.get("upcast_attention", False),
        )


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (Rombach et al. 2022, Sec. 3); latents are scaled by `scaling_factor` for the UNet."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """Reads diffusers' vae/config.json."""
        values = _known_fields(cls, cfg)
        values["block_out_channels"] = tuple(values.get("block_out_channels", cls.block_out_channels))
        return cls(**values)


END_TOKEN_ID = 49407  # CLIP's end-of-text token, which SD 1.x also pads prompts with
OPEN_CLIP_PAD_TOKEN_ID = 0  # SD 2.x pads with 0, the token "!", as OpenCLIP and the SD 2.x tokenizer folders do


def pad_token_id(family: str) -> int:
    """The token that pads a family's prompts to 77."""
    return OPEN_CLIP_PAD_TOKEN_ID if family.startswith("sd2") else END_TOKEN_ID


@dataclass(frozen=True)
class ModelConfig:
    """The three networks of one Stable Diffusion model, and the token that pads its prompts."""

    family: str
    text_encoder: CLIPConfig
    unet: UNetConfig
    vae: VAEConfig
    pad_token_id: int = END_TOKEN_ID  # see `pad_token_id`
    sample_size: int | None = None  # the image side it was trained at, in pixels (None: the family's)
    prediction_type: str | None = None  # what its UNet predicts, where the file says (None: the family's)


SD1 = ModelConfig("sd1", CLIPConfig(), UNetConfig(), VAEConfig())
# SD 2.x: OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x reads the penultimate one), head dim 64
SD2 = ModelConfig(
    "sd2",
    CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act="gelu"),
    UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
               upcast_attention=True),
    VAEConfig(),
    pad_token_id=OPEN_CLIP_PAD_TOKEN_ID,
)
