"""Textual-inversion embeddings in A1111's and diffusers' files give diffusers' conditioning; bad files are refused."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference import diffusers_pipeline
from stable_diffusion_tf import CheckpointError, InputError, UnsupportedModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of myemb on a table"


@pytest.fixture(scope="module")
def diffusers_pipe(reference, tmp_path_factory):
    return diffusers_pipeline("StableDiffusionPipeline", *reference, str(tmp_path_factory.mktemp("tok")))


def vectors(count, width=128, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32))


def write(folder, layout, v, name="myemb"):
    """`v` saved as people's files hold embeddings; returns the path."""
    if layout == "a1111.pt":
        path = os.path.join(folder, f"{name}.pt")
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": name, "step": 500,
                    "sd_checkpoint": "abc123", "sd_checkpoint_name": "model"}, path)
    elif layout == "a1111.safetensors":
        path = os.path.join(folder, f"{name}.safetensors")
        save_file({"emb_params": v}, path)
    elif layout == "diffusers.bin":
        path = os.path.join(folder, f"{name}.bin")
        torch.save({f"<{name}>": v[0] if len(v) == 1 else v}, path)
    else:
        path = os.path.join(folder, f"{name}.safetensors")
        save_file({f"<{name}>": v}, path)
    return path


def diffusers_conditioning(diffusers_pipe, v, prompt):
    diffusers_pipe.load_textual_inversion({"myemb": v}, token="myemb")
    try:
        with torch.no_grad():
            embeds, _ = diffusers_pipe.encode_prompt(prompt, "cpu", 1, False)
        return embeds.numpy()
    finally:
        diffusers_pipe.unload_textual_inversion()


@pytest.mark.parametrize("layout", ["a1111.pt", "a1111.safetensors", "diffusers.bin", "diffusers.safetensors"])
@pytest.mark.parametrize("count", [1, 3])
def test_embeddings_give_diffusers_conditioning(pipe, diffusers_pipe, tmp_path, layout, count):
    v = vectors(count, seed=count)
    path = write(str(tmp_path), layout, v)
    assert pipe.load_embedding(path) == "myemb"
    try:
        ours = pipe.encode_prompt(PROMPT)
    finally:
        pipe.embeddings.clear()
    np.testing.assert_allclose(ours, diffusers_conditioning(diffusers_pipe, v, PROMPT), atol=1e-5, rtol=0)
    # the name's tokens are replaced: without the embedding the prompt encodes differently
    assert not np.allclose(ours, pipe.encode_prompt(PROMPT), atol=1e-3)


def test_an_embedding_in_the_negative_prompt_and_weighted(pipe, tmp_path):
    pipe.load_embedding(write(str(tmp_path), "a1111.safetensors", vectors(2)), name="badthing")
    try:
        plain = pipe.encode_prompt("badthing")
        weighted = pipe.encode_prompt("(badthing:1.3)")
        result = pipe.text_to_image("a cat", negative_prompt="badthing, blurry", height=64, width=64,
                                    num_inference_steps=2, seed=1, output_type="np")
    finally:
        pipe.embeddings.clear()
    assert not np.allclose(plain, weighted) and np.isfinite(result.images).all()
    import hashlib

    with open(tmp_path / "myemb.safetensors", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    assert f'TI hashes: "badthing: {digest}"' in result.parameters[0]


def test_an_embedding_that_does_not_fit_moves_to_the_next_chunk(pipe, tmp_path):
    pipe.load_embedding(write(str(tmp_path), "a1111.safetensors", vectors(5)), name="myemb")
    try:
        chunks = pipe._chunks("cube " * 73 + "myemb")
    finally:
        pipe.embeddings.clear()
    assert len(chunks.ids) == 2 and chunks.fixes == [[], [(1, "myemb")]]
    assert chunks.ids[1][1:6] == [0] * 5


def test_bad_embedding_files_are_refused(pipe, tmp_path):
    save_file({"emb_params": vectors(1, width=1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match=r"sd2.safetensors.*\(1, 1024\).*expected \(n, 128\)"):
        pipe.load_embedding(tmp_path / "sd2.safetensors")
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="not an embedding file"):
        pipe.load_embedding(tmp_path / "two.safetensors")
    save_file({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(UnsupportedModelError, match="SDXL embedding"):
        pipe.load_embedding(tmp_path / "xl.safetensors")
    save_file({"emb_params": torch.full((1, 128), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        pipe.load_embedding(tmp_path / "nan.safetensors")
    with pytest.raises(InputError, match="no tokens"):
        pipe.load_embedding(write(str(tmp_path), "a1111.safetensors", vectors(1)), name="   ")
    assert pipe.embeddings == {}


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_hostile_pt_embedding_is_never_executed(pipe, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": vectors(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refuses to load global"):
        pipe.load_embedding(path)
    assert not os.path.exists("pwned") and not os.path.exists(tmp_path / "pwned")


def test_cli_embeddings(checkpoints, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write(str(folder), "a1111.pt", vectors(2))
    write(str(folder), "a1111.safetensors", vectors(1, width=1024), name="unused")  # not in the prompt: not read
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1"}

    def run(*flags):
        return subprocess.run([sys.executable, "text2image.py", "--weights", checkpoints["safetensors"], "--H", "64",
                               "--W", "64", "--steps", "1", "--seed", "1", "--quiet", *map(str, flags)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)

    proc = run("--prompt", "a myemb cube", "--embeddings-dir", folder, "--output", tmp_path / "a.png")
    assert proc.returncode == 0, proc.stderr
    proc = run("--prompt", "a cube", "--embedding", folder / "unused.safetensors", "--output", tmp_path / "b.png")
    assert proc.returncode == 2 and proc.stderr.startswith("text2image: error: ") and "unused.safetensors" in \
        proc.stderr and not (tmp_path / "b.png").exists()
    proc = run("--prompt", "a cube", "--embedding", folder / "missing.pt", "--output", tmp_path / "c.png")
    assert proc.returncode == 2 and "--embedding" in proc.stderr
