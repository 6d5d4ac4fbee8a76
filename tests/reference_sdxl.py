"""Tiny random SDXL reference models (diffusers / transformers on torch): base, refiner and inpainting.

Same idea as `reference`: the original-layout (Stability generative-models) single files are written with our own
names (`stable_diffusion_tf.weights.names`) and checked against diffusers' own converters, so the fixtures hold what
real SDXL files hold. The sizes are tiny but keep SDXL's structure: CLIP-L-like and bigG-like text towers (their
penultimate layers concatenated as the context, bigG's projected end-of-text vector as the pooled embedding), no
attention at the highest resolution, per-level transformer depths, head size 64, and the "text_time" added
conditioning (pooled vector + 6 time ids; the refiner: bigG only, 5 time ids with the aesthetic score).
"""

from __future__ import annotations

import os
import types

import torch

from reference import (SCHEDULER, VAE_KW, compvis_state, inject_noise, randomize, reference_tokenizer,
                       reference_tokenizer_sd2, text_encoder_state)
from stable_diffusion_tf.weights import names

CLIP_L_KW = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G_KW = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=128)
TIME_EMBED = 8  # SDXL: 256 per time id
UNET_XL_KW = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3),  # heads: channels / 64
                  cross_attention_dim=CLIP_L_KW["hidden_size"] + CLIP_G_KW["hidden_size"], use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                  projection_class_embeddings_input_dim=CLIP_G_KW["projection_dim"] + 6 * TIME_EMBED,
                  norm_num_groups=32)
UNET_REFINER_KW = {**UNET_XL_KW, "block_out_channels": (32, 64, 128, 128),
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   "attention_head_dim": (1, 1, 2, 2), "transformer_layers_per_block": 2,
                   "cross_attention_dim": CLIP_G_KW["hidden_size"],
                   "projection_class_embeddings_input_dim": CLIP_G_KW["projection_dim"] + 5 * TIME_EMBED}
UNET_INPAINT_XL_KW = {**UNET_XL_KW, "in_channels": 9}
VAE_XL_KW = {**VAE_KW, "scaling_factor": 0.13025}
SCHEDULER_XL = {**SCHEDULER, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
                "timestep_spacing": "leading", "sample_max_value": 1.0}  # stable-diffusion-xl-base-1.0's scheduler


def build_reference_sdxl(seed: int = 20) -> types.SimpleNamespace:
    """SDXL base: (text_encoder, text_encoder_2, unet, vae) torch models with random weights."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    return types.SimpleNamespace(
        text_encoder=randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L_KW)), seed),
        text_encoder_2=randomize(
            transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G_KW)), seed + 1),
        unet=randomize(diffusers.UNet2DConditionModel(**UNET_XL_KW), seed + 2),
        vae=randomize(diffusers.AutoencoderKL(**VAE_XL_KW), seed + 3))


def build_reference_refiner(vae=None, seed: int = 30) -> types.SimpleNamespace:
    """SDXL refiner: (text_encoder_2, unet, vae); pass the base's VAE to share it, as the real refiner does.

    Its bigG tower gets its own random weights (the real one equals the base's), so a test cannot mix them up."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    return types.SimpleNamespace(
        text_encoder_2=randomize(
            transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G_KW)), seed),
        unet=randomize(diffusers.UNet2DConditionModel(**UNET_REFINER_KW), seed + 1),
        vae=vae if vae is not None else randomize(diffusers.AutoencoderKL(**VAE_XL_KW), seed + 2))


def build_inpainting_unet_xl(seed: int = 25):
    """The base UNet with 9 input channels (latents, mask, masked-image latents), as sd_xl_base_1.0_inpainting."""
    import diffusers

    torch.manual_seed(seed)
    return randomize(diffusers.UNet2DConditionModel(**UNET_INPAINT_XL_KW), seed)


def with_unet(models: types.SimpleNamespace, unet) -> types.SimpleNamespace:
    """A copy of `models` with another UNet (e.g. the 9-channel inpainting one)."""
    return types.SimpleNamespace(**{**vars(models), "unet": unet})


# -- original-layout single files ------------------------------------------------------------------------------------


def open_clip_state_xl(text_encoder_2, prefix: str) -> dict:
    """bigG as SDXL files hold it (OpenCLIP layout under `prefix`): q/k/v stacked in `attn.in_proj_*`, every
    resblock, `text_projection` transposed to (width, projection), and the `logit_scale` scalar it does not use."""
    out = {}
    for k, v in text_encoder_state(text_encoder_2, prefix="").items():
        key, third = names.clip_open_clip(k, prefix)
        if third is not None:
            out.setdefault(key, [None] * 3)[third] = v
        else:
            out[key] = v.T.contiguous() if k == names.OPEN_CLIP_PROJECTION else v
    out = {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # log(100), as in every OpenCLIP checkpoint
    return out


def _unet_vae_state(text_encoder, unet, vae) -> dict:
    """UNet (`model.diffusion_model.*`) and VAE (`first_stage_model.*`, mid attention as 1x1 convs) from
    `reference.compvis_state`, which checks them against diffusers' converters; its SD 1.x text keys are dropped."""
    state = compvis_state(text_encoder, unet, vae)
    return {k: v for k, v in state.items() if not k.startswith(names.CLIP_PREFIX)}


def compvis_state_sdxl(models) -> dict:
    """SDXL base as one original-layout state dict (sd_xl_base_1.0.safetensors): UNet, VAE, CLIP-L in transformers
    layout with its `position_ids` buffer (int64, as real files keep it), bigG in OpenCLIP layout."""
    state = _unet_vae_state(models.text_encoder, models.unet, models.vae)
    state.update(text_encoder_state(models.text_encoder, prefix=names.SDXL_CLIP_PREFIX + "text_model."))
    state[names.SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update(open_clip_state_xl(models.text_encoder_2, names.SDXL_OPEN_CLIP_PREFIX))
    check_sdxl_against_diffusers(state, models)
    return state


def compvis_state_refiner(models) -> dict:
    """SDXL refiner as one original-layout state dict: UNet, VAE and bigG alone (`conditioner.embedders.0.model.*`)."""
    state = _unet_vae_state(models.text_encoder_2, models.unet, models.vae)  # any text encoder: its keys are dropped
    state.update(open_clip_state_xl(models.text_encoder_2, names.REFINER_OPEN_CLIP_PREFIX))
    check_sdxl_against_diffusers(state, models)
    return state


def check_sdxl_against_diffusers(state: dict, models) -> None:
    """diffusers' own converters must give back every tensor of the reference text towers (the UNet and VAE are
    checked by `reference.compvis_state`); also pins what diffusers' model-type detection makes of the tiny file.

    CLIP-L: `convert_ldm_clip_checkpoint` strips `conditioner.embedders.0.transformer.`; it also returns the
    `position_ids` buffer, which the model does not hold as a parameter. bigG: `convert_open_clip_checkpoint`
    with the SDXL prefix drops nothing but `logit_scale` (its SD 2.x last-layer skip list names only
    `cond_stage_model.model.*` keys), splits in_proj by `text_projection.shape[0]` (the width) and transposes
    `text_projection` back."""
    from diffusers.loaders import single_file_utils as sfu

    refiner = getattr(models, "text_encoder", None) is None
    prefix = names.REFINER_OPEN_CLIP_PREFIX if refiner else names.SDXL_OPEN_CLIP_PREFIX
    converted = sfu.convert_ldm_clip_checkpoint(state)
    if refiner:
        assert converted == {}, sorted(converted)[:5]
    else:
        original = text_encoder_state(models.text_encoder)
        assert set(converted) - set(original) == {"text_model.embeddings.position_ids"}
        assert set(original) <= set(converted), sorted(set(original) - set(converted))[:5]
        for k, v in original.items():
            assert torch.equal(converted[k], v), k
    converted = sfu.convert_open_clip_checkpoint(models.text_encoder_2, state, prefix=prefix)
    original = models.text_encoder_2.state_dict()  # `text_model.*` and `text_projection.weight`
    assert set(converted) == set(original), sorted(set(converted) ^ set(original))[:5]
    for k, v in original.items():
        assert torch.equal(converted[k], v), k
    # diffusers tells SDXL files apart by `resblocks.9` of bigG, which a 3-layer tower does not have: it takes
    # these for SD 1.x files ("v1", "inpainting"), so detection by that key cannot be tested on them
    inpainting = models.unet.config.in_channels == 9
    assert sfu.infer_diffusers_model_type(state) == ("inpainting" if inpainting else "v1")


# -- savers ---------------------------------------------------------------------------------------------------------


def _save_single(path: str, state: dict, dtype: torch.dtype = torch.float32) -> str:
    """`state` as one .safetensors file, floating tensors in `dtype` (the int64 position_ids stay int64)."""
    from safetensors.torch import save_file

    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, path)
    return path


def save_all_sdxl(directory: str, models) -> dict:
    """Writes the base as float32 / float16 / bfloat16 single .safetensors, a torch .ckpt and a diffusers folder;
    returns their paths."""
    state = compvis_state_sdxl(models)
    paths = {"safetensors": _save_single(os.path.join(directory, "tiny-xl.safetensors"), state),
             "ckpt": os.path.join(directory, "tiny-xl.ckpt"),
             "fp16": _save_single(os.path.join(directory, "tiny-xl-fp16.safetensors"), state, torch.float16),
             "bf16": _save_single(os.path.join(directory, "tiny-xl-bf16.safetensors"), state, torch.bfloat16),
             "diffusers": os.path.join(directory, "tiny-xl-diffusers")}
    torch.save({"state_dict": state}, paths["ckpt"])
    # the tokenizers are written into the folder first, so it keeps their vocab.json / merges.txt as the Hub's has
    xl_pipeline("StableDiffusionXLPipeline", models, paths["diffusers"]).save_pretrained(paths["diffusers"])
    # transformers 5.x writes CLIPTextModel without the `text_model.` prefix; the Hub's SDXL folders have it
    # (text_encoder_2, a CLIPTextModelWithProjection, keeps `text_model.*` and `text_projection.weight` in both)
    _save_single(os.path.join(paths["diffusers"], "text_encoder", "model.safetensors"),
                 text_encoder_state(models.text_encoder))
    return paths


def save_all_refiner(directory: str, models) -> dict:
    """Writes the refiner as a single .safetensors and a diffusers folder (text_encoder and tokenizer null, aesthetic
    score time ids, no zeroed negative prompt, as stable-diffusion-xl-refiner-1.0); returns their paths."""
    paths = {"safetensors": _save_single(os.path.join(directory, "tiny-xl-refiner.safetensors"),
                                         compvis_state_refiner(models)),
             "diffusers": os.path.join(directory, "tiny-xl-refiner-diffusers")}
    refiner_pipeline(models, paths["diffusers"]).save_pretrained(paths["diffusers"])
    return paths


def save_inpainting_xl(path: str, models, unet9) -> str:
    """The base with the 9-channel UNet as one original-layout .safetensors; returns its path."""
    return _save_single(path, compvis_state_sdxl(with_unet(models, unet9)))


# -- diffusers pipelines and the noise they draw ------------------------------------------------------------------


def xl_pipeline(cls_name: str, models, tokenizer_dir: str, **kwargs):
    """diffusers pipeline `cls_name` (StableDiffusionXLPipeline, ...Img2ImgPipeline, ...InpaintPipeline) over the
    reference base models (`with_unet` for the 9-channel UNet), Euler as SDXL ships, no watermark."""
    import diffusers

    return getattr(diffusers, cls_name)(
        vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
        tokenizer=reference_tokenizer(os.path.join(tokenizer_dir, "tokenizer")),
        tokenizer_2=reference_tokenizer_sd2(os.path.join(tokenizer_dir, "tokenizer_2")), unet=models.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_XL), add_watermarker=False, **kwargs)


def refiner_pipeline(models, tokenizer_dir: str):
    """StableDiffusionXLImg2ImgPipeline over the reference refiner, configured as stable-diffusion-xl-refiner-1.0."""
    import diffusers

    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=models.vae, text_encoder=None, text_encoder_2=models.text_encoder_2, tokenizer=None,
        tokenizer_2=reference_tokenizer_sd2(os.path.join(tokenizer_dir, "tokenizer_2")), unet=models.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_XL), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)


def inject_noise_xl(monkeypatch, noise, posterior: list) -> list:
    """`reference.inject_noise` for the SDXL img2img and inpaint pipelines too: they take `noise` (NHWC) as their
    initial noise and, call by call, `posterior` as the VAE posterior noise; returns what is left of `posterior`.

    The text-to-image pipeline needs no patch: pass `latents=reference.to_nchw(noise)` (it multiplies them by the
    scheduler's init_noise_sigma)."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd_img2img
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as inpaint

    left = inject_noise(monkeypatch, noise, posterior)
    for module in (img2img, inpaint):
        monkeypatch.setattr(module, "randn_tensor", sd_img2img.randn_tensor)  # the stand-in set just above
    return left
