"""SD 2.x: OpenCLIP text tower (penultimate layer), linear projections, head dim 64, v-prediction, against diffusers.

Tiny SD 2.x-shaped random models are saved as an SD 2.x single file (`cond_stage_model.model.*` OpenCLIP names)
and as a diffusers folder; each network and whole text_to_image runs are compared with the reference.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import (CLIP2_KW, SCHEDULER2, UNET2_KW, assert_unet_matches, build_reference_sd2, compvis_state_sd2,
                       reference_tokenizer_sd2, save_all_sd2, to_nchw)
from stable_diffusion_tf import CheckpointError, InputError, StableDiffusion, cli
from stable_diffusion_tf.config import SD2
from stable_diffusion_tf.fast import attention
from stable_diffusion_tf.weights import names
from stable_diffusion_tf.weights.load import infer_config
from test_text_to_image import DETERMINISTIC

LAYOUTS = ["safetensors", "diffusers"]
TOL = 1e-4
# no "!": transformers' SD 2.x tokenizer turns it into its pad token 0, OpenCLIP (and this package) into 256
PROMPTS = ["a photograph of an astronaut riding a horse", "", "masterpiece, a cat 🐱 on a mat, 4k"]
PROMPT, NEGATIVE = "an astronaut riding a horse, oil painting", "blurry, low quality"


@pytest.fixture(scope="module")
def reference_sd2():
    return build_reference_sd2()


@pytest.fixture(scope="module")
def checkpoints_sd2(reference_sd2, tmp_path_factory):
    return save_all_sd2(str(tmp_path_factory.mktemp("sd2")), *reference_sd2)


@pytest.fixture(scope="module")
def pipes(checkpoints_sd2):
    return {layout: StableDiffusion.from_pretrained(checkpoints_sd2[layout]) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def tokenizer_sd2(tmp_path_factory):
    return reference_tokenizer_sd2(str(tmp_path_factory.mktemp("tokenizer_sd2")))


def test_both_layouts_give_the_same_model(pipes):
    single, folder = pipes["safetensors"], pipes["diffusers"]
    assert single.config == folder.config  # every size read from the single file's shapes
    assert single.config.family == "sd2" and single.config.pad_token_id == 0
    assert single.config.text_encoder.num_hidden_layers == CLIP2_KW["num_hidden_layers"]  # last resblock left out
    assert single.config.unet.num_attention_heads == UNET2_KW["attention_head_dim"]  # channels / 64
    assert single.config.unet.use_linear_projection and single.config.unet.upcast_attention
    assert single.scheduler_config.prediction_type == folder.scheduler_config.prediction_type == "v_prediction"
    assert single.default_size == folder.default_size == 768


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_encoder_matches_transformers(pipes, reference_sd2, tokenizer_sd2, layout):
    pipe, text_encoder = pipes[layout], reference_sd2[0]
    ids = pipe.tokenizer(PROMPTS)
    np.testing.assert_array_equal(ids, tokenizer_sd2(PROMPTS, padding="max_length", max_length=77).input_ids)
    assert ids[1, 2:].tolist() == [0] * 75  # SD 2.x pads with 0 ("!"), not the end token
    with torch.no_grad():
        ref = text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    # the penultimate OpenCLIP layer's output with the final LayerNorm: diffusers' text encoder has one layer less
    np.testing.assert_allclose(pipe.encode_prompt(PROMPTS), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    _, hidden = pipe.text_encoder(ids, output_hidden_states=True)
    for ours, theirs in zip(hidden, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unet_matches_diffusers(pipes, reference_sd2, layout):
    assert_unet_matches(pipes[layout], reference_sd2[1], CLIP2_KW["hidden_size"], TOL)


@pytest.fixture(scope="module")
def diffusers_pipe(reference_sd2, tokenizer_sd2):
    import diffusers

    text_encoder, unet, vae = reference_sd2
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_sd2, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER2), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


# every deterministic sampler from the folder (v-prediction read from its scheduler config), three from the single
# file (v-prediction by default for SD 2.x)
CASES = [(s, "diffusers") for s in DETERMINISTIC] + [(s, "safetensors") for s in ("ddim", "euler", "dpm++2m")]


@pytest.mark.parametrize("sampler, layout", CASES)
def test_v_prediction_text_to_image_matches_diffusers(pipes, diffusers_pipe, sampler, layout):
    import diffusers

    height, width, steps = 64, 96, 6
    latents = np.random.default_rng(3).standard_normal((1, height // 8, width // 8, 4)).astype(np.float32)
    ours = pipes[layout].text_to_image(PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                                       num_inference_steps=steps, sampler=sampler, latents=latents,
                                       output_type="np").images
    name, extra = DETERMINISTIC[sampler]
    # as users switch samplers: from the loaded SD 2.1 (DDIM, v-prediction) scheduler's config
    sd21 = diffusers.DDIMScheduler.from_config(SCHEDULER2).config
    diffusers_pipe.scheduler = getattr(diffusers, name).from_config(sd21, **extra)
    assert diffusers_pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        ref = diffusers_pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                             guidance_scale=7.5, latents=to_nchw(latents), output_type="np").images
    assert ref.std() > 0.01  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_prediction_type_for_single_files(checkpoints_sd2):
    pipe = StableDiffusion.from_pretrained(checkpoints_sd2["safetensors"], prediction_type="epsilon")
    assert pipe.scheduler_config.prediction_type == "epsilon" and pipe.default_size == 512  # SD 2.x 512 base
    with pytest.raises(InputError, match="prediction_type"):
        StableDiffusion.from_pretrained(checkpoints_sd2["safetensors"], prediction_type="sample")


class Stop(Exception):
    pass


def test_default_size_follows_the_model(pipes):
    def stop(step, total, latents):
        raise Stop(latents.shape)

    with pytest.raises(Stop) as seen:  # stopped after the first step, before decoding 768 x 768 images
        pipes["safetensors"].text_to_image("x", num_inference_steps=1, guidance_scale=1.0, seed=0, callback=stop)
    assert seen.value.args[0] == (1, 96, 96, 4)


def test_upcast_attention_keeps_float16_scores_finite():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 128)).astype(np.float32) * 300 for _ in range(3))  # q.k / 8 ~ 1e5 > float16 max
    scores = np.einsum("bnhd,bmhd->bhnm", q.reshape(1, 4, 2, 64), k.reshape(1, 4, 2, 64)) / 8
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhnm,bmhd->bnhd", probs / probs.sum(-1, keepdims=True), v.reshape(1, 4, 2, 64))
    half = [x.astype(np.float16) for x in (q, k, v)]
    assert not np.isfinite(np.asarray(attention(*half, heads=2), np.float32)).all()
    out = np.asarray(attention(*half, heads=2, upcast=True), np.float32)
    np.testing.assert_allclose(out, expected.reshape(1, 4, 128), atol=0.5, rtol=0.02)  # float16 q, k, v and output


class ShapesOnly:
    """What `infer_config` reads of a checkpoint: its names and shapes."""

    def __init__(self, shapes: dict):
        self.shapes, self.path = shapes, "sd2.safetensors"

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def __contains__(self, key):
        return key in self.shapes


def full_size_sd2_shapes(in_channels: int = 4) -> dict:
    """Names and shapes of a real SD 2.x single file, from the diffusers / transformers models built on no memory."""
    import diffusers
    import transformers

    from stable_diffusion_tf.config import UNetConfig, VAEConfig

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            in_channels=in_channels, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"))
    ucfg, vcfg = UNetConfig.from_diffusers(dict(unet.config)), VAEConfig.from_diffusers(dict(vae.config))
    shapes = {names.unet_compvis(k, ucfg): tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes.update({names.vae_compvis(k, vcfg): tuple(v.shape) for k, v in vae.state_dict().items()})
    for k, v in clip.state_dict().items():
        key, third = names.clip_open_clip(k.removeprefix("text_model."))
        shapes[key] = (3 * v.shape[0], *v.shape[1:]) if third is not None else tuple(v.shape)
    return shapes


def test_full_size_config_is_inferred_from_shapes():
    assert infer_config(ShapesOnly(full_size_sd2_shapes())) == SD2  # 23 of 24 layers, 5/10/20/20 heads, pad 0
    inpainting = infer_config(ShapesOnly(full_size_sd2_shapes(in_channels=9)))
    assert inpainting == dataclasses.replace(SD2, family="sd2-inpainting",
                                             unet=dataclasses.replace(SD2.unet, in_channels=9))


def test_sd2_inpainting_single_file_loads(reference_sd2, tmp_path):
    state = compvis_state_sd2(*reference_sd2)
    conv_in = names.UNET_PREFIX + "input_blocks.0.0.weight"
    state[conv_in] = torch.randn(state[conv_in].shape[0], 9, 3, 3)
    path = str(tmp_path / "sd2-inpainting.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    pipe = StableDiffusion.from_pretrained(path)
    assert pipe.config.family == "sd2-inpainting" and pipe.config.unet.in_channels == 9
    assert pipe.scheduler_config.prediction_type == "epsilon" and pipe.default_size == 512
    np.testing.assert_array_equal(np.asarray(pipe.unet.conv_in.kernel), state[conv_in].numpy().transpose(2, 3, 1, 0))


IN_PROJ = names.OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"


@pytest.mark.parametrize("change, message", [
    (lambda s: {**s, IN_PROJ: s[IN_PROJ][:-3]}, f"tensor {IN_PROJ}\\[0:127\\] has shape \\(127, 128\\)"),
    (lambda s: {**s, names.OPEN_CLIP_PREFIX + "transformer.resblocks.0.ln_3.weight": torch.ones(1)}, "unexpected"),
], ids=["misshaped_in_proj", "unknown_tensor"])
def test_open_clip_tensors_are_checked_by_name(reference_sd2, tmp_path, change, message):
    path = str(tmp_path / "broken.safetensors")
    save_file({k: v.contiguous() for k, v in change(compvis_state_sd2(*reference_sd2)).items()}, path)
    with pytest.raises(CheckpointError, match=message):
        StableDiffusion.from_pretrained(path)


def test_mixed_family_file_is_named_and_refused(tmp_path, reference_sd2):
    state = {**compvis_state_sd2(*reference_sd2), "conditioner.embedders.0.transformer.text_model.x": torch.ones(1)}
    path = str(tmp_path / "sdxl.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError, match="incomplete SDXL checkpoint"):
        StableDiffusion.from_pretrained(path)


def test_text2image_with_an_sd2_file(checkpoints_sd2, tmp_path, capsys):
    flags = ["--weights", checkpoints_sd2["safetensors"], "--prompt", "a red cube", "--H", 64, "--W", 96,
             "--steps", 2, "--seed", 1, "--prediction-type", "epsilon", "--output", tmp_path / "x.png", "--quiet"]
    assert cli.main(list(map(str, flags))) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'x.png'} (seed 1)\n"
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (96, 64) and "Size: 96x64" in im.text["parameters"]
