"""Build the three networks and fill them from a single-file checkpoint or a diffusers folder.

Tensors are matched by name (see `names.py`), fetched one at a time from a lazy `TensorFile`,
so peak memory is the model plus one tensor. Loading is strict: the model family is read from key
names and shapes before any variable is built, every key and shape is checked against the file's
header before any tensor is read, and every tensor of a model part is used or explicitly ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass

from ..clip import CLIPTextModel
from ..config import SDXL_VAE, CLIPConfig, ModelConfig, UNetConfig, VAEConfig, pad_token_id, time_id_count
from ..errors import CheckpointError, StableDiffusionWarning
from ..layers import empty_weights
from ..unet import UNet
from ..vae import AutoencoderKL
from . import names
from .assign import fill, plan
from .formats import TensorFile, open_checkpoint

# Tensors of SD training checkpoints that inference does not use.
IGNORED = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus_alphas_cumprod$|posterior_|"
    r"logvar$|lvlb_weights$|.*position_ids$|.*\.num_batches_tracked$)"
)


@dataclass
class Models:
    """The loaded networks and the config they were built from."""

    config: ModelConfig
    text_encoder: CLIPTextModel | None  # None: the SDXL refiner
    unet: UNet
    vae: AutoencoderKL
    text_encoder_2: CLIPTextModel | None = None  # SDXL's OpenCLIP bigG

    @property
    def networks(self) -> tuple:
        return tuple(n for n in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if n is not None)


def make_models(config: ModelConfig, dtype="float32", empty: bool = False) -> Models:
    """The three networks, built from the config's sizes (no forward pass).

    Their variables start from Keras' usual random values, or, with `empty`, hold no values yet (for a
    loader that assigns every one: a billion random draws would be most of the load time).
    """
    text = lambda cfg, name: CLIPTextModel(cfg, name=name, dtype=dtype) if cfg else None  # noqa: E731
    models = Models(config, text(config.text_encoder, "text_encoder"), UNet(config.unet, name="unet", dtype=dtype),
                    AutoencoderKL(config.vae, name="vae", dtype=dtype), text(config.text_encoder_2, "text_encoder_2"))
    with empty_weights() if empty else contextlib.nullcontext():
        for network in models.networks:
            network.build()
    return models


def load_vae(source: str | os.PathLike, config: VAEConfig, dtype="float32") -> AutoencoderKL:
    """The VAE alone, from a whole model (single file or diffusers folder) or a VAE of its own: a diffusers VAE
    folder or file (`decoder.up_blocks.*`), or an original-layout file (`vae-ft-mse-840000-ema-pruned`,
    `sdxl_vae.safetensors`: `decoder.up.*`, with or without `first_stage_model.`). `config` gives the architecture
    (a VAE of another shape is refused, naming the tensor) and the scaling factor, which stays the model's."""
    source = os.fspath(source)
    vae = AutoencoderKL(config, name="vae", dtype=dtype)
    with empty_weights():
        vae.build()
    path = source
    if os.path.isdir(source):  # a whole diffusers model, or its vae/ folder alone
        whole = os.path.isdir(os.path.join(source, "vae"))
        folder, part = (source, "vae") if whole else os.path.split(os.path.normpath(source))
        path = _component_file(folder, part)
    with open_checkpoint(path) as file:
        keys = file.keys()
        if any(k.startswith(names.VAE_PREFIX) for k in keys):
            candidates = _vae_candidates(config, False)
        elif any(k.startswith("decoder.up_blocks.") for k in keys):
            candidates = names.vae_diffusers
        elif any(k.startswith("decoder.up.") for k in keys):  # the original layout, saved alone
            candidates = lambda n: [names.vae_compvis(n, config).removeprefix(names.VAE_PREFIX)]  # noqa: E731
        else:
            raise CheckpointError(f"{path}: not a VAE (no decoder tensors in either layout)")
        fill(plan(vae, _getter(file, candidates, set()), path))
    return vae


def load(source: str | os.PathLike, config: ModelConfig | None = None, dtype="float32") -> Models:
    """Loads a single-file checkpoint (.safetensors / .ckpt) or a diffusers folder, strictly.

    The networks are built with empty variables; every variable is matched to its tensor and every key
    and shape checked against the file headers (nothing is read before all of them pass), then each
    tensor is read, converted and assigned in turn.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        return _load_diffusers_folder(source, config, dtype)
    return _load_single_file(source, config, dtype)


def _load_single_file(source: str, config: ModelConfig | None, dtype) -> Models:
    with open_checkpoint(source) as file:
        family = detect_family(file)
        config = config or config_from_metadata(file, infer_config(file, family))
        _check(config, source)
        models = make_models(config, dtype, empty=True)
        used: set[str] = set()
        entries = []
        for model, (kind, prefix) in zip((models.text_encoder, models.text_encoder_2), _text_layouts(file)):
            if model is None:
                continue
            if kind == "open_clip":
                clip = _open_clip_getter(file, used, prefix)
                layers = model.config.num_hidden_layers
                used |= {k for k in file.keys() if names.open_clip_unused(k, layers, prefix, config.xl)}
            else:
                clip = _getter(file, lambda n, p=prefix: names.clip_names(n, p), used)
            entries += plan(model, clip, source)
        entries += [*plan(models.unet, _getter(file, lambda n: [names.unet_compvis(n, config.unet)], used), source),
                   *plan(models.vae, _getter(file, _vae_candidates(config.vae, False), used), source)]
        _check_leftovers(source, [k for k in file.keys() if k not in used], family)
        fill(entries)
    return models


def _check(config: ModelConfig, source: str) -> None:
    try:
        config.check()
    except ValueError as e:
        raise CheckpointError(f"{source}: the model's parts do not fit together: {e}") from None


def _vae_candidates(config: VAEConfig, folder: bool):
    """`candidates(name)`: the file keys a VAE parameter may have, in a diffusers folder or a single file."""
    return names.vae_diffusers if folder else (lambda n: [names.vae_compvis(n, config)])


def _getter(file: TensorFile, candidates, used: set[str]):
    """`get(name) -> (file key, shape, read)` over the first candidate key present; records the keys it used."""
    def get(name):
        for key in candidates(name):
            if key in file:
                used.add(key)
                return key, file.shape(key), lambda: file.get(key, scratch=True)
        raise KeyError(candidates(name)[0])
    return get


def _has_open_clip(file: TensorFile) -> bool:
    return any(k.startswith(names.OPEN_CLIP_PREFIX) for k in file.keys())


def _text_layouts(file: TensorFile) -> list[tuple[str, str]]:
    """(layout, key prefix) of the text encoders a single file holds, as `Models` orders them: (text_encoder,
    text_encoder_2); layout "transformers" or "open_clip", ("", "") where there is none."""
    if any(k.startswith(names.REFINER_OPEN_CLIP_PREFIX) for k in file.keys()):
        return [("", ""), ("open_clip", names.REFINER_OPEN_CLIP_PREFIX)]
    if any(k.startswith("conditioner.embedders.") for k in file.keys()):
        return [("transformers", names.SDXL_CLIP_PREFIX), ("open_clip", names.SDXL_OPEN_CLIP_PREFIX)]
    if _has_open_clip(file):
        return [("open_clip", names.OPEN_CLIP_PREFIX), ("", "")]
    return [("transformers", names.CLIP_PREFIX), ("", "")]


def _open_clip_getter(file: TensorFile, used: set[str], prefix: str = names.OPEN_CLIP_PREFIX):
    """`get(name)` for an OpenCLIP text tower (SD 2.x, SDXL's bigG), cutting q, k and v out of the stacked in_proj
    and transposing the text projection."""
    def get(name):
        key, third = names.clip_open_clip(name, prefix)
        if key not in file:
            raise KeyError(key)
        used.add(key)
        shape = file.shape(key)
        if name == names.OPEN_CLIP_PROJECTION:
            return key, shape[::-1], lambda: file.get(key, scratch=True).T
        if third is None:
            return key, shape, lambda: file.get(key, scratch=True)
        n = shape[0] // 3
        return (f"{key}[{third * n}:{(third + 1) * n}]", (n, *shape[1:]),
                lambda: file.get(key, scratch=True)[third * n:(third + 1) * n])
    return get


def _check_leftovers(source: str, keys: list[str], family: str) -> None:
    parts = (names.UNET_PREFIX, names.VAE_PREFIX, names.CLIP_PREFIX, names.OPEN_CLIP_PREFIX, "conditioner.")
    unknown = [k for k in keys if not IGNORED.match(k)]
    inside = [k for k in unknown if k.startswith(parts)]
    if inside:
        raise CheckpointError(f"{source}: unexpected tensor {inside[0]} ({len(inside)} in all); "
                              f"the file does not match the {FAMILY_NAMES[family]} architecture")
    if unknown:
        warnings.warn(f"{source}: ignored {len(unknown)} tensors outside the model, e.g. {unknown[0]}",
                      StableDiffusionWarning, stacklevel=4)


FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                "sd1-inpainting": "Stable Diffusion 1.x inpainting (9-channel UNet)",
                "sd2-inpainting": "Stable Diffusion 2.x inpainting (9-channel UNet)",
                "sdxl-inpainting": "SDXL inpainting (9-channel UNet)", "sdxl-refiner": "SDXL refiner"}


def detect_family(file: TensorFile) -> str:
    """A key of FAMILY_NAMES, from key names and shapes; raises otherwise."""
    keys = file.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    conv_in = names.UNET_PREFIX + "input_blocks.0.0.weight"
    inpainting = conv_in in file and len(file.shape(conv_in)) == 4 and file.shape(conv_in)[1] == 9
    if has("conditioner.embedders.") or has(names.UNET_PREFIX + "label_emb"):
        if has(names.REFINER_OPEN_CLIP_PREFIX):
            return "sdxl-refiner"
        return "sdxl-inpainting" if inpainting else "sdxl"
    if not has(names.UNET_PREFIX):
        if has("encoder.") and has("decoder.") or has(names.VAE_PREFIX):
            raise CheckpointError(f"{file.path}: a VAE-only file, not a whole Stable Diffusion checkpoint")
        if has("down_blocks.") or has("text_model."):
            raise CheckpointError(f"{file.path}: one diffusers component; pass the whole diffusers folder instead")
        raise CheckpointError(f"{file.path}: not a Stable Diffusion checkpoint (no {names.UNET_PREFIX}* tensors)")
    context_key = next((k for k in keys if k.endswith("attn2.to_k.weight") and k.startswith(names.UNET_PREFIX)), None)
    sd2 = has(names.OPEN_CLIP_PREFIX) or (context_key is not None and file.shape(context_key)[1] == 1024)
    family = "sd2" if sd2 else "sd1"
    return f"{family}-inpainting" if inpainting else family


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def infer_config(file: TensorFile, family: str | None = None) -> ModelConfig:
    """Reads every size of a single file from its tensor shapes.

    Head counts are not stored, so they follow the family: SD 1.x has 8 heads per level, SD 2.x and SDXL a head
    dimension of 64 (SD 2.x: 5/10/20/20 heads), both in the UNet; CLIP has width / 64 heads.
    """
    family = family or detect_family(file)
    sd2 = family.startswith("sd2")
    xl = family.startswith("sdxl")
    keys, p = file.keys(), names.UNET_PREFIX

    def shape(key: str) -> tuple:
        if key not in file:
            raise KeyError(key)
        return file.shape(key)

    try:
        ops = _indices(keys, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
        per_level = ops[0]
        levels = len(ops) + 1
        first = [1 + i * per_level for i in range(levels)]
        channels = tuple(shape(f"{p}input_blocks.{b}.0.out_layers.3.weight")[0] for b in first)
        attention = tuple(f"{p}input_blocks.{b}.1.proj_in.weight" in file for b in first)
        a = next(b for b, has in zip(first, attention) if has)
        depths = [len(_indices(keys, re.escape(f"{p}input_blocks.{b}.1.transformer_blocks.") + r"(\d+)\."))
                  if has else 1 for b, has in zip(first, attention)]
        mid = len(_indices(keys, re.escape(f"{p}middle_block.1.transformer_blocks.") + r"(\d+)\."))
        attended = {d for d, has in zip(depths, attention) if has}
        # one depth for all (diffusers' int), or one per level (SDXL base: 1, 2, 10; the mid block has the last's)
        depth = attended.pop() if len(attended) == 1 and mid in (attended | {depths[-1]}) else tuple(depths)
        if isinstance(depth, tuple) and mid != depths[-1]:
            raise CheckpointError(f"{file.path}: unsupported UNet: mid-block depth {mid}, last level {depths[-1]}")
        added = f"{p}label_emb.0.0.weight"
        text, ids = _text_layouts(file), time_id_count(family)
        pooled = 0
        if xl:
            pooled = shape(text[1][1] + "text_projection")[1]
        adm = shape(added)[1] if added in file else 0
        unet = UNetConfig(
            in_channels=shape(f"{p}input_blocks.0.0.weight")[1],
            out_channels=shape(f"{p}out.2.weight")[0],
            block_out_channels=channels,
            attention_levels=attention,
            layers_per_block=per_level - 1,
            num_attention_heads=tuple(max(c // 64, 1) for c in channels) if sd2 or xl else (8,) * levels,
            transformer_layers_per_block=depth,
            cross_attention_dim=shape(f"{p}input_blocks.{a}.1.transformer_blocks.0.attn2.to_k.weight")[1],
            use_linear_projection=len(shape(f"{p}input_blocks.{a}.1.proj_in.weight")) == 2,
            # diffusers builds SD 2.x single files with SD 2.1's upcast_attention; it only matters in float16
            upcast_attention=sd2,
            addition_time_embed_dim=(adm - pooled) // ids if adm else 0,
            addition_input_dim=adm,
        )
        if adm and (adm - pooled) % ids:
            raise CheckpointError(f"{file.path}: added conditioning of {adm} inputs does not fit {ids} time ids")
        v = names.VAE_PREFIX + "encoder."
        vae_levels = _indices(keys, re.escape(v) + r"down\.(\d+)\.block\.0\.conv1\.weight")
        vae = VAEConfig(
            in_channels=shape(f"{v}conv_in.weight")[1],
            out_channels=shape(f"{names.VAE_PREFIX}decoder.conv_out.weight")[0],
            latent_channels=shape(f"{names.VAE_PREFIX}post_quant_conv.weight")[0],
            block_out_channels=tuple(shape(f"{v}down.{i}.block.0.conv1.weight")[0] for i in vae_levels),
            layers_per_block=len(_indices(keys, re.escape(v) + r"down\.0\.block\.(\d+)\.conv1\.weight")),
            scaling_factor=SDXL_VAE.scaling_factor if xl else VAEConfig.scaling_factor,
        )
        clips = [None if not kind else _open_clip_config(file, prefix, xl) if kind == "open_clip" else
                 _clip_config(file, "gelu" if sd2 else "quick_gelu", prefix) for kind, prefix in text]
    except (KeyError, IndexError, StopIteration) as e:
        raise CheckpointError(f"{file.path}: incomplete {FAMILY_NAMES[family]} checkpoint (cannot read the model "
                              f"sizes: {e})") from None
    return ModelConfig(family, clips[0], unet, vae, pad_token_id=pad_token_id(family), text_encoder_2=clips[1])


CONFIG_METADATA = "stable_diffusion_tf.config"  # safetensors __metadata__ key of a file's ModelConfig (JSON)
# What a file's own config may say beyond its tensor shapes; the shapes must agree with the rest of it.
NOT_IN_SHAPES = {"text_encoder": ("num_attention_heads", "hidden_act", "layer_norm_eps"),
                 "unet": ("num_attention_heads", "norm_num_groups", "norm_eps", "upcast_attention"),
                 "vae": ("norm_num_groups", "scaling_factor"), "": ("sample_size", "prediction_type")}


def config_from_metadata(file: TensorFile, inferred: ModelConfig) -> ModelConfig:
    """The config a safetensors file carries in its metadata (as our trainer writes it), checked against
    the sizes its tensors have; `inferred` when it carries none."""
    text = file.metadata.get(CONFIG_METADATA)
    if text is None:
        return inferred
    bad = lambda why: CheckpointError(f"{file.path}: {CONFIG_METADATA} metadata {why}")  # noqa: E731
    try:
        given = json.loads(text)
        parts = {}
        for part in ("text_encoder", "unet", "vae"):
            ours = getattr(inferred, part)
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in given[part].items()}
            if any(k not in NOT_IN_SHAPES[part] and getattr(ours, k, None) != v for k, v in values.items()):
                raise ValueError(f"its {part} disagrees with the tensor shapes")
            parts[part] = dataclasses.replace(ours, **{k: values[k] for k in NOT_IN_SHAPES[part] if k in values})
        top = {k: given.get(k) for k in NOT_IN_SHAPES[""]}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise bad(f"is unusable ({e})") from None
    clip, unet, vae = parts["text_encoder"], parts["unet"], parts["vae"]
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    checks = {
        "text-encoder heads": positive(clip.num_attention_heads) and clip.hidden_size % clip.num_attention_heads == 0,
        "text-encoder activation": clip.hidden_act in ("quick_gelu", "gelu"),
        "UNet heads": len(unet.num_attention_heads) == len(unet.block_out_channels) and all(
            positive(h) and c % h == 0 for h, c in zip(unet.num_attention_heads, unet.block_out_channels)),
        "norm groups": all(positive(g) and all(c % g == 0 for c in ch) for g, ch in (
            (unet.norm_num_groups, unet.block_out_channels), (vae.norm_num_groups, vae.block_out_channels))),
        "scaling factor": isinstance(vae.scaling_factor, float) and 0 < vae.scaling_factor < 1e3,
        "sample size": top["sample_size"] is None or positive(top["sample_size"]) and top["sample_size"] % 8 == 0,
        "prediction type": top["prediction_type"] in (None, "epsilon", "v_prediction"),
    }
    if not all(checks.values()):
        raise bad(f"has an impossible {next(k for k, ok in checks.items() if not ok)}")
    return dataclasses.replace(inferred, text_encoder=clip, unet=unet, vae=vae, **top)


def _clip_config(file: TensorFile, hidden_act: str, prefix: str = names.CLIP_PREFIX) -> CLIPConfig:
    """The sizes of a transformers-layout text encoder (`cond_stage_model.transformer.*`)."""
    t = next(c for c in names.clip_names("", prefix) if c + "embeddings.token_embedding.weight" in file)
    vocab, width = file.shape(t + "embeddings.token_embedding.weight")
    return CLIPConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=file.shape(t + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(_indices(file.keys(), re.escape(t + "encoder.layers.") + r"(\d+)\.")),
        num_attention_heads=max(width // 64, 1),
        max_position_embeddings=file.shape(t + "embeddings.position_embedding.weight")[0],
        hidden_act=hidden_act,
    )


def _open_clip_config(file: TensorFile, prefix: str = names.OPEN_CLIP_PREFIX, xl: bool = False) -> CLIPConfig:
    """The sizes of an OpenCLIP text tower (`cond_stage_model.model.*`): for SD 2.x less its last resblock (it reads
    the penultimate layer), for SDXL whole and with its text projection."""
    o = prefix
    vocab, width = file.shape(o + "token_embedding.weight")
    resblocks = _indices(file.keys(), re.escape(o + "transformer.resblocks.") + r"(\d+)\.")
    return CLIPConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=file.shape(o + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=len(resblocks) - (0 if xl else 1),
        num_attention_heads=max(width // 64, 1),
        max_position_embeddings=file.shape(o + "positional_embedding")[0],
        hidden_act="gelu",
        projection_dim=file.shape(o + "text_projection")[1] if xl else None,
    )


COMPONENT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}
COMPONENT_FILES["text_encoder_2"] = COMPONENT_FILES["text_encoder"]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers folder needs unet/, vae/ and text_encoder/ or, for "
                              "SDXL, text_encoder_2/)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: config is not a JSON object")
    return value


def read_folder_config(folder: str) -> ModelConfig:
    """The ModelConfig of a diffusers folder from its config.json files (an SDXL one without text_encoder/ is a
    refiner)."""
    unet_cfg = _read_json(os.path.join(folder, "unet", "config.json"))
    xl = unet_cfg.get("addition_embed_type") == "text_time"
    has = lambda part: os.path.isfile(os.path.join(folder, part, "config.json"))  # noqa: E731
    text = lambda part: CLIPConfig.from_diffusers(_read_json(os.path.join(folder, part, "config.json")))  # noqa
    try:
        unet = UNetConfig.from_diffusers(unet_cfg)
        vae = VAEConfig.from_diffusers(_read_json(os.path.join(folder, "vae", "config.json")))
        clip = text("text_encoder") if has("text_encoder") or not xl else None
        clip2 = text("text_encoder_2") if xl else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: unsupported or broken config ({e})") from None
    if xl:
        if clip2 is None or not clip2.projection_dim:
            raise CheckpointError(f"{folder}: SDXL's text_encoder_2 is not a CLIPTextModelWithProjection")
        family = "sdxl-refiner" if clip is None else "sdxl"
    else:  # SD 2.x: an OpenCLIP text encoder (exact GELU; SD 1.x's OpenAI CLIP has quick_gelu) or 1024-wide context
        family = "sd2" if clip.hidden_act == "gelu" or unet.cross_attention_dim == 1024 else "sd1"
    if unet.in_channels == 9 and family != "sdxl-refiner":
        family += "-inpainting"
    return ModelConfig(family, clip, unet, vae, pad_token_id=pad_token_id(family), text_encoder_2=clip2)


def _component_file(folder: str, part: str) -> str:
    """The weights file of a diffusers folder's component `part` (any other name: a VAE's)."""
    files = COMPONENT_FILES.get(part, COMPONENT_FILES["vae"])
    for filename in files:
        path = os.path.join(folder, part, filename)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{os.path.join(folder, part)}: no weights file (looked for {', '.join(files)})")


def _load_diffusers_folder(folder: str, config: ModelConfig | None, dtype) -> Models:
    config = config or read_folder_config(folder)
    _check(config, folder)
    models = make_models(config, dtype, empty=True)
    parts = {"text_encoder": (models.text_encoder, names.clip_names),
             "text_encoder_2": (models.text_encoder_2, names.clip_names), "unet": (models.unet, lambda n: [n]),
             "vae": (models.vae, _vae_candidates(config.vae, True))}
    parts = {part: value for part, value in parts.items() if value[0] is not None}
    paths = {part: _component_file(folder, part) for part in parts}
    with contextlib.ExitStack() as stack:
        entries = []
        for part, (model, candidates) in parts.items():
            file = stack.enter_context(open_checkpoint(paths[part]))
            used: set[str] = set()
            entries += plan(model, _getter(file, candidates, used), paths[part])
            extra = [k for k in file.keys() if k not in used and not IGNORED.match(k)]
            if extra:
                raise CheckpointError(f"{paths[part]}: unexpected tensor {extra[0]} ({len(extra)} in all)")
        fill(entries)
    return models
