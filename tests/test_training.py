"""The training loop on a tiny model: it learns, resumes exactly, splits over devices, and writes a checkpoint
that loads as every other one does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pixels
from stable_diffusion_tf import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from stable_diffusion_tf.errors import CheckpointError
from stable_diffusion_tf.training import data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TINY = ModelConfig(
    "sd1",
    CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), layers_per_block=1,
               num_attention_heads=(2, 2), cross_attention_dim=32, norm_num_groups=8),
    VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
)


def tiny(**changes):
    from stable_diffusion_tf.training.trainer import TrainConfig

    values = dict(model=TINY, size=32, vae_steps=3, vae_batch_size=4, steps=3, batch_size=4, checkpoint_every=100)
    return TrainConfig(**{**values, **changes})


def state(trainer) -> dict[str, np.ndarray]:
    return {name: np.array(v.numpy()) for name, v in trainer._state_variables().items()}


# -- the data ----------------------------------------------------------------------------------------------------


def test_examples_are_a_function_of_seed_and_index():
    a, b = data.scene(3, 17), data.scene(3, 17)
    assert a == b and data.scene(4, 17) != a
    np.testing.assert_array_equal(data.render(a), data.render(b))
    assert a.caption == f"a {a.colour} {a.shape} on a {a.background} background"


def test_held_out_combinations_are_never_drawn():
    assert len(data.HELD_OUT) == 8 and set(data.HELD_OUT) == set(data.combinations(held_out=True))
    assert not set(data.HELD_OUT) & set(data.TRAINING)
    assert len(data.TRAINING) + len(data.HELD_OUT) == 8 * 7 * 3
    drawn = {(s.colour, s.shape, s.background) for s in (data.scene(0, i) for i in range(3000))}
    assert not drawn & set(data.HELD_OUT) and len(drawn) == len(data.TRAINING)
    # every colour stays seen both as a shape's colour and as a background
    assert {c for c, _, _ in data.TRAINING} == {b for _, _, b in data.TRAINING} == set(data.COLOURS)


def test_the_pixel_classifier_reads_the_rendered_pictures():
    """The classifier the demo model is judged by reads the training pictures themselves without error."""
    scenes = [data.scene(11, i) for i in range(300)]
    assert pixels.scores([data.render(s) for s in scenes], scenes) == {"colour": 1.0, "background": 1.0,
                                                                       "shape": 1.0}


def test_batches_hold_dropped_captions_and_per_example_noise():
    from stable_diffusion_tf.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    examples = data.Examples(tokenizer, seed=1, batch_size=200, size=32, caption_dropout=0.1)
    batch = examples.batch(0)
    assert batch.images.shape == (200, 32, 32, 3) and batch.noise.shape == (200, 4, 4, 4)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    empty = (batch.ids == tokenizer("")[0]).all(axis=1)
    assert 5 <= empty.sum() <= 40  # about 10% of 200
    assert 0 <= batch.timesteps.min() and batch.timesteps.max() < 1000
    # example i of batch 1 is example 200 + i of the run, whatever the batch size
    other = data.Examples(tokenizer, seed=1, batch_size=100, size=32, caption_dropout=0.1)
    np.testing.assert_array_equal(other.batch(1).noise, batch.noise[100:])


# -- the loop ----------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(tmp_path):
    import tensorflow as tf

    from stable_diffusion_tf.training.trainer import Trainer

    trainer = Trainer(tiny(vae_steps=40, steps=40, vae_batch_size=8, batch_size=8), tmp_path)
    fixed = data.Examples(trainer.tokenizer, seed=99, batch_size=16, size=32).batch(0)
    fixed = data.Batch(*(tf.constant(t) for t in fixed))

    def losses():
        return (float(trainer._vae_loss(fixed, 16.0)), float(trainer._diffusion_loss(fixed, 16.0)))

    before = losses()
    history = trainer.run()
    after = losses()
    assert len(history["vae"]) == 40 and len(history["diffusion"]) == 40
    assert after[0] < 0.8 * before[0], (before, after)
    assert after[1] < 0.8 * before[1], (before, after)
    assert os.path.isfile(tmp_path / "loss.png") and os.path.isfile(tmp_path / "state.safetensors")


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Interrupted in the autoencoder stage, resumed, finished, then continued with more diffusion steps: the same
    weights, optimiser moments, EMA and losses as one uninterrupted run, bit for bit."""
    from stable_diffusion_tf.training.trainer import Trainer

    whole = Trainer(tiny(steps=4), tmp_path / "whole")
    whole.run()
    first = Trainer(tiny(steps=2), tmp_path / "parts")
    first.run(stop_after=2)  # two of the three autoencoder steps, then stopped
    assert len(first.history["vae"]) == 2 and not first.history["diffusion"]
    Trainer(tiny(steps=2), tmp_path / "parts").run()  # a new process would start here
    longer = Trainer(tiny(steps=4), tmp_path / "parts")  # the finished run, given more steps
    history = longer.run()
    assert history == whole.history and len(history["diffusion"]) == 4
    expected, got = state(whole), state(longer)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_state_from_another_configuration_is_refused(tmp_path):
    from stable_diffusion_tf.training.trainer import Trainer

    Trainer(tiny(), tmp_path).run(stop_after=1)
    with pytest.raises(ValueError, match="different training configuration"):
        Trainer(tiny(seed=5), tmp_path).run()


TWO_DEVICES = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {tests!r})
from test_training import tiny
from stable_diffusion_tf.training.trainer import Trainer
out = {{}}
for name, devices in (("one", None), ("two", ["/cpu:0", "/cpu:1"])):
    trainer = Trainer(tiny(), {workdir!r} + "/" + name, devices)
    assert trainer.strategy.num_replicas_in_sync == (2 if devices else 1)
    grads = {{}}
    for stage in ("vae", "diffusion"):
        batches = trainer.examples(4).dataset(0, 1)
        batch = next(iter(trainer.strategy.experimental_distribute_dataset(batches)))
        grads[stage] = trainer.gradients(stage, batch, 4.0)
    out[name] = (grads, trainer.run())
(g1, h1), (g2, h2) = out["one"], out["two"]
grads = max(max(float(np.max(np.abs(a - b))) for a, b in zip(g1[s], g2[s])) /
            max(float(np.max(np.abs(a))) for a in g1[s]) for s in g1)
first = abs(h1["vae"][0] - h2["vae"][0]) / h1["vae"][0]
later = max(abs(a - b) / a for s in h1 for a, b in zip(h1[s], h2[s]))
print(json.dumps({{"grads": grads, "first": first, "later": later, "steps": sum(map(len, h2.values()))}}))
"""


def test_two_devices_equal_one(tmp_path):
    """MirroredStrategy over two logical CPU devices: each takes half of every batch and the gradients are summed.

    Only the order of float sums differs, so the first step's loss agrees with one device's to 1e-6 and the summed
    gradients of both stages to 1e-4 of their largest element (float32 sums over 32x32x3 pixels). Later losses agree to 2%, not better: Adam's first update of a weight is lr * sign(g), so a
    gradient that is zero up to rounding (a bias before a GroupNorm) moves by +-lr on one run and -+lr on the other
    (with SGD the two runs agree to 1e-7).
    """
    script = TWO_DEVICES.format(tests=HERE, workdir=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 6
    assert result["grads"] < 1e-4 and result["first"] < 1e-6 and result["later"] < 0.02, result


# -- the written model -------------------------------------------------------------------------------------------


def test_the_written_model_loads_like_any_checkpoint(tmp_path):
    import tensorflow as tf

    from stable_diffusion_tf import StableDiffusion
    from stable_diffusion_tf.training.trainer import Trainer

    trainer = Trainer(tiny(), tmp_path)
    trainer.run()
    path = tmp_path / "model.safetensors"
    trainer.export(path, dtype="float32")
    pipe = StableDiffusion.from_pretrained(str(path))
    assert pipe.config == trainer.model_config()
    assert pipe.default_size == 32 and pipe.scheduler_config.prediction_type == "epsilon"
    assert pipe.config.vae.scaling_factor == pytest.approx(float(trainer.scaling_factor.numpy()))
    # the written UNet and text encoder are the EMA weights, not the last step's
    for average, variable in zip(trainer.ema, trainer.diffusion_variables):
        variable.assign(average)
    ids = pipe.tokenizer(["a red circle on a blue background", ""])
    rng = np.random.default_rng(0)
    latents, t = rng.standard_normal((2, 4, 4, 4), dtype=np.float32), np.array([10.0, 900.0], np.float32)
    context = pipe.encode_prompt(["a red circle on a blue background", ""])
    np.testing.assert_allclose(context, trainer.text_encoder(ids).numpy(), atol=1e-6)
    np.testing.assert_allclose(pipe.predict_noise(latents, t, context),
                               trainer.unet(latents, t, tf.constant(context)).numpy(), atol=1e-5)
    images = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(pipe.encode_image(images) / pipe.config.vae.scaling_factor,
                               trainer.vae.encode(images * 2 - 1)[0].numpy(), atol=1e-5)
    result = pipe.text_to_image("a red circle on a blue background", num_inference_steps=2, seed=1)
    assert result.images[0].size == (32, 32) and "Size: 32x32" in result.parameters[0]


def test_the_compvis_layout_is_the_one_real_files_use(checkpoints, tmp_path):
    """A CompVis file of the torch reference models (its names checked against diffusers' own converter), loaded
    and written again, gives back every one of its model tensors unchanged."""
    from stable_diffusion_tf.training.export import compvis_tensors
    from stable_diffusion_tf.weights.load import IGNORED, load

    original = load_file(checkpoints["safetensors"])
    models = load(checkpoints["safetensors"])
    written = compvis_tensors(models.config, *models.networks)
    kept = {k: v for k, v in original.items() if not IGNORED.match(k)}
    assert written.keys() == kept.keys()
    for key, value in kept.items():
        assert written[key].shape == value.shape, key
        np.testing.assert_allclose(written[key], value.astype(np.float32), atol=0, rtol=0, err_msg=key)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny model written before any training step: (trainer, path)."""
    from stable_diffusion_tf.training.trainer import Trainer

    folder = tmp_path_factory.mktemp("untrained")
    trainer = Trainer(tiny(vae_steps=0, steps=0), folder)
    trainer.export(folder / "good.safetensors", dtype="float32")
    return trainer, str(folder / "good.safetensors")


def _with_metadata(source, target, change):
    from stable_diffusion_tf.weights.load import CONFIG_METADATA

    tensors = load_file(source)
    from safetensors import safe_open

    with safe_open(source, "np") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA])
    change(config)
    save_file(tensors, target, metadata={CONFIG_METADATA: json.dumps(config)})
    return target


@pytest.mark.parametrize("change, message", [
    (lambda c: c["unet"].update(num_attention_heads=[3, 3]), "impossible UNet heads"),
    (lambda c: c["unet"].update(block_out_channels=[64, 64]), "disagrees with the tensor shapes"),
    (lambda c: c["vae"].update(scaling_factor=-1.0), "impossible scaling factor"),
    (lambda c: c.update(sample_size=33), "impossible sample size"),
    (lambda c: c["text_encoder"].update(hidden_act="os.system"), "impossible text-encoder activation"),
    (lambda c: c.pop("unet"), "unusable"),
])
def test_a_config_in_the_metadata_is_checked(untrained, tmp_path, change, message):
    from stable_diffusion_tf import StableDiffusion

    bad = _with_metadata(untrained[1], str(tmp_path / "bad.safetensors"), change)
    with pytest.raises(CheckpointError, match=message):
        StableDiffusion.from_pretrained(bad)


def test_heads_from_the_metadata_are_used(untrained, tmp_path):
    from stable_diffusion_tf.weights.load import load

    trainer, good = untrained
    path = _with_metadata(good, str(tmp_path / "four.safetensors"), lambda c: c["unet"].update(num_attention_heads=[4, 4]))
    assert load(path).config.unet.num_attention_heads == (4, 4)
    assert load(good).config == trainer.model_config()


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], "--steps must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--output", "model.ckpt"], "--output must end in .safetensors"),
])
def test_sd_train_refuses_bad_arguments(tmp_path, args, message, capsys):
    from stable_diffusion_tf.training.cli import main

    assert main(["--workdir", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_train_py_makes_a_loadable_model(tmp_path):
    """The documented command, shortened to one step per stage: a model file, the state and the loss curve."""
    out = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path / "run"), "--vae-steps", "1",
                          "--steps", "1", "--batch-size", "2", "--vae-batch-size", "2", "--output",
                          str(tmp_path / "m.safetensors")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote" in out.stderr and "loss=" in out.stderr
    for name in ("run/state.safetensors", "run/loss.png", "m.safetensors"):
        assert os.path.getsize(tmp_path / name) > 0, name
    from stable_diffusion_tf.weights.load import load

    assert load(str(tmp_path / "m.safetensors")).config.sample_size == data.SIZE
