"""Key names: our (diffusers) parameter names -> the names the same tensors carry in real files.

Single-file checkpoints use the original CompVis layout (`model.diffusion_model.input_blocks.1.0.in_layers.0`);
diffusers folders use diffusers names, older ones with the VAE attention as `query/key/value/proj_attn`;
text encoders were saved by transformers 4.x with a `text_model.` prefix and by 5.x without it.
SD 2.x single files hold the OpenCLIP text tower (`cond_stage_model.model.transformer.resblocks.N.*`); SDXL files
hold CLIP ViT-L (`conditioner.embedders.0.transformer.*`) and OpenCLIP bigG (`conditioner.embedders.1.model.*`; the
refiner has only bigG, as `conditioner.embedders.0.model.*`).
Each function returns the candidate file keys for one parameter, most common first.
"""

from __future__ import annotations

from ..config import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OLD_DIFFUSERS_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
OPEN_CLIP_PROJECTION = "text_projection.weight"  # ours; OpenCLIP's `text_projection` holds its transpose
_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding", "final_layer_norm": "ln_final",
              OPEN_CLIP_PROJECTION: "text_projection"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _rename_head(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_compvis(name: str, config: UNetConfig) -> str:
    """diffusers UNet parameter name -> CompVis `model.diffusion_model.*` name."""
    per_level = config.layers_per_block + 1
    parts = name.split(".")
    if parts[0] == "time_embedding":
        key = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + parts[2]
    elif parts[0] == "add_embedding":  # SDXL's added conditioning ("ADM" in the original code)
        key = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + parts[2]
    elif parts[0] == "conv_in":
        key = "input_blocks.0.0." + parts[1]
    elif parts[0] == "conv_norm_out":
        key = "out.0." + parts[1]
    elif parts[0] == "conv_out":
        key = "out.2." + parts[1]
    elif parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        key = f"middle_block.{index}." + _inner(parts[1], ".".join(parts[3:]))
    else:
        level, kind, j, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                key = f"input_blocks.{(level + 1) * per_level}.0.op.{rest.split('.', 1)[1]}"
            else:
                key = f"input_blocks.{1 + level * per_level + int(j)}.{0 if kind == 'resnets' else 1}." + \
                    _inner(kind, rest)
        else:
            block = level * per_level
            if kind == "upsamplers":
                has_attention = config.attention_levels[len(config.block_out_channels) - 1 - level]
                key = f"output_blocks.{block + per_level - 1}.{2 if has_attention else 1}.{rest}"
            else:
                key = f"output_blocks.{block + int(j)}.{0 if kind == 'resnets' else 1}." + _inner(kind, rest)
    return UNET_PREFIX + key


def _inner(kind: str, rest: str) -> str:
    return _rename_head(rest, _UNET_RESNET) if kind == "resnets" else rest  # transformer names are shared


def vae_compvis(name: str, config: VAEConfig) -> str:
    """diffusers AutoencoderKL parameter name -> CompVis `first_stage_model.*` name."""
    levels = len(config.block_out_channels)
    parts = name.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return VAE_PREFIX + name
    part, rest = parts[1], parts[2:]
    if part == "conv_norm_out":
        key = "norm_out." + rest[0]
    elif part == "conv_in" or part == "conv_out":
        key = f"{part}.{rest[0]}"
    elif part == "mid_block":
        index, inner = ".".join(rest[:2]), ".".join(rest[2:])
        if index == "attentions.0":
            key = "mid.attn_1." + _rename_head(inner, _VAE_ATTENTION)
        else:
            key = f"mid.block_{int(rest[1]) + 1}." + _rename_head(inner, {"conv_shortcut": "nin_shortcut"})
    else:
        level = int(rest[0]) if side == "encoder" else levels - 1 - int(rest[0])  # CompVis decoder counts up
        kind, inner = rest[1], ".".join(rest[3:])
        group = "down" if side == "encoder" else "up"
        if kind in ("downsamplers", "upsamplers"):
            key = f"{group}.{level}.{kind[:-2]}.{inner}"  # downsamplers.0 -> downsample
        else:
            key = f"{group}.{level}.block.{rest[2]}." + _rename_head(inner, {"conv_shortcut": "nin_shortcut"})
    return f"{VAE_PREFIX}{side}.{key}"


def vae_diffusers(name: str) -> list[str]:
    """Diffusers-folder candidates: current names, then the pre-0.14 VAE attention names."""
    old = name
    if ".mid_block.attentions.0." in name:
        head, inner = name.split(".mid_block.attentions.0.")
        old = f"{head}.mid_block.attentions.0." + _rename_head(inner, _OLD_DIFFUSERS_VAE_ATTENTION)
    return [name] if old == name else [name, old]


def clip_names(name: str, prefix: str = "") -> list[str]:
    """Text-encoder candidates: transformers 4.x (`text_model.` prefix) and 5.x (no prefix) spellings."""
    return [f"{prefix}text_model.{name}", f"{prefix}{name}"]


def clip_open_clip(name: str, prefix: str = OPEN_CLIP_PREFIX) -> tuple[str, int | None]:
    """Text-encoder parameter name -> (OpenCLIP key, which third of it or None).

    OpenCLIP stacks q, k and v in one `attn.in_proj_weight` (3 * width, width) and `in_proj_bias`:
    `q_proj.weight` is third 0 of `in_proj_weight`. Its `text_projection` is (width, projection), applied as
    x @ P: the transpose of a torch Linear weight (see `OPEN_CLIP_PROJECTION`).
    """
    if name.startswith("encoder.layers."):
        index, rest = name.removeprefix("encoder.layers.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        block = f"{prefix}transformer.resblocks.{index}."
        if module in OPEN_CLIP_QKV:
            return f"{block}attn.in_proj_{param}", OPEN_CLIP_QKV.index(module)
        return block + _OPEN_CLIP_LAYER[module] + "." + param, None
    return prefix + _rename_head(name, _OPEN_CLIP), None


def open_clip_unused(key: str, num_hidden_layers: int, prefix: str = OPEN_CLIP_PREFIX, xl: bool = False) -> bool:
    """OpenCLIP tensors a model leaves out: `logit_scale` and the `attn_mask` buffer, and for SD 2.x also the last
    resblock (it reads the penultimate layer's output, then ln_final) and the image-text `text_projection`
    (SDXL uses every layer: the penultimate for the context, the last and the projection for the pooled vector)."""
    unused = ("logit_scale", "attn_mask") if xl else \
        ("text_projection", "logit_scale", "attn_mask", f"transformer.resblocks.{num_hidden_layers}.")
    return key.startswith(tuple(prefix + u for u in unused))
