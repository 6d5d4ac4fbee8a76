"""Latent-diffusion training (Rombach et al. 2022): the KL autoencoder first, then the UNet and the text encoder
in its latent space.

Stage 1 (`vae`): reconstruction (L1 on pixels and on their horizontal and vertical differences, which keeps
flat-coloured edges sharp) plus a KL term toward N(0, I) weighted as in the paper's KL-f8 models. After it,
the latent scaling factor is set to 1 / std of the latents, as the paper does.

Stage 2 (`diffusion`): noise prediction (or v-prediction) on SD's scaled-linear schedule, classifier-free
guidance training by dropping the caption of some examples, the text encoder trained jointly, an exponential
moving average (EMA) of the UNet and text-encoder weights, which is what gets exported.

Every random draw comes from the data (`data.Batch`), so a run is a function of its seed; the whole state
(weights, optimiser moments, EMA, step, loss history) is saved every `checkpoint_every` steps and a run
started again continues exactly where it stopped. With several devices (GPUs, or logical CPU devices) the
global batch is split over them by `tf.distribute.MirroredStrategy` and the gradients summed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from .. import precision as precisions
from ..config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from ..schedules import SchedulerConfig, alphas_cumprod
from ..tokenizer import CLIPTokenizer
from ..weights.load import make_models
from . import data
from .export import save_checkpoint

STATE_FILE = "state.safetensors"
STAGES = ("vae", "diffusion")

# The demo model: Stable Diffusion's three networks at small sizes (about 10 M parameters in all). Its norms
# have fewer groups than SD's 32: a group of one or two channels normalises away the colour of a flat region,
# and these pictures are flat colours.
DEMO_MODEL = ModelConfig(
    "sd1",
    CLIPConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
    UNetConfig(block_out_channels=(64, 128, 128), attention_levels=(True, True, False), layers_per_block=1,
               num_attention_heads=(2, 4, 4), cross_attention_dim=64, norm_num_groups=8),
    VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=4),
    sample_size=data.SIZE,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults make the demo model."""

    model: ModelConfig = DEMO_MODEL
    seed: int = 0
    size: int = data.SIZE
    vae_steps: int = 2500
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # per pixel, as the paper's KL-f8 (1e-6 on sums over the image)
    edge_weight: float = 1.0
    steps: int = 8000
    batch_size: int = 32
    learning_rate: float = 3e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    prediction_type: str = "epsilon"
    precision: str = "float32"
    checkpoint_every: int = 500

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def run_identity(self) -> dict:
        """What a saved state must agree on to be resumed: everything but the stage lengths and the checkpoint
        interval (nothing in a step depends on them, so a finished run can be continued with more steps)."""
        values = json.loads(self.to_json())
        for key in ("steps", "vae_steps", "checkpoint_every"):
            values.pop(key)
        return values


Progress = Callable[[str, int, int, float], None]  # (stage, step done, steps in the stage, loss)


class Trainer:
    """One training run in `workdir`: `run()` trains both stages (resuming from the saved state) and writes
    the model to `output`."""

    def __init__(self, config: TrainConfig, workdir: str | os.PathLike, devices: list[str] | None = None):
        self.config, self.workdir = config, os.fspath(workdir)
        if config.size % 8 or config.batch_size < 1 or config.vae_batch_size < 1:
            raise ValueError("size must be a multiple of 8 and batch sizes positive")
        self.strategy = tf.distribute.MirroredStrategy(devices) if devices and len(devices) > 1 \
            else tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas or config.vae_batch_size % replicas:
            raise ValueError(f"batch sizes must divide over the {replicas} devices")
        self.tokenizer = CLIPTokenizer(max_length=config.model.text_encoder.max_position_embeddings,
                                       pad_token_id=config.model.pad_token_id)
        policy = precisions.policy(config.precision)
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            models = make_models(config.model, policy)
            self.text_encoder, self.unet, self.vae = models.networks
            self.vae_optimizer = _optimizer(config.vae_learning_rate, policy)
            self.optimizer = _optimizer(config.learning_rate, policy)
            self.vae_optimizer.build(self.vae.trainable_variables)
            self.optimizer.build(self.diffusion_variables)
            self.ema = [tf.Variable(v, trainable=False, name=f"ema_{i}")
                        for i, v in enumerate(self.diffusion_variables)]
            self.scaling_factor = tf.Variable(1.0, trainable=False, name="scaling_factor")
        self.history = {stage: [] for stage in STAGES}
        ac = alphas_cumprod(SchedulerConfig(prediction_type=config.prediction_type))
        self.alphas_cumprod = tf.constant(ac, tf.float32)
        self._vae_step = self._distributed(self._vae_loss, self.vae_optimizer, lambda: self.vae.trainable_variables)
        self._diffusion_step = self._distributed(self._diffusion_loss, self.optimizer,
                                                 lambda: self.diffusion_variables, ema=True)

    @property
    def diffusion_variables(self) -> list:
        return [*self.unet.trainable_variables, *self.text_encoder.trainable_variables]

    # -- losses (per replica: summed over its examples, divided by the global batch) --------------------------

    def _posterior(self, images, eps):
        mean, logvar = (tf.cast(t, tf.float32) for t in self.vae.encode(images))
        logvar = tf.clip_by_value(logvar, -30.0, 20.0)
        return mean, logvar, mean + tf.exp(0.5 * logvar) * eps

    def _vae_loss(self, batch: data.Batch, global_batch: int):
        mean, logvar, z = self._posterior(batch.images, batch.posterior)
        out = tf.cast(self.vae.decode(z), tf.float32)
        x = batch.images

        def dx(t):
            return t[:, :, 1:] - t[:, :, :-1]

        def dy(t):
            return t[:, 1:] - t[:, :-1]

        pixels = float(np.prod(x.shape[1:]))
        reconstruction = tf.reduce_mean(tf.abs(out - x), axis=(1, 2, 3))
        edges = tf.reduce_mean(tf.abs(dx(out) - dx(x)), axis=(1, 2, 3)) + \
            tf.reduce_mean(tf.abs(dy(out) - dy(x)), axis=(1, 2, 3))
        kl = 0.5 * tf.reduce_sum(tf.square(mean) + tf.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)) / pixels
        per_example = reconstruction + self.config.edge_weight * edges + self.config.kl_weight * kl
        return tf.reduce_sum(per_example) / global_batch

    def _diffusion_loss(self, batch: data.Batch, global_batch: int):
        _, _, z = self._posterior(batch.images, batch.posterior)
        latents = tf.stop_gradient(z) * self.scaling_factor
        ac = tf.gather(self.alphas_cumprod, batch.timesteps)[:, None, None, None]
        noisy = tf.sqrt(ac) * latents + tf.sqrt(1.0 - ac) * batch.noise
        target = batch.noise if self.config.prediction_type == "epsilon" else \
            tf.sqrt(ac) * batch.noise - tf.sqrt(1.0 - ac) * latents
        context = self.text_encoder(batch.ids)
        prediction = tf.cast(self.unet(noisy, tf.cast(batch.timesteps, tf.float32), context), tf.float32)
        per_example = tf.reduce_mean(tf.square(prediction - target), axis=(1, 2, 3))
        return tf.reduce_sum(per_example) / global_batch

    def _distributed(self, loss_fn, optimizer, variables, ema: bool = False):
        strategy = self.strategy

        def replica_step(batch, global_batch):
            trainable = variables()
            with tf.GradientTape() as tape:
                loss = loss_fn(batch, global_batch)
                scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
            grads = tape.gradient(scaled, trainable)
            optimizer.apply_gradients(zip(grads, trainable))  # Keras sums the gradients over the replicas
            return loss

        @tf.function
        def step(batch, global_batch):
            losses = strategy.run(replica_step, args=(batch, global_batch))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
            if ema:
                self._update_ema()
            return loss

        return step

    def gradients(self, stage: str, batch: data.Batch, global_batch: float) -> list[np.ndarray]:
        """The gradient of a stage's loss over a (distributed) batch, summed over the devices as a step sums it."""
        loss_fn, variables = (self._vae_loss, lambda: self.vae.trainable_variables) if stage == "vae" else \
            (self._diffusion_loss, lambda: self.diffusion_variables)

        def replica(b):
            with tf.GradientTape() as tape:
                loss = loss_fn(b, global_batch)
            return [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables())]

        per_replica = self.strategy.run(replica, args=(batch,))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None).numpy() for g in per_replica]

    def _update_ema(self):
        """EMA with CompVis' warm-up: decay min(ema_decay, (1 + n) / (10 + n)) at update n."""
        n = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(self.config.ema_decay, (1.0 + n) / (10.0 + n))
        for average, variable in zip(self.ema, self.diffusion_variables):
            average.assign(average * decay + tf.cast(variable, average.dtype) * (1.0 - decay))

    # -- the run -----------------------------------------------------------------------------------------------

    def examples(self, batch_size: int) -> data.Examples:
        c = self.config
        return data.Examples(self.tokenizer, seed=c.seed, batch_size=batch_size, size=c.size,
                             latent_channels=c.model.vae.latent_channels, caption_dropout=c.caption_dropout,
                             num_train_timesteps=1000)

    def run(self, progress: Progress | None = None, stop_after: int | None = None) -> dict:
        """Trains what is left of both stages; returns the loss history. `stop_after` ends the run after that
        many steps (counting both stages) with the state saved, as an interruption would."""
        self.restore()
        budget = [np.inf if stop_after is None else stop_after]
        for stage, total, batch_size, step in (
                ("vae", self.config.vae_steps, self.config.vae_batch_size, self._vae_step),
                ("diffusion", self.config.steps, self.config.batch_size, self._diffusion_step)):
            if stage == "diffusion" and len(self.history["vae"]) == self.config.vae_steps and \
                    not self.history["diffusion"] and float(self.scaling_factor.numpy()) == 1.0:
                self.scaling_factor.assign(self.measure_scaling_factor())
            done = len(self.history[stage])
            if not self._train_stage(stage, done, total, batch_size, step, budget, progress):
                return self.history
        return self.history

    def _train_stage(self, stage, done, total, batch_size, step, budget, progress) -> bool:
        if done >= total:
            return True
        stop = int(min(total, done + budget[0]))
        dataset = self.strategy.experimental_distribute_dataset(self.examples(batch_size).dataset(done, stop))
        global_batch = tf.constant(batch_size, tf.float32)
        for i, batch in enumerate(dataset, start=done):
            loss = float(step(batch, global_batch).numpy())
            if not np.isfinite(loss):
                raise FloatingPointError(f"{stage} loss is {loss} at step {i}")
            self.history[stage].append(loss)
            budget[0] -= 1
            if progress is not None:
                progress(stage, i + 1, total, loss)
            if (i + 1) % self.config.checkpoint_every == 0 or i + 1 == total:
                self.save()
        if stop < total:
            self.save()
            return False
        return True

    def measure_scaling_factor(self, batches: int = 8) -> float:
        """1 / std of the VAE's latents over `batches` batches of held-aside examples (the paper's rescaling)."""
        examples = data.Examples(self.tokenizer, seed=self.config.seed + 1, batch_size=self.config.batch_size,
                                 size=self.config.size, latent_channels=self.config.model.vae.latent_channels)
        latents = []
        for b in range(batches):
            batch = examples.batch(b)
            latents.append(self._posterior(tf.constant(batch.images), tf.constant(batch.posterior))[2].numpy())
        return float(np.float32(1.0 / np.std(np.concatenate(latents))))

    # -- state ---------------------------------------------------------------------------------------------

    def _state_variables(self) -> dict[str, tf.Variable]:
        named = {}
        for group, variables in (("text_encoder", self.text_encoder.weights), ("unet", self.unet.weights),
                                 ("vae", self.vae.weights), ("vae_optimizer", self.vae_optimizer.variables),
                                 ("optimizer", self.optimizer.variables), ("ema", self.ema)):
            named.update({f"{group}/{i}": v for i, v in enumerate(variables)})
        named["scaling_factor"] = self.scaling_factor
        return named

    def save(self) -> None:
        """Writes the whole state to `workdir/state.safetensors` (atomically) and the loss curve beside it."""
        from safetensors.numpy import save_file

        os.makedirs(self.workdir, exist_ok=True)
        tensors = {name: np.asarray(v.numpy()) for name, v in self._state_variables().items()}
        for stage in STAGES:
            tensors[f"history/{stage}"] = np.asarray(self.history[stage], np.float64)
        path = os.path.join(self.workdir, STATE_FILE)
        save_file(tensors, path + ".tmp", metadata={"train_config": self.config.to_json()})
        os.replace(path + ".tmp", path)
        plot_losses(self.history, os.path.join(self.workdir, "loss.png"))

    def restore(self) -> bool:
        """Loads `workdir/state.safetensors` if there is one (made with the same TrainConfig)."""
        from safetensors import safe_open

        path = os.path.join(self.workdir, STATE_FILE)
        if not os.path.isfile(path):
            return False
        with safe_open(path, "np") as f:
            saved = (f.metadata() or {}).get("train_config")
            try:
                identity = TrainConfig(**{**json.loads(saved), "model": self.config.model}).run_identity()
                same = identity == self.config.run_identity() and json.loads(saved)["model"] == \
                    json.loads(self.config.to_json())["model"]
            except (TypeError, ValueError):
                same = False
            if not same:
                raise ValueError(f"{path} was made by a different training configuration; use another workdir")
            for name, variable in self._state_variables().items():
                variable.assign(f.get_tensor(name))
            self.history = {stage: [float(x) for x in f.get_tensor(f"history/{stage}")] for stage in STAGES}
        if len(self.history["vae"]) > self.config.vae_steps and self.history["diffusion"]:
            raise ValueError(f"{path}: the autoencoder was trained for {len(self.history['vae'])} steps, more than "
                             f"--vae-steps {self.config.vae_steps}, and the diffusion stage has begun")
        return True

    # -- the model -----------------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        c = self.config
        return dataclasses.replace(
            c.model, vae=dataclasses.replace(c.model.vae, scaling_factor=float(self.scaling_factor.numpy())),
            sample_size=c.size, prediction_type=c.prediction_type)

    def export(self, path: str | os.PathLike, dtype: str = "float16") -> None:
        """Writes the model, with the EMA weights, as one CompVis-layout .safetensors file with its config."""
        live = [v.numpy() for v in self.diffusion_variables]
        try:
            for average, variable in zip(self.ema, self.diffusion_variables):
                variable.assign(tf.cast(average, variable.dtype))
            save_checkpoint(path, self.model_config(), self.text_encoder, self.unet, self.vae, dtype)
        finally:
            for value, variable in zip(live, self.diffusion_variables):
                variable.assign(value)


def _optimizer(learning_rate: float, policy: str):
    optimizer = keras.optimizers.Adam(learning_rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if policy == "mixed_float16" else optimizer


def plot_losses(history: dict[str, list[float]], path: str) -> None:
    """The loss curves of both stages (raw and smoothed, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if history.get(s)]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        losses = np.asarray(history[stage])
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.8, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"vae": "autoencoder (L1 + edges + KL)", "diffusion": "diffusion (noise MSE)"}[stage])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
