"""Loader rules: dtypes, key spellings, family detection, and errors that name the tensor or the file."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference import compvis_state, text_encoder_state
from stable_diffusion_tf import CheckpointError, StableDiffusion
from stable_diffusion_tf.weights import names

CONV_IN = names.UNET_PREFIX + "input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def state(reference):
    return compvis_state(*reference)


def write(tmp_path, state, name="model.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def conv_in_kernel(pipe):
    return np.asarray(pipe.unet.conv_in.kernel)  # (kh, kw, in, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_exactly(tmp_path, state, dtype):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    pipe = StableDiffusion.from_pretrained(write(tmp_path, half))
    expected = half[CONV_IN].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(conv_in_kernel(pipe), expected)
    key = names.CLIP_PREFIX + "text_model.final_layer_norm.weight"
    np.testing.assert_array_equal(np.asarray(pipe.text_encoder.final_layer_norm.gamma), half[key].float().numpy())


def test_text_encoder_without_text_model_prefix(tmp_path, checkpoints, reference):
    folder = str(tmp_path / "folder")
    shutil.copytree(checkpoints["diffusers"], folder)
    save_file(text_encoder_state(reference[0], prefix=""), os.path.join(folder, "text_encoder", "model.safetensors"))
    with_prefix = StableDiffusion.from_pretrained(checkpoints["diffusers"]).encode_prompt(["a cat"])
    np.testing.assert_array_equal(StableDiffusion.from_pretrained(folder).encode_prompt(["a cat"]), with_prefix)


def test_missing_tensor_is_named(tmp_path, state):
    key = names.UNET_PREFIX + "middle_block.1.proj_out.weight"
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        StableDiffusion.from_pretrained(write(tmp_path, broken))


def test_misshaped_tensor_is_named(tmp_path, state):
    key = names.VAE_PREFIX + "decoder.conv_out.bias"
    broken = {**state, key: torch.zeros(7)}
    with pytest.raises(CheckpointError, match=f"{key} has shape \\(7,\\)"):
        StableDiffusion.from_pretrained(write(tmp_path, broken))


@pytest.mark.parametrize("key, shape", [
    (names.CLIP_PREFIX + "text_model.encoder.layers.0.self_attn.q_proj.weight", (3, 5)),  # among the first read
    (CONV_IN, (4, 4)),  # a conv kernel of the wrong rank
])
def test_misshaped_tensor_is_refused_before_reading(tmp_path, state, key, shape, monkeypatch):
    from stable_diffusion_tf.weights.formats import TensorFile

    reads = []
    real_get = TensorFile.get
    monkeypatch.setattr(TensorFile, "get", lambda self, name, scratch=False: reads.append(name) or
                        real_get(self, name, scratch))
    with pytest.raises(CheckpointError, match=f"{re.escape(key)} has shape {re.escape(str(shape))}, expected"):
        StableDiffusion.from_pretrained(write(tmp_path, {**state, key: torch.zeros(shape)}))
    assert reads == []  # strict: every shape is checked against the header before any tensor is read


def test_unknown_tensor_inside_the_unet_is_an_error(tmp_path, state):
    key = names.UNET_PREFIX + "input_blocks.1.2.weight"
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        StableDiffusion.from_pretrained(write(tmp_path, {**state, key: torch.zeros(3)}))


def _sdxl(state):
    return {**state, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)}


@pytest.mark.parametrize("change, message", [(_sdxl, "incomplete SDXL checkpoint")])
def test_other_families_are_reported_by_name(tmp_path, state, change, message):
    with pytest.raises(CheckpointError, match=message):
        StableDiffusion.from_pretrained(write(tmp_path, change(state)))


def test_vae_only_file_is_reported(tmp_path, state):
    vae = {k.removeprefix(names.VAE_PREFIX): v for k, v in state.items() if k.startswith(names.VAE_PREFIX)}
    with pytest.raises(CheckpointError, match="VAE-only"):
        StableDiffusion.from_pretrained(write(tmp_path, vae))


def test_diffusers_folder_missing_a_part_of_its_family_is_reported(tmp_path, checkpoints):
    import json

    folder = str(tmp_path / "sdxl")
    shutil.copytree(checkpoints["diffusers"], folder)
    config_path = os.path.join(folder, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "addition_embed_type": "text_time"}, f)
    with pytest.raises(CheckpointError, match="text_encoder_2"):  # SDXL without its second text encoder
        StableDiffusion.from_pretrained(folder)


def test_missing_source_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        StableDiffusion.from_pretrained(str(tmp_path / "nope.safetensors"))


def test_offline_hub_download_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="pass a local checkpoint"):
        StableDiffusion.from_pretrained(None)


def test_malicious_ckpt_is_refused_before_anything_runs(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil()}, path)
    with pytest.raises(CheckpointError, match="refuses to load"):
        StableDiffusion.from_pretrained(path)
    assert not canary.exists()


def test_a_read_error_is_raised_by_from_pretrained_and_reported_by_the_cli(checkpoints, monkeypatch, tmp_path,
                                                                          capsys):
    from stable_diffusion_tf import cli
    from stable_diffusion_tf.weights.formats import TensorFile

    key = names.UNET_PREFIX + "out.2.weight"
    real_get = TensorFile.get

    def get(self, name, scratch=False):
        if name == key:
            raise CheckpointError(f"{self.path}: cannot read {name}: Input/output error")
        return real_get(self, name, scratch)

    monkeypatch.setattr(TensorFile, "get", get)
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(key)}"):
        StableDiffusion.from_pretrained(checkpoints["safetensors"])
    output = tmp_path / "out.png"
    code = cli.main(["--prompt", "x", "--weights", checkpoints["safetensors"], "--output", str(output),
                     "--H", "64", "--W", "64", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot read" in err[0] and not output.exists()


def test_networks_built_without_a_checkpoint_start_random_not_zero(checkpoints):
    """Keras' usual initial values outside `empty_weights()`: an unloaded UNet does not silently return zeros."""
    from stable_diffusion_tf.weights.load import make_models

    pipe = StableDiffusion.from_pretrained(checkpoints["safetensors"])
    fresh = make_models(pipe.config)
    kernels = [np.asarray(v) for v in fresh.unet.weights if v.path.endswith("kernel")]
    assert kernels and all(np.abs(k).max() > 0 for k in kernels)
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    context = pipe.encode_prompt([""])
    out = np.asarray(fresh.unet(latents, np.array([10.0], np.float32), context))
    assert np.isfinite(out).all() and np.abs(out).max() > 0


@pytest.fixture(scope="module")
def other_vae():
    """A VAE with other random weights, as a user's separate VAE file would be."""
    import diffusers

    from reference import VAE_KW, randomize

    return randomize(diffusers.AutoencoderKL(**VAE_KW), 77)


def _save_vae(vae, tmp_path, layout: str) -> str:
    """The VAE as `vae-ft-mse-840000-ema-pruned.safetensors` (original layout, bare or prefixed), a diffusers file,
    or a diffusers folder."""
    from stable_diffusion_tf.config import VAEConfig

    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    if layout == "diffusers-folder":
        vae.save_pretrained(str(tmp_path / "vae"))
        return str(tmp_path / "vae")
    if layout.startswith("original"):
        config = VAEConfig.from_diffusers(dict(vae.config))
        prefix = names.VAE_PREFIX if layout == "original-prefixed" else ""
        state = {prefix + names.vae_compvis(k, config).removeprefix(names.VAE_PREFIX):
                 v[:, :, None, None] if ".mid_block.attentions.0." in k and v.ndim == 2 else v
                 for k, v in state.items()}
    path = str(tmp_path / "vae.safetensors")
    save_file(state, path)
    return path


@pytest.mark.parametrize("layout", ["original", "original-prefixed", "diffusers-file", "diffusers-folder"])
def test_a_separate_vae_in_every_layout(checkpoints, other_vae, tmp_path, layout):
    from reference import to_nchw

    pipe = StableDiffusion.from_pretrained(checkpoints["safetensors"], vae=_save_vae(other_vae, tmp_path, layout))
    latents = np.random.default_rng(2).standard_normal((1, 4, 6, 4)).astype(np.float32)
    with torch.no_grad():
        ref = other_vae.decode(to_nchw(latents) / 0.18215).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pipe.decode_latents(latents), np.clip(ref / 2 + 0.5, 0, 1), atol=1e-4, rtol=0)
    image = pipe.text_to_image("a cat", height=32, width=48, num_inference_steps=2, seed=1, output_type="np").images
    assert image.shape == (1, 32, 48, 3)


def test_a_separate_vae_of_another_shape_or_kind_is_refused(checkpoints, tmp_path):
    import diffusers

    from reference import VAE_KW

    narrow = diffusers.AutoencoderKL(**{**VAE_KW, "block_out_channels": (32, 32, 64, 32)})
    with pytest.raises(CheckpointError, match=r"tensor encoder\.down_blocks\.3\.\S+ has shape \(32, "):
        StableDiffusion.from_pretrained(checkpoints["safetensors"], vae=_save_vae(narrow, tmp_path, "diffusers-file"))
    save_file({"foo.weight": torch.ones(2)}, str(tmp_path / "not-a-vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a VAE"):
        StableDiffusion.from_pretrained(checkpoints["safetensors"], vae=str(tmp_path / "not-a-vae.safetensors"))
