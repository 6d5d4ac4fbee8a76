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
    projection_dim: int | None = None  # CLIPTextModelWithProjection's text_projection (SDXL's OpenCLIP bigG)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "CLIPConfig":
        """Reads a transformers CLIPTextConfig config.json dict."""
        cfg = cfg.get("text_config", cfg)
        values = _known_fields(cls, cfg)
        if "CLIPTextModelWithProjection" not in (cfg.get("architectures") or ()):
            values.pop("projection_dim", None)  # every CLIPTextConfig has one; only this class uses it
        return cls(**values)


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel; `attention_levels[i]` says whether down level i (and its mirror) has cross-attention."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False  # q.k in float32 under mixed precision too (SD 2.1)
    addition_time_embed_dim: int = 0
    addition_input_dim: int = 0  # diffusers' projection_class_embeddings_input_dim

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def depth(self, level: int) -> int:
        """Transformer layers per attention block at a level (-1: the mid block)."""
        layers = self.transformer_layers_per_block
        return layers if isinstance(layers, int) else layers[level]

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
        layers = layers if isinstance(layers, int) else tuple(layers)
        if cfg.get("reverse_transformer_layers_per_block") is not None:
            raise ValueError("unsupported UNet: up blocks with their own transformer depths")
        added = cfg.get("addition_embed_type")
        if added not in (None, "text_time") or cfg.get("class_embed_type") or cfg.get("time_cond_proj_dim"):
            raise ValueError(f"unsupported UNet: added conditioning {added or cfg.get('class_embed_type')}")
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
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 0 if added else 0,
            addition_input_dim=cfg.get("projection_class_embeddings_input_dim") or 0 if added else 0,
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
    """The token that pads a family's prompts to 77 (SDXL: its first text encoder's, CLIP ViT-L's; the refiner has
    only the OpenCLIP one)."""
    return OPEN_CLIP_PAD_TOKEN_ID if family.startswith("sd2") or family == "sdxl-refiner" else END_TOKEN_ID


@dataclass(frozen=True)
class ModelConfig:
    """The three networks of one Stable Diffusion model, and the token that pads its prompts."""

    family: str
    text_encoder: CLIPConfig | None  # None: the SDXL refiner, which has only text_encoder_2
    unet: UNetConfig
    vae: VAEConfig
    pad_token_id: int = END_TOKEN_ID  # see `pad_token_id`
    sample_size: int | None = None  # the image side it was trained at, in pixels (None: the family's)
    prediction_type: str | None = None  # what its UNet predicts, where the file says (None: the family's)
    text_encoder_2: CLIPConfig | None = None  # SDXL's OpenCLIP ViT-bigG, with its text projection

    @property
    def xl(self) -> bool:
        """Whether this is an SDXL model (base, refiner or inpainting): two text streams and added conditioning."""
        return self.text_encoder_2 is not None

    @property
    def encoder_configs(self) -> list[CLIPConfig]:
        """The text encoders' configs, in the order their outputs are concatenated."""
        return [c for c in (self.text_encoder, self.text_encoder_2) if c is not None]

    @property
    def time_ids(self) -> int:
        """How many time ids SDXL's added conditioning takes: 6 (original size, crop, target size), or 5 for the
        refiner (an aesthetic score in place of the target size); 0 without it."""
        return time_id_count(self.family)

    def check(self) -> None:
        """ValueError unless the parts fit together: the text encoders' widths make the UNet's context, and SDXL's
        added conditioning is the pooled vector and the time ids."""
        width = sum(c.hidden_size for c in self.encoder_configs)
        if width != self.unet.cross_attention_dim:
            raise ValueError(f"the text encoders give {width}-wide context, the UNet takes "
                             f"{self.unet.cross_attention_dim}")
        added = (self.text_encoder_2.projection_dim or 0) + self.time_ids * self.unet.addition_time_embed_dim \
            if self.xl else 0
        if added != self.unet.addition_input_dim:
            raise ValueError(f"the UNet's added conditioning takes {self.unet.addition_input_dim} inputs, the model "
                             f"gives {added}")


def time_id_count(family: str) -> int:
    """SDXL's time ids per image by family (see `ModelConfig.time_ids`)."""
    return 5 if family == "sdxl-refiner" else 6 if family.startswith("sdxl") else 0


REFINER_SWITCH = 0.8  # where a refiner takes over by default (diffusers' docs, A1111's default)


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

# SDXL (Podell et al. 2023): CLIP ViT-L (penultimate layer) beside OpenCLIP ViT-bigG/14 (penultimate layer, and its
# projected pooled output); a 3-level UNet without attention at the first level, head dim 64, 2048-wide context
_BIG_G = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SDXL = ModelConfig(
    "sdxl",
    CLIPConfig(),
    UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True),
               num_attention_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
               use_linear_projection=True, addition_time_embed_dim=256, addition_input_dim=2816),
    SDXL_VAE,
    text_encoder_2=_BIG_G,
)
SDXL_REFINER = ModelConfig(
    "sdxl-refiner",
    None,
    UNetConfig(block_out_channels=(384, 768, 1536, 1536), attention_levels=(False, True, True, False),
               num_attention_heads=(6, 12, 24, 24), transformer_layers_per_block=4, cross_attention_dim=1280,
               use_linear_projection=True, addition_time_embed_dim=256, addition_input_dim=2560),
    SDXL_VAE,
    pad_token_id=OPEN_CLIP_PAD_TOKEN_ID,
    text_encoder_2=_BIG_G,
)
