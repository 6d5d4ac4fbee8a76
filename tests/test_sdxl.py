"""SDXL (base, refiner, inpainting) against diffusers' SDXL pipelines on tiny random models with SDXL's structure.

The models (`reference_sdxl`) are saved as original-layout single files (float32 .safetensors and .ckpt, float16 and
bfloat16 .safetensors) and as diffusers folders; each network, and whole generations in all three modes and the
base + refiner hand-off, are compared with diffusers on the same weights and noise.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from reference import to_nchw, to_nhwc
from reference_sdxl import (CLIP_G_KW, SCHEDULER_XL, UNET_XL_KW, build_inpainting_unet_xl, build_reference_refiner,
                            build_reference_sdxl, inject_noise_xl, refiner_pipeline, save_all_refiner, save_all_sdxl,
                            save_inpainting_xl, with_unet, xl_pipeline)
from stable_diffusion_tf import CheckpointError, InputError, StableDiffusion
from stable_diffusion_tf.config import SDXL, SDXL_REFINER, CLIPConfig, UNetConfig
from stable_diffusion_tf.pipeline import draw, noise_generators
from test_sd2 import ShapesOnly
from test_text_to_image import DETERMINISTIC

TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "", "masterpiece, a cat on a mat, 4k"]
PROMPT, NEGATIVE = "an astronaut riding a horse, oil painting", "blurry, low quality"
HEIGHT, WIDTH = 64, 48  # non-square


@pytest.fixture(scope="module")
def xl():
    return build_reference_sdxl()


@pytest.fixture(scope="module")
def xl_files(xl, tmp_path_factory):
    return save_all_sdxl(str(tmp_path_factory.mktemp("sdxl")), xl)


@pytest.fixture(scope="module")
def pipes(xl_files):
    return {layout: StableDiffusion.from_pretrained(xl_files[layout]) for layout in ("safetensors", "diffusers")}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xl-tokenizers"))


@pytest.fixture(scope="module")
def reference_pipe(xl, tokenizers):
    return xl_pipeline("StableDiffusionXLPipeline", xl, tokenizers)


def scheduler(sampler: str):
    """The diffusers scheduler `sampler` reproduces, switched to as users do: from SDXL's scheduler config."""
    import diffusers

    name, extra = DETERMINISTIC[sampler]
    return getattr(diffusers, name).from_config(diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_XL).config,
                                                **extra)


def test_every_layout_gives_the_same_model(pipes, xl_files):
    single, folder = pipes["safetensors"], pipes["diffusers"]
    assert single.config == folder.config  # every size read from the single file's shapes
    assert single.config.family == "sdxl" and single.config.xl
    assert single.config.unet.transformer_layers_per_block == UNET_XL_KW["transformer_layers_per_block"]
    assert single.config.unet.attention_levels == (False, True, True)
    assert single.config.unet.addition_input_dim == UNET_XL_KW["projection_class_embeddings_input_dim"]
    assert single.config.text_encoder_2.projection_dim == CLIP_G_KW["projection_dim"]
    assert single.config.vae.scaling_factor == folder.config.vae.scaling_factor == 0.13025
    assert single.scheduler_config == folder.scheduler_config  # Euler's leading spacing, as SDXL ships
    assert single.default_size == folder.default_size == 1024
    assert single.force_zeros_for_empty_prompt and folder.force_zeros_for_empty_prompt
    ckpt = StableDiffusion.from_pretrained(xl_files["ckpt"])
    for ours, theirs in zip(ckpt.unet.weights + ckpt.text_encoder_2.weights,
                            single.unet.weights + single.text_encoder_2.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_text_conditioning_matches_diffusers(pipes, reference_pipe, layout):
    context, pooled = pipes[layout].encode_prompt(PROMPTS)
    with torch.no_grad():
        ref = reference_pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    assert context.shape == (3, 77, 192) and pooled.shape == (3, 128)
    np.testing.assert_allclose(context, ref[0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, ref[2].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_unet_matches_diffusers(pipes, xl, layout):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 192)).astype(np.float32)
    pooled = rng.standard_normal((2, 128)).astype(np.float32)
    time_ids = np.array([[1024, 768, 0, 0, 1024, 768], [512, 512, 16, 8, 64, 48]], np.float32)
    timesteps = np.array([981, 1], np.int64)
    with torch.no_grad():
        ref = to_nhwc(xl.unet(to_nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                                 "time_ids": torch.from_numpy(time_ids)}).sample)
    assert np.abs(ref).mean() > 0.1
    ours = pipes[layout].predict_noise(latents, timesteps, context, text_embeds=pooled, time_ids=time_ids)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_text_to_image_matches_diffusers(pipes, reference_pipe, sampler):
    latents = np.random.default_rng(3).standard_normal((1, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    layout = "diffusers" if sampler in ("ddim", "unipc", "lms") else "safetensors"
    ours = pipes[layout].text_to_image(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                                       num_inference_steps=5, sampler=sampler, latents=latents,
                                       guidance_scale=5.0, output_type="np").images
    reference_pipe.scheduler = scheduler(sampler)
    with torch.no_grad():
        ref = reference_pipe(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=5,
                             guidance_scale=5.0, latents=to_nchw(latents), output_type="np").images
    assert ref.shape == ours.shape == (1, HEIGHT, WIDTH, 3) and ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_empty_negative_prompt_is_zeros_as_diffusers(pipes, reference_pipe):
    latents = np.random.default_rng(4).standard_normal((2, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    ours = pipes["diffusers"].text_to_image([PROMPT, "a cat"], height=HEIGHT, width=WIDTH, num_inference_steps=4,
                                            sampler="euler", latents=latents, output_type="np").images
    reference_pipe.scheduler = scheduler("euler")
    with torch.no_grad():  # negative_prompt None: diffusers' force_zeros_for_empty_prompt
        ref = reference_pipe([PROMPT, "a cat"], height=HEIGHT, width=WIDTH, num_inference_steps=4,
                             guidance_scale=7.5, latents=to_nchw(latents), output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    pipe = pipes["diffusers"]
    pipe.force_zeros_for_empty_prompt = False  # then "" is encoded, and the image changes
    try:
        other = pipe.text_to_image([PROMPT, "a cat"], height=HEIGHT, width=WIDTH, num_inference_steps=4,
                                   sampler="euler", latents=latents, output_type="np").images
    finally:
        pipe.force_zeros_for_empty_prompt = True
    assert np.abs(other - ours).max() > 1e-2


def image_and_mask(seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[16:48, 8:40] = 255
    return image, Image.fromarray(mask)


def draws(seed: int, count: int, shape=(HEIGHT // 8, WIDTH // 8, 4)) -> list[np.ndarray]:
    generators = noise_generators([seed])
    return [draw(generators, shape) for _ in range(count)]


@pytest.mark.parametrize("sampler, strength", [("euler", 0.6), ("ddim", 0.6), ("dpm++2m", 0.6), ("euler", 1.0)])
def test_image_to_image_matches_diffusers(pipes, xl, tokenizers, monkeypatch, sampler, strength):
    image, _ = image_and_mask(1)
    ours = pipes["safetensors"].image_to_image(PROMPT, image, strength=strength, negative_prompt=NEGATIVE,
                                               num_inference_steps=5, sampler=sampler, seed=7,
                                               guidance_scale=5.0, output_type="np").images
    noise, posterior = draws(7, 2)
    left = inject_noise_xl(monkeypatch, noise, [posterior])
    reference = xl_pipeline("StableDiffusionXLImg2ImgPipeline", xl, tokenizers)
    reference.scheduler = scheduler(sampler)
    with torch.no_grad():
        ref = reference(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=5,
                        guidance_scale=5.0, output_type="np").images
    assert left == [] and ref.shape == ours.shape and ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def unet9():
    return build_inpainting_unet_xl()


@pytest.fixture(scope="module")
def pipe9(xl, unet9, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("xl9") / "xl9.safetensors")
    return StableDiffusion.from_pretrained(save_inpainting_xl(path, xl, unet9))


@pytest.mark.parametrize("nine, sampler, strength", [(False, "euler", 1.0), (False, "dpm++2m", 0.6),
                                                     (True, "euler", 1.0), (True, "ddim", 0.6)])
def test_inpaint_matches_diffusers(pipes, pipe9, xl, unet9, tokenizers, monkeypatch, nine, sampler, strength):
    image, mask = image_and_mask(2)
    models = with_unet(xl, unet9) if nine else xl
    pipe = pipe9 if nine else pipes["safetensors"]
    assert pipe.config.family == ("sdxl-inpainting" if nine else "sdxl")
    ours = pipe.inpaint(PROMPT, image, mask, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=5,
                        sampler=sampler, seed=5, guidance_scale=5.0, keep_unmasked=False, output_type="np").images
    noise, posterior, masked_posterior = draws(5, 3)  # a 4-channel UNet: no third draw, and the masked image's
    # posterior (which diffusers' SDXL inpainting draws for every UNet) is unused; an inpainting UNet starting from
    # pure noise: no image posterior
    left = inject_noise_xl(monkeypatch, noise, [masked_posterior] if nine and strength == 1 else
                           [posterior, masked_posterior])
    reference = xl_pipeline("StableDiffusionXLInpaintPipeline", models, tokenizers)
    reference.scheduler = scheduler(sampler)
    with torch.no_grad():
        ref = reference(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                        num_inference_steps=5, guidance_scale=5.0, height=HEIGHT, width=WIDTH,
                        output_type="np").images
    assert left == [] and ref.shape == ours.shape and ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def refiner(xl):
    return build_reference_refiner(vae=xl.vae)


@pytest.fixture(scope="module")
def refiner_files(refiner, tmp_path_factory):
    return save_all_refiner(str(tmp_path_factory.mktemp("refiner")), refiner)


@pytest.fixture(scope="module")
def refiner_pipe(refiner_files):
    return StableDiffusion.from_pretrained(refiner_files["diffusers"])


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_refiner_loads(refiner_files, refiner_pipe, layout):
    pipe = StableDiffusion.from_pretrained(refiner_files["safetensors"]) if layout == "safetensors" else refiner_pipe
    assert pipe.config.family == "sdxl-refiner" and pipe.text_encoder is None and pipe.config.unet.depth(1) == 2
    assert pipe.config.unet.addition_time_embed_dim == 8  # (168 - 128) / 5 time ids
    assert pipe.force_zeros_for_empty_prompt is False  # as stable-diffusion-xl-refiner-1.0's model_index.json


@pytest.mark.parametrize("sampler, switch", [("euler", 0.8), ("euler", 0.5), ("dpm++2m", 0.7)])
def test_base_then_refiner_matches_diffusers(pipes, xl, refiner, refiner_pipe, tokenizers, sampler, switch):
    latents = np.random.default_rng(6).standard_normal((1, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    seen = []
    result = pipes["safetensors"].text_to_image(
        PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=10, sampler=sampler,
        latents=latents, guidance_scale=5.0, output_type="np", refiner=refiner_pipe, refiner_switch=switch,
        callback=lambda step, total, x: seen.append((step, total)))
    assert seen == [(k, 10) for k in range(10)]
    assert (f"Refiner: tiny-xl-refiner-diffusers [{refiner_pipe.model_hash}], Refiner switch at: {switch:g}, "
            in result.parameters[0])  # as A1111 writes them
    base = xl_pipeline("StableDiffusionXLPipeline", xl, tokenizers)
    second = refiner_pipeline(refiner, tokenizers)
    base.scheduler, second.scheduler = scheduler(sampler), scheduler(sampler)
    with torch.no_grad():  # diffusers' ensemble of experts recipe
        handed = base(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=10,
                      guidance_scale=5.0, latents=to_nchw(latents), denoising_end=switch, output_type="latent").images
        ref = second(PROMPT, negative_prompt=NEGATIVE, image=handed, num_inference_steps=10, guidance_scale=5.0,
                     denoising_start=switch, output_type="np").images
    assert ref.std() > 0.01
    np.testing.assert_allclose(result.images, ref, atol=1e-3, rtol=0)
    alone = pipes["safetensors"].text_to_image(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                                               num_inference_steps=10, sampler=sampler, latents=latents,
                                               guidance_scale=5.0, output_type="np").images
    assert np.abs(alone - result.images).max() > 1e-2  # the refiner did something


def test_refiner_switch_is_checked(pipes, refiner_files):
    for bad in (0, 1.5, "0.8", True):
        with pytest.raises(InputError, match="refiner_switch"):
            pipes["safetensors"].text_to_image(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                                               refiner=refiner_files["safetensors"], refiner_switch=bad)


def test_a_refiner_path_is_loaded_once_while_unchanged(pipes, refiner_files, monkeypatch):
    loads, real = [], StableDiffusion.from_pretrained
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    xl, path = pipes["safetensors"], refiner_files["safetensors"]
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="np")  # the base's step alone
    for _ in range(2):
        xl.text_to_image(PROMPT, refiner=path, **kw)
    assert loads == [(path,)]
    os.utime(path, ns=(1, 1))  # the file changed: read again
    xl.text_to_image(PROMPT, refiner=path, **kw)
    assert loads == [(path,), (path,)]


@pytest.mark.parametrize("layout", ["fp16", "bf16"])
def test_16_bit_files_load(xl_files, pipes, layout):
    pipe = StableDiffusion.from_pretrained(xl_files[layout])
    assert pipe.config == pipes["safetensors"].config
    import ml_dtypes

    dtype = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}[layout]
    for ours, full in zip(pipe.unet.weights, pipes["safetensors"].unet.weights, strict=True):
        rounded = np.asarray(full).astype(dtype).astype(np.float32)  # the file's values, widened exactly
        np.testing.assert_array_equal(np.asarray(ours), rounded)


# what Stability's sd_xl_base.yaml and sd_xl_refiner.yaml say of the UNet and the VAE, as diffusers reads them
BASE_YAML = dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048)
REFINER_YAML = dict(adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4,
                    model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4,
                    context_dim=[1280, 1280, 1280, 1280])
# text_encoder/config.json and text_encoder_2/config.json of stable-diffusion-xl-base-1.0
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, architectures=["CLIPTextModel"])
BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280, architectures=["CLIPTextModelWithProjection"])


def full_size_file(yaml: dict, refiner: bool) -> tuple[ShapesOnly, dict]:
    """The original-layout shapes of a full-size model built on the meta device (no weights), and diffusers' UNet
    config from the yaml (single_file_utils.create_unet_diffusers_config_from_ldm)."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    from reference import VAE_KW
    from stable_diffusion_tf.config import VAEConfig
    from stable_diffusion_tf.weights import names

    original = {"model": {"params": {"network_config": {"params": yaml},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
    vae_kw = {**VAE_KW, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
        vae = diffusers.AutoencoderKL(**vae_kw)
        towers = [transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**BIG_G))]
        if not refiner:
            towers.insert(0, transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)))
    shapes = {names.unet_compvis(k, UNetConfig.from_diffusers(config)): tuple(v.shape)
              for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        attention = ".mid_block.attentions.0." in k and v.ndim == 2
        shapes[names.vae_compvis(k, VAEConfig.from_diffusers(vae_kw))] = (*v.shape, 1, 1) if attention else v.shape
    if not refiner:
        shapes.update({names.SDXL_CLIP_PREFIX + k: tuple(v.shape) for k, v in towers[0].state_dict().items()})
    prefix = names.REFINER_OPEN_CLIP_PREFIX if refiner else names.SDXL_OPEN_CLIP_PREFIX
    for k, v in towers[-1].state_dict().items():
        key, third = names.clip_open_clip(k.removeprefix("text_model."), prefix)
        shape = tuple(v.shape)
        shapes[key] = (3 * shape[0], *shape[1:]) if third is not None else \
            shape[::-1] if k == names.OPEN_CLIP_PROJECTION else shape
    return ShapesOnly(shapes), config


@pytest.mark.parametrize("preset, yaml, refiner", [(SDXL, BASE_YAML, False), (SDXL_REFINER, REFINER_YAML, True)])
def test_full_size_configs_from_shapes_equal_diffusers(preset, yaml, refiner):
    from stable_diffusion_tf.weights.load import detect_family, infer_config

    file, diffusers_config = full_size_file(yaml, refiner)
    inferred = infer_config(file, detect_family(file))
    assert inferred.family == preset.family
    assert inferred.unet == UNetConfig.from_diffusers(diffusers_config) == preset.unet
    assert inferred.text_encoder_2 == CLIPConfig.from_diffusers(BIG_G) == preset.text_encoder_2
    if not refiner:
        assert inferred.text_encoder == CLIPConfig.from_diffusers(CLIP_L) == preset.text_encoder
    assert inferred == dataclasses.replace(preset, text_encoder=inferred.text_encoder)


def test_separate_vae_for_sdxl(pipes, xl, xl_files, tmp_path):
    import diffusers

    from reference import randomize
    from reference_sdxl import VAE_XL_KW

    other = randomize(diffusers.AutoencoderKL(**VAE_XL_KW), 99)
    other.save_pretrained(str(tmp_path / "vae"))
    pipe = StableDiffusion.from_pretrained(xl_files["safetensors"], vae=str(tmp_path / "vae"))
    latents = np.random.default_rng(8).standard_normal((1, 8, 6, 4)).astype(np.float32)
    with torch.no_grad():
        ref = other.decode(to_nchw(latents) / 0.13025).sample.numpy()
    np.testing.assert_allclose(pipe.decode_latents(latents), np.clip(to_nhwc(torch.from_numpy(ref)) / 2 + 0.5, 0, 1),
                               atol=1e-4, rtol=0)
    assert np.abs(pipe.decode_latents(latents) - pipes["safetensors"].decode_latents(latents)).max() > 1e-2


def test_sdxl_embeddings_give_diffusers_conditioning(pipes, xl, tokenizers, tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    clip_l = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    clip_g = torch.from_numpy(rng.standard_normal((2, 128)).astype(np.float32))
    path = str(tmp_path / "xlstyle.safetensors")
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    pipe = pipes["diffusers"]
    name = pipe.load_embedding(path)
    prompt = f"a photo of {name} on a table"
    try:
        context, pooled = pipe.encode_prompt(prompt)
    finally:
        del pipe.embeddings[name]
    reference = xl_pipeline("StableDiffusionXLPipeline", xl, tokenizers)
    # diffusers' documented way for SDXL: each tensor into its own text encoder and tokenizer
    reference.load_textual_inversion(clip_l, token=name, text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(clip_g, token=name, text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    with torch.no_grad():
        ref = reference.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    np.testing.assert_allclose(context, ref[0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, ref[2].numpy(), atol=TOL, rtol=0)
    save_file({"emb_params": clip_l}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL model needs one with clip_l and clip_g"):
        pipe.load_embedding(str(tmp_path / "sd1.safetensors"))
    save_file({"clip_l": clip_l, "clip_g": clip_g[:1]}, str(tmp_path / "uneven.safetensors"))
    with pytest.raises(CheckpointError, match="different vector counts"):
        pipe.load_embedding(str(tmp_path / "uneven.safetensors"))


def test_truncated_sdxl_file_is_refused(xl_files, tmp_path):
    from safetensors.numpy import load_file, save_file

    state = load_file(xl_files["safetensors"])
    del state["model.diffusion_model.label_emb.0.2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="label_emb.0.2.weight"):
        StableDiffusion.from_pretrained(str(tmp_path / "broken.safetensors"))


def test_folder_model_index_is_read(xl_files, tmp_path):
    import shutil

    folder = str(tmp_path / "xl")
    shutil.copytree(xl_files["diffusers"], folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({**index, "force_zeros_for_empty_prompt": False}, f)
    assert StableDiffusion.from_pretrained(folder).force_zeros_for_empty_prompt is False


def test_text2image_cli_with_refiner_and_vae(pipes, xl_files, refiner_files, refiner_pipe, tmp_path, capsys):
    from stable_diffusion_tf import cli

    out = tmp_path / "xl.png"
    flags = ["--weights", xl_files["safetensors"], "--refiner", refiner_files["safetensors"], "--refiner-switch",
             "0.5", "--vae", os.path.join(xl_files["diffusers"], "vae"), "--prompt", "a red cube", "--H", HEIGHT,
             "--W", WIDTH, "--steps", 4, "--sampler", "euler", "--seed", 3, "--precision", "float32", "--output", out,
             "--quiet"]
    assert cli.main(flags) == 0
    with Image.open(out) as image:
        assert image.size == (WIDTH, HEIGHT)
        recipe = image.text["parameters"]
    assert "Refiner: tiny-xl-refiner [" in recipe and "Refiner switch at: 0.5" in recipe and ", VAE: vae, " in recipe
    same = pipes["safetensors"].text_to_image("a red cube", height=HEIGHT, width=WIDTH, num_inference_steps=4,
                                              sampler="euler", seed=3, refiner=refiner_pipe,
                                              refiner_switch=0.5).images[0]
    with Image.open(out) as image:  # the folder's VAE is the file's: the same pixels
        np.testing.assert_array_equal(np.asarray(image), np.asarray(same))
    again = ["--from-png", out, "--weights", xl_files["safetensors"], "--precision", "float32", "--quiet",
             "--output", tmp_path / "again.png"]
    capsys.readouterr()
    assert cli.main(again) == 2 and "pass --refiner FILE" in capsys.readouterr().err
    assert cli.main(again + ["--refiner", refiner_files["safetensors"]]) == 0  # the switch comes from the recipe
    with Image.open(out) as first, Image.open(tmp_path / "again.png") as second:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    for flag, value in (("--refiner", tmp_path / "missing.safetensors"), ("--vae", tmp_path / "missing")):
        capsys.readouterr()
        bad = flags[:flags.index(flag) + 1] + [value] + flags[flags.index(flag) + 2:]
        bad[bad.index("--output") + 1] = tmp_path / "never.png"
        assert cli.main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and not (tmp_path / "never.png").exists()


def kohya_xl_file(models, path: str, rank: int = 4) -> str:
    """A kohya SDXL LoCon file: `lora_te1_` / `lora_te2_` text modules and original-layout UNet names
    (`lora_unet_input_blocks_4_1_...`), as sd-scripts writes them for SDXL."""
    from safetensors.torch import save_file

    from test_lora import kohya_state
    from stable_diffusion_tf.weights import names

    config = UNetConfig.from_diffusers(dict(models.unet.config))
    original = {}
    for name, module in models.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            key = names.unet_compvis(f"{name}.weight", config).removeprefix(names.UNET_PREFIX).removesuffix(".weight")
            original["lora_unet_" + name.replace(".", "_")] = "lora_unet_" + key.replace(".", "_")
    state = {}
    for key, value in kohya_state(models.unet, models.text_encoder, rank).items():
        module, rest = key.split(".", 1)
        module = original.get(module) or module.replace("lora_te_", "lora_te1_", 1)
        state[f"{module}.{rest}"] = value
    for key, value in kohya_state(torch.nn.Module(), models.text_encoder_2, rank, seed=1).items():
        state[key.replace("lora_te_", "lora_te2_", 1)] = value
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    return path


def test_kohya_sdxl_lora_gives_diffusers_fused_outputs(xl, xl_files, tokenizers, tmp_path):
    import copy

    path = kohya_xl_file(xl, str(tmp_path / "xl-detail.safetensors"))
    pipe = StableDiffusion.from_pretrained(xl_files["safetensors"])
    name = pipe.load_lora(path)
    assert {m.part for m in pipe.loras[name].modules} == {"unet", "text_encoder", "text_encoder_2"}
    copies = type(xl)(**{k: copy.deepcopy(v) for k, v in vars(xl).items()})
    reference = xl_pipeline("StableDiffusionXLPipeline", copies, tokenizers)
    reference.load_lora_weights(path, adapter_name="detail")
    reference.fuse_lora(lora_scale=0.7)
    base_context, _ = pipe.encode_prompt(PROMPT)
    context, pooled = pipe.encode_prompt(f"{PROMPT} <lora:{name}:0.7>")
    with torch.no_grad():
        ref = reference.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert np.abs(base_context - ref[0].numpy()).max() > 1e-2  # the LoRA changes both text encoders
    np.testing.assert_allclose(context, ref[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref[2].numpy(), atol=1e-4, rtol=0)
    rng = np.random.default_rng(1)
    latents, text_embeds = rng.standard_normal((1, 8, 6, 4)).astype(np.float32), pooled[:1]
    time_ids = np.array([[64, 48, 0, 0, 64, 48]], np.float32)
    with torch.no_grad():
        expected = to_nhwc(reference.unet(to_nchw(latents), torch.tensor([500]), torch.from_numpy(context),
                                          added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                             "time_ids": torch.from_numpy(time_ids)}).sample)
    ours = pipe.predict_noise(latents, 500, context, text_embeds=text_embeds, time_ids=time_ids)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=0)
    pipe.apply_loras([])
    np.testing.assert_array_equal(pipe.encode_prompt(PROMPT)[0], base_context)  # the base weights, bit for bit


def test_a1111_api_runs_the_refiner(xl_files, refiner_files, refiner_pipe, tmp_path):
    import base64
    import io

    from stable_diffusion_tf.serving import Engine, NotFound, read_generation

    models = tmp_path / "models"
    models.mkdir()
    for name in ("safetensors",):
        os.symlink(xl_files[name], models / os.path.basename(xl_files[name]))
        os.symlink(refiner_files[name], models / os.path.basename(refiner_files[name]))
    engine = Engine(str(models / "tiny-xl.safetensors"), models_dir=str(models), precision="float32")
    engine.start()
    request = {"prompt": PROMPT, "steps": 4, "width": WIDTH, "height": HEIGHT, "seed": 3, "sampler_name": "Euler",
               "cfg_scale": 5, "refiner_checkpoint": "tiny-xl-refiner", "refiner_switch_at": 0.5}
    answer = engine.queue(read_generation(request, "txt2img", 1)).result(timeout=600)
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        served = np.asarray(image.convert("RGB"))
    same = engine.pipe.text_to_image(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=4, sampler="euler",
                                     guidance_scale=5, seed=3, refiner=refiner_pipe, refiner_switch=0.5).images[0]
    np.testing.assert_array_equal(served, np.asarray(same))
    assert "Refiner: tiny-xl-refiner [" in json.loads(answer["info"])["infotexts"][0]
    with pytest.raises(NotFound):
        engine.queue(read_generation({**request, "refiner_checkpoint": "no-such-model"}, "txt2img", 1))
    image = base64.b64encode(open(xl_files["safetensors"], "rb").read(0) or b"").decode()
    with pytest.raises(InputError, match="txt2img only"):
        read_generation({**request, "init_images": [image]}, "img2img", 1)
    with pytest.raises(InputError, match="refiner_switch_at"):
        read_generation({**request, "refiner_switch_at": 0}, "txt2img", 1)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_stays_near_float32(pipes, xl_files, precision):
    pipe = StableDiffusion.from_pretrained(xl_files["safetensors"], precision=precision)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, sampler="euler", seed=2, output_type="np")
    reduced = pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, **kw)
    full = pipes["safetensors"].text_to_image(PROMPT, negative_prompt=NEGATIVE, **kw).images
    assert reduced.parameters[0].endswith(f"Precision: {precision}")
    assert np.abs(reduced.images - full).mean() < 0.03  # 16-bit weights and matmuls, float32 norms and sampler


def test_clip_skip_is_a1111s_for_sdxl(pipes, xl, tokenizers):
    pipe = pipes["safetensors"]
    context, pooled = pipe.encode_prompt(PROMPT)
    for same in (1, 2):  # SDXL reads the penultimate layer already: A1111's common "Clip skip: 2" changes nothing
        np.testing.assert_array_equal(pipe.encode_prompt(PROMPT, clip_skip=same)[0], context)
    skipped, skipped_pooled = pipe.encode_prompt(PROMPT, clip_skip=3)
    ids = torch.from_numpy(pipe.tokenizer([PROMPT]).astype(np.int64))
    with torch.no_grad():  # CLIP-L's third-last layer (A1111's sdxl_clip_l_skip), bigG unchanged
        third_last = xl.text_encoder(ids, output_hidden_states=True).hidden_states[-3].numpy()
    width = xl.text_encoder.config.hidden_size
    np.testing.assert_allclose(skipped[..., :width], third_last, atol=TOL, rtol=0)
    np.testing.assert_array_equal(skipped[..., width:], context[..., width:])
    np.testing.assert_array_equal(skipped_pooled, pooled)
    with pytest.raises(InputError, match="clip_skip"):
        pipe.encode_prompt(PROMPT, clip_skip=4)  # CLIP-L has 3 layers here


def test_refiner_hand_off_checks(pipes, pipe, refiner_pipe):
    xl = pipes["safetensors"]
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2)
    with pytest.raises(InputError, match="other latents"):  # SD 1.x latents are scaled otherwise
        xl.text_to_image(PROMPT, refiner=pipe, **kw)
    for sampler in ("plms", "heun"):
        with pytest.raises(InputError, match=f"{sampler} sampler cannot hand"):
            xl.text_to_image(PROMPT, refiner=refiner_pipe, sampler=sampler, **kw)
    with pytest.raises(InputError, match="refiner must be"):
        xl.text_to_image(PROMPT, refiner=1, **kw)


def test_scheduled_prompts_go_on_counting_in_the_refiner(pipes, refiner_pipe, monkeypatch):
    seen = []
    original = refiner_pipe.predict_noise
    monkeypatch.setattr(refiner_pipe, "predict_noise",
                        lambda x, t, context: seen.append(context[0][-1].copy()) or original(x, t, context))
    pipes["safetensors"].text_to_image("a [cat:dog:0.5]", height=HEIGHT, width=WIDTH, num_inference_steps=10,
                                       sampler="euler", guidance_scale=1, refiner=refiner_pipe, refiner_switch=0.8,
                                       seed=1)
    dog, _ = refiner_pipe.encode_prompt("a dog")
    assert len(seen) == 2  # steps 8 and 9 of 10: "dog" since step 5
    for context in seen:
        np.testing.assert_allclose(context, dog[0], atol=1e-5, rtol=0)


def test_an_encode_that_overflows_is_redone_in_float32(pipes, xl_files, monkeypatch):
    import tensorflow as tf

    pipe = StableDiffusion.from_pretrained(xl_files["safetensors"], precision="float16")
    images = np.random.default_rng(3).uniform(-1, 1, (1, HEIGHT, WIDTH, 3)).astype(np.float32)
    overflowed = tf.fill((1, HEIGHT // 8, WIDTH // 8, 4), float("inf"))
    monkeypatch.setattr(pipe, "_encode_step", lambda x: [overflowed, overflowed])  # as SDXL's VAE does in fp16
    for ours, full in zip(pipe._encode(images), pipes["safetensors"]._encode(images), strict=True):
        np.testing.assert_allclose(ours, full, atol=1e-4, rtol=0)  # the float32 VAE, read again from the file
