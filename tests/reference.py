"""Tiny random reference models (diffusers / transformers on torch) saved in the layouts people have.

Layouts: CompVis single file (.safetensors and torch .ckpt, Lightning-style with EMA and schedule
buffers), and a diffusers folder. The CompVis names come from our own mapping, and are checked
against diffusers' own CompVis -> diffusers converter, so the fixtures are what real files hold.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from stable_diffusion_tf.config import UNetConfig, VAEConfig
from stable_diffusion_tf.weights import names

CLIP_KW = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")
UNET_KW = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
VAE_KW = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
              layers_per_block=1, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every parameter off its initial value (norms around 1, the rest perturbed) so no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                p.copy_(1 + 0.1 * noise) if name.endswith("weight") else p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))
    return module.eval()


def build_reference(seed: int = 0):
    """(text_encoder, unet, vae) torch models with random weights."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    text_encoder = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_KW)), seed)
    unet = randomize(diffusers.UNet2DConditionModel(**UNET_KW), seed + 1)
    vae = randomize(diffusers.AutoencoderKL(**VAE_KW), seed + 2)
    return text_encoder, unet, vae


def _numpy(sd: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def text_encoder_state(text_encoder, prefix: str = "text_model.") -> dict:
    """The text encoder's tensors as transformers 4.x wrote them (`text_model.` prefix) or, with "", as 5.x does."""
    return {prefix + k.removeprefix("text_model."): v for k, v in _numpy(text_encoder.state_dict()).items()}


def compvis_state(text_encoder, unet, vae) -> dict:
    """The three models as one CompVis-layout state dict (the SD 1.x single-file checkpoint)."""
    ucfg = UNetConfig.from_diffusers(dict(unet.config))
    vcfg = VAEConfig.from_diffusers(dict(vae.config))
    out = {names.unet_compvis(k, ucfg): v for k, v in _numpy(unet.state_dict()).items()}
    for k, v in _numpy(vae.state_dict()).items():
        if ".mid_block.attentions.0." in k and v.ndim == 2:  # CompVis stores the VAE attention as 1x1 convs
            v = v[:, :, None, None]
        out[names.vae_compvis(k, vcfg)] = v
    out.update(text_encoder_state(text_encoder, prefix=names.CLIP_PREFIX + "text_model."))
    check_against_diffusers(out, text_encoder, unet, vae)
    return out


def check_against_diffusers(compvis: dict, text_encoder, unet, vae) -> None:
    """diffusers' own CompVis converter must give back every tensor of the reference models."""
    from diffusers.loaders import single_file_utils as sfu

    pairs = [
        (sfu.convert_ldm_unet_checkpoint(compvis, dict(unet.config)), unet.state_dict()),
        (sfu.convert_ldm_vae_checkpoint(compvis, dict(vae.config)), vae.state_dict()),
        (sfu.convert_ldm_clip_checkpoint(compvis), text_encoder_state(text_encoder)),
    ]
    for converted, original in pairs:
        assert set(converted) == set(original), sorted(set(converted) ^ set(original))[:5]
        for k, v in original.items():
            assert torch.equal(converted[k].reshape(v.shape), v), k


def add_training_extras(state: dict) -> dict:
    """What real SD training checkpoints also carry: EMA copies, schedule buffers, position_ids."""
    extras = {"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.rand(1000),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100),
              names.CLIP_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    for k in list(state)[:5]:
        extras["model_ema." + k.removeprefix(names.UNET_PREFIX).replace(".", "")] = state[k].clone()
    return {**state, **extras}


def save_all(directory: str, text_encoder, unet, vae) -> dict:
    """Writes the CompVis .safetensors and .ckpt and a diffusers folder; returns their paths."""
    from safetensors.torch import save_file

    state = add_training_extras(compvis_state(text_encoder, unet, vae))
    paths = {"safetensors": os.path.join(directory, "tiny.safetensors"),
             "ckpt": os.path.join(directory, "tiny.ckpt"),
             "diffusers": os.path.join(directory, "tiny-diffusers")}
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    torch.save({"state_dict": state, "global_step": 840000, "epoch": 6}, paths["ckpt"])
    save_diffusers_folder(paths["diffusers"], text_encoder, unet, vae, reference_tokenizer,
                          {"_class_name": "PNDMScheduler", **SCHEDULER})
    return paths


def save_diffusers_folder(folder: str, text_encoder, unet, vae, tokenizer, scheduler: dict) -> None:
    """A diffusers folder as the Hub repos have it, the text encoder with transformers 4.x names."""
    from safetensors.torch import save_file

    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "text_encoder"), exist_ok=True)
    text_encoder.config.save_pretrained(os.path.join(folder, "text_encoder"))
    save_file(text_encoder_state(text_encoder), os.path.join(folder, "text_encoder", "model.safetensors"))
    tokenizer(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f)


def reference_tokenizer(folder: str):
    """transformers.CLIPTokenizer saved to `folder` from vocab.json / merges.txt written from the shipped gz."""
    import gzip

    import transformers

    from stable_diffusion_tf.tokenizer import DEFAULT_VOCAB_PATH

    with gzip.open(DEFAULT_VOCAB_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # CLIP's bytes_to_unicode order
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5.x: CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores the files and builds a
    # 3-token vocabulary; only from_pretrained reads them.  CLIPTokenizerFast is the same class in 5.x.
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
    tokenizer.save_pretrained(folder)  # a tokenizer/ folder as diffusers repos have it (model_max_length 77)
    return tokenizer


def assert_unet_matches(pipe, unet, context_width: int, tol: float):
    """Our UNet against the reference on non-square latents and two timesteps; returns (latents, context, ref)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 24, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, context_width)).astype(np.float32)
    timesteps = np.array([981, 1], dtype=np.int64)
    with torch.no_grad():
        ref = to_nhwc(unet(to_nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    assert np.abs(ref).mean() > 0.1  # not a degenerate output
    np.testing.assert_allclose(pipe.predict_noise(latents, timesteps, context), ref, atol=tol, rtol=0)
    return latents, context, ref


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


# -- image-to-image and inpainting: a 9-channel UNet, the diffusers pipelines and the noise they draw ---------------


def build_inpainting_unet(seed: int = 3):
    """A UNet with 9 input channels (latents, mask, masked-image latents) as sd-v1-5-inpainting, random weights."""
    import diffusers

    torch.manual_seed(seed)
    return randomize(diffusers.UNet2DConditionModel(**{**UNET_KW, "in_channels": 9}), seed)


def save_single_file(path: str, text_encoder, unet, vae) -> str:
    """The three models as one CompVis .safetensors file; returns its path."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in compvis_state(text_encoder, unet, vae).items()}, path)
    return path


def diffusers_pipeline(name: str, text_encoder, unet, vae, tokenizer_folder: str):
    """diffusers pipeline class `name` (e.g. StableDiffusionInpaintPipeline) over the reference models."""
    import diffusers

    return getattr(diffusers, name)(
        vae=vae, text_encoder=text_encoder, tokenizer=reference_tokenizer(tokenizer_folder), unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def diffusers_scheduler(sampler: str):
    """The scheduler `sampler` reproduces, built as users switch: from the loaded SD 1.5 scheduler's config."""
    import diffusers

    from stable_diffusion_tf.schedules import SCHEDULERS

    sd15 = diffusers.PNDMScheduler.from_config(SCHEDULER).config
    extra = {"use_karras_sigmas": True} if sampler == "dpm++2m_karras" else {}
    return getattr(diffusers, SCHEDULERS[sampler]).from_config(sd15, **extra)


def inject_noise(monkeypatch, noise: np.ndarray, posterior: list[np.ndarray]) -> list:
    """Makes diffusers' img2img / inpaint pipelines take `noise` (NHWC) as their initial noise and, call by call,
    `posterior` as the VAE posterior noise, instead of drawing from a torch generator; returns what is left."""
    from diffusers.models.autoencoders import vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint

    left = list(posterior)

    def randn_tensor(shape, **kwargs):
        assert tuple(shape) == tuple(to_nchw(noise).shape), (shape, noise.shape)
        return to_nchw(noise)

    for module in (img2img, inpaint):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(vae.DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * to_nchw(left.pop(0)))
    return left


# -- SD 2.x: OpenCLIP text tower (GELU, penultimate layer), linear projections, head dim 64, v-prediction ------------

CLIP2_KW = {**CLIP_KW, "intermediate_size": 512, "hidden_act": "gelu"}  # width 128: 2 heads of 64, as ViT-H's 16
# heads = channels / 64 as in SD 2.x (5/10/20/20), the smallest widths that keep that rule and two heads somewhere
UNET2_KW = {**UNET_KW, "block_out_channels": (64, 128, 128), "attention_head_dim": (1, 2, 2),
            "use_linear_projection": True, "upcast_attention": True}
SCHEDULER2 = {**SCHEDULER, "prediction_type": "v_prediction"}  # SD 2.1 (768-v)


def build_reference_sd2(seed: int = 10):
    """(text_encoder, unet, vae) torch models shaped like SD 2.x, with random weights.

    The text encoder is the diffusers-folder one: the OpenCLIP tower without its last resblock.
    """
    import diffusers
    import transformers

    torch.manual_seed(seed)
    text_encoder = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP2_KW)), seed)
    unet = randomize(diffusers.UNet2DConditionModel(**UNET2_KW), seed + 1)
    vae = randomize(diffusers.AutoencoderKL(**VAE_KW), seed + 2)
    return text_encoder, unet, vae


def open_clip_state(text_encoder, seed: int = 10) -> dict:
    """The text encoder as SD 2.x single files hold it (`cond_stage_model.model.*`, q/k/v stacked in in_proj),
    plus what SD 2.x does not use, with random values: one more resblock, text_projection and logit_scale."""
    out = {}
    for k, v in text_encoder_state(text_encoder, prefix="").items():
        key, third = names.clip_open_clip(k)
        if third is None:
            out[key] = v
        else:
            out.setdefault(key, [None] * 3)[third] = v
    out = {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}
    g = torch.Generator().manual_seed(seed)
    first, last = ".resblocks.0.", f".resblocks.{text_encoder.config.num_hidden_layers}."
    out.update({k.replace(first, last): torch.randn(v.shape, generator=g) for k, v in out.items() if first in k})
    width = text_encoder.config.hidden_size
    out[names.OPEN_CLIP_PREFIX + "text_projection"] = torch.randn(width, width // 2, generator=g)  # (width, embed)
    out[names.OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    return out


def compvis_state_sd2(text_encoder, unet, vae) -> dict:
    """The three models as one SD 2.x single file (UNet and VAE checked by `compvis_state`, OpenCLIP here)."""
    state = {k: v for k, v in compvis_state(text_encoder, unet, vae).items() if not k.startswith(names.CLIP_PREFIX)}
    state.update(open_clip_state(text_encoder))
    check_open_clip_against_diffusers(state, text_encoder)
    return state


def check_open_clip_against_diffusers(compvis: dict, text_encoder) -> None:
    """diffusers' own OpenCLIP converter must give back every tensor of the reference text encoder."""
    from diffusers.loaders import single_file_utils as sfu

    converted = sfu.convert_open_clip_checkpoint(text_encoder, compvis)
    original = text_encoder_state(text_encoder)
    # diffusers drops the unused last resblock by ViT-H's index (23); a tiny tower's comes back as one more layer
    extra = f"text_model.encoder.layers.{text_encoder.config.num_hidden_layers}."
    assert {k for k in converted if not k.startswith(extra)} == set(original)
    for k, v in original.items():
        assert torch.equal(converted[k], v), k


def reference_tokenizer_sd2(folder: str):
    """The SD 2.x tokenizer: the same vocabulary, padding with "!" (id 0) as its special_tokens_map.json says."""
    import transformers

    reference_tokenizer(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77,
                                                           pad_token="!")
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_all_sd2(directory: str, text_encoder, unet, vae) -> dict:
    """Writes an SD 2.x CompVis .safetensors and a diffusers folder (v-prediction scheduler); returns their paths."""
    from safetensors.torch import save_file

    paths = {"safetensors": os.path.join(directory, "tiny-sd2.safetensors"),
             "diffusers": os.path.join(directory, "tiny-sd2-diffusers")}
    save_file({k: v.contiguous() for k, v in compvis_state_sd2(text_encoder, unet, vae).items()}, paths["safetensors"])
    save_diffusers_folder(paths["diffusers"], text_encoder, unet, vae, reference_tokenizer_sd2,
                          {"_class_name": "DDIMScheduler", **SCHEDULER2})
    return paths
