"""Bad input and hostile files through the library and the CLI: one clear error, nothing executed, nothing lost.

Each hostile checkpoint goes through `StableDiffusion.from_pretrained` (typed error) and `text2image`
(exit code 2, one error line), and afterwards no canary file exists and the output folder is unchanged.
Hostile images go through image_to_image / inpaint and img2img / inpaint the same way. The byte-level
readers are covered case by case, and fuzzed, in test_formats.py; images in test_images.py; this module
reuses their builders.
"""

import os
import warnings

import numpy as np
import pytest
import torch

from stable_diffusion_tf import CheckpointError, InputError, StableDiffusion, StableDiffusionError, cli
from test_formats import BROKEN, _members, _payloads, _replace, _write_zip
from test_images import _noise_image, _png_header, _truncated

CLI_BROKEN = ["truncated safetensors", "header too large", "overlap", "duplicate key", "dotdot member",
              "byteorder big", "view past storage", "legacy torch", "empty", "lfs pointer", "html", "random bytes",
              "missing"]


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def outdir(tmp_path):
    """An output folder that already holds a file a careless tool could overwrite."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "output.png").write_bytes(b"precious")
    return folder


def run_cli(weights, outdir, capsys, *extra):
    before = snapshot(outdir)
    code = cli.main(["--prompt", "x", "--weights", str(weights), "--output", str(outdir / "new.png"),
                     "--H", "64", "--W", "64", "--steps", "1", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert snapshot(outdir) == before
    return code, err


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    return path


@pytest.mark.parametrize("kind", list(_payloads("x")))
def test_hostile_pickle_is_never_run(tmp_path, plain_ckpt, outdir, capsys, kind):
    canary = tmp_path / "canary"
    path = _write_zip(tmp_path / "model.ckpt", _replace(_members(plain_ckpt), "data.pkl", _payloads(canary)[kind]))
    with pytest.raises(CheckpointError, match="refuses to load global"):
        StableDiffusion.from_pretrained(path)
    code, err = run_cli(path, outdir, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("text2image: error:") and "refuses" in err[0]
    assert not canary.exists()


@pytest.mark.parametrize("kind", CLI_BROKEN)
def test_broken_checkpoint_gives_one_line(tmp_path, plain_ckpt, outdir, capsys, kind):
    build, fragment = BROKEN[kind]
    path = tmp_path / "model.safetensors"
    build(path, plain_ckpt.parent)
    with pytest.raises(CheckpointError, match="(?i)" + fragment.replace("(", r"\(")):
        StableDiffusion.from_pretrained(path)
    code, err = run_cli(path, outdir, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("text2image: error:")


def test_wrong_families_are_named_before_any_compute(tmp_path, outdir, capsys):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, str(sdxl))
    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.ones(1), "decoder.conv_out.weight": torch.ones(1)}, str(vae_only))
    for path, fragment in ((sdxl, "SDXL"), (vae_only, "VAE-only")):
        with pytest.raises(CheckpointError, match=fragment):
            StableDiffusion.from_pretrained(path)
        code, err = run_cli(path, outdir, capsys)
        assert code == 2 and len(err) == 1 and fragment in err[0]


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


@pytest.mark.parametrize("prompt", ["", "a" * 5000, "a cat\x00 on a mat", "lone \ud800 surrogate",
                                    "שלום עולם مرحبا", "🧑‍🚀🐴 (masterpiece:1.3) [[x]]", "\t\n  \r"])
def test_odd_prompts_generate(pipe, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of them warns
        result = pipe.text_to_image(prompt, height=64, width=64, num_inference_steps=1, seed=1, output_type="np")
    assert result.images.shape == (1, 64, 64, 3) and np.isfinite(result.images).all()
    assert result.parameters[0].count("\n") >= 1


def test_overlong_prompt_is_an_input_error(pipe):
    with pytest.raises(InputError, match="prompt too long"):
        pipe.text_to_image("a " * 3000, height=64, width=64, num_inference_steps=1, seed=1, output_type="np")


@pytest.mark.parametrize("kwargs", [dict(height=0), dict(height=-64), dict(width=100), dict(width=4096),
                                    dict(num_inference_steps=0), dict(num_inference_steps=10**6),
                                    dict(guidance_scale=float("nan")), dict(guidance_scale=-1.0),
                                    dict(guidance_scale=float("inf")), dict(seed=2**40), dict(prompt=None),
                                    dict(prompt=["a", 3]), dict(negative_prompt=["a", "b"]),
                                    dict(latents=np.full((1, 8, 8, 4), np.nan, np.float32))])
def test_bad_numbers_are_input_errors(pipe, kwargs):
    args = {"prompt": "x", "height": 64, "width": 64, "num_inference_steps": 1, **kwargs}
    with pytest.raises(InputError):
        pipe.text_to_image(**args)


@pytest.mark.parametrize("flags", [["--H", "0"], ["--H", "-64"], ["--W", "100"], ["--W", "4096"], ["--steps", "0"],
                                   ["--steps", "99999999"], ["--scale", "nan"], ["--scale", "-1"],
                                   ["--sampler", "k_euler"], ["--seed", "-3"], ["--batch", "0"]])
def test_bad_numbers_exit_2_without_loading(checkpoints, outdir, capsys, flags):
    code, err = run_cli(checkpoints["safetensors"], outdir, capsys, *flags)
    assert code == 2 and len(err) == 1 and err[0].startswith("text2image: error:")


def test_nan_latents_are_never_written_black(pipe, monkeypatch, outdir, capsys, checkpoints):
    """A model that produces NaN stops with an error and writes no image."""
    monkeypatch.setattr(StableDiffusion, "predict_noise", lambda self, x, t, c: np.full(np.shape(x), np.nan, "f4"))
    with pytest.raises(StableDiffusionError, match="NaN"):
        pipe.text_to_image("x", height=64, width=64, num_inference_steps=2, seed=0)
    code, err = run_cli(checkpoints["safetensors"], outdir, capsys)
    assert code == 2 and "NaN" in err[0]


IMAGE_CASES = {  # name: (write(path), message fragment); builders from test_images.py
    "notes.png": (lambda p: p.write_text("hello"), "not a PNG"),
    "truncated.png": (lambda p: _truncated(p, "PNG"), "cannot read it"),
    "bomb.png": (lambda p: p.write_bytes(_png_header(20000, 20000)), "decompression bomb"),
    "image.tga": (lambda p: _noise_image().save(p, format="TGA"), "not a PNG"),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_hostile_images_through_library_and_clis(pipe, checkpoints, tmp_path, outdir, capsys, name):
    write, fragment = IMAGE_CASES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(InputError, match=fragment):
        pipe.image_to_image("x", str(path), num_inference_steps=1)
    with pytest.raises(InputError, match=fragment):
        pipe.inpaint("x", _noise_image(64, 64), str(path), num_inference_steps=1)
    for mode, flags in (("img2img", ["--init-image", str(path)]),
                        ("inpaint", ["--image", str(path), "--mask", str(path)])):
        before = snapshot(outdir)
        code = getattr(cli, mode)(["--prompt", "x", "--weights", checkpoints["safetensors"], "--steps", "1",
                                   "--output", str(outdir / "new.png"), "--quiet", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"{mode}: error:") and fragment in err[0]
        assert snapshot(outdir) == before


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_0_1(pipe, strength):
    with pytest.raises(InputError, match="strength"):
        pipe.image_to_image("x", _noise_image(64, 64), strength=strength, num_inference_steps=1)
