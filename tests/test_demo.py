"""The shipped demo model: it draws what its prompts say (read back by the pixel classifier in pixels.py), in all
three modes, and the README's first command uses it on a machine without network."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import pixels
from stable_diffusion_tf.hub import DEMO_PATH
from stable_diffusion_tf.training import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURES = 48


def prompt(combination) -> str:
    colour, shape, background = combination
    return data.CAPTION.format(colour=colour, shape=shape, background=background)


def seen_combinations() -> list:
    """PICTURES training combinations, drawn once (fixed seed), one picture each."""
    rng = np.random.default_rng(2026)
    return [data.TRAINING[i] for i in rng.choice(len(data.TRAINING), PICTURES, replace=False)]


def held_out_combinations() -> list:
    """Each held-out combination six times (six seeds)."""
    return [c for c in data.HELD_OUT for _ in range(PICTURES // len(data.HELD_OUT))]


@pytest.fixture(scope="module")
def demo():
    from stable_diffusion_tf import StableDiffusion

    return StableDiffusion.from_pretrained("demo")


def generate(demo, combinations, seed=1000):
    """The CLI's defaults (DDIM, 50 steps, guidance 7.5) at the model's size; seeds seed, seed + 1, ..."""
    result = demo.text_to_image([prompt(c) for c in combinations], seed=seed, batch_size=len(combinations))
    return [np.asarray(image) for image in result.images]


def test_the_demo_model_is_shipped_small_and_loads_by_name(demo):
    assert os.path.getsize(DEMO_PATH) <= 25 * 2**20
    assert demo.source == DEMO_PATH and demo.default_size == data.SIZE
    assert demo.config.sample_size == data.SIZE and demo.scheduler_config.prediction_type == "epsilon"


def test_the_demo_model_draws_what_the_prompt_says(demo):
    combinations = seen_combinations()
    scores = pixels.scores(generate(demo, combinations), combinations)
    print(f"\ndemo model, {PICTURES} prompts of training combinations: {scores}")
    assert scores["colour"] >= 0.95 and scores["background"] >= 0.95 and scores["shape"] >= 0.80, scores


def test_the_demo_model_on_combinations_it_never_saw(demo):
    """Reported, and held to the floor of a model that reads its prompt: each colour word is a one in eight guess."""
    combinations = held_out_combinations()
    scores = pixels.scores(generate(demo, combinations), combinations)
    print(f"\ndemo model, {PICTURES} prompts of held-out combinations: {scores}")
    assert scores["colour"] >= 0.5 and scores["background"] >= 0.5 and scores["shape"] >= 0.5, scores


def test_image_to_image_on_the_demo_model_follows_the_new_prompt(demo):
    scene = data.Scene("red", "square", "blue", (32.0, 32.0), 30.0)
    picture = data.render(scene)
    result = demo.image_to_image([prompt(("yellow", "square", "blue"))] * 4, picture, strength=0.8, seed=7,
                                 batch_size=4)
    read = [pixels.classify(np.asarray(image)) for image in result.images]
    assert sum(r[0] == "yellow" and r[2] == "blue" for r in read) >= 3, read


def test_inpainting_on_the_demo_model_repaints_the_mask_only(demo):
    scene = data.Scene("white", "circle", "black", (32.0, 32.0), 28.0)
    picture = data.render(scene)
    mask = np.zeros((64, 64), np.float32)
    mask[12:52, 12:52] = 1  # the circle and a margin around it
    result = demo.inpaint([prompt(("green", "circle", "black"))] * 4, picture, mask, seed=3, batch_size=4)
    for image in result.images:
        image = np.asarray(image).astype(np.float64)
        outside = mask == 0
        assert np.abs(image[outside] - picture[outside]).mean() < 12  # kept (up to the VAE's round trip)
    read = [pixels.classify(np.asarray(image)) for image in result.images]
    assert sum(r[0] == "green" and r[2] == "black" for r in read) >= 3, read


@pytest.mark.parametrize("network", [
    dict(HF_HUB_OFFLINE="1"),  # offline by choice
    dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9"),  # no Hub to reach (the discard port: refused)
], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_the_first_command_offline_draws_with_the_demo_model(tmp_path, network):
    """The README's first command, without --weights, where SD 1.5 is neither cached nor reachable."""
    (tmp_path / "hf").mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TF_CPP_MIN_LOG_LEVEL": "", **network}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "text2image.py"), "--prompt",
                           "a red circle on a blue background", "--seed", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "wrote output.png (seed 1)\n"
    said = [line for line in proc.stderr.splitlines() if "demo model" in line]
    assert len(said) == 1 and "--weights" in said[0] and said[0].startswith("text2image: "), proc.stderr
    with Image.open(tmp_path / "output.png") as image:
        assert image.size == (data.SIZE, data.SIZE)
        assert "Model: demo" in image.text["parameters"] and "Seed: 1" in image.text["parameters"]
        colour, _, background = pixels.classify(np.asarray(image.convert("RGB")))
    assert (colour, background) == ("red", "blue")
    print(f"\nfirst command offline: {elapsed:.1f} s")
