"""sd-train / train.py: train a latent diffusion model on the generated shapes data (see --help).

With no options it makes the demo model, as shipped in this package:

    python train.py --output stable_diffusion_tf/data/demo.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from ..cli import library_output_only, warnings_as_lines
from ..precision import PRECISIONS

PROG = "sd-train"


def parser() -> argparse.ArgumentParser:
    d = _defaults()
    p = argparse.ArgumentParser(
        prog=PROG, description="Train a small Stable Diffusion model (CLIP text encoder, UNet, KL autoencoder) "
        "from scratch on generated pictures of coloured shapes, captioned 'a red circle on a blue background'. "
        "The autoencoder is trained first, then the UNet and the text encoder. Run it again with the same "
        "--workdir to resume.")
    p.add_argument("--output", default=None, help="where to write the model (.safetensors, CompVis layout; "
                   "default: WORKDIR/model.safetensors)")
    p.add_argument("--workdir", default="runs/demo", help="training state, resumed from when present, and the "
                   "loss curve loss.png (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="the run's seed (data, noise, initial weights)")
    p.add_argument("--vae-steps", type=int, default=d["vae_steps"], help="autoencoder steps (%(default)s)")
    p.add_argument("--vae-batch-size", type=int, default=d["vae_batch_size"], help="(%(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="diffusion steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="(%(default)s)")
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"], help="diffusion (%(default)s)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=d["prediction_type"])
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=d["precision"],
                   help="training precision (%(default)s; the mixed forms keep float32 master weights)")
    p.add_argument("--devices", type=int, default=None, help="data-parallel over this many devices: the GPUs "
                   "present, or on a machine without GPUs logical CPU devices (default: every GPU, else one CPU)")
    p.add_argument("--save-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the written model's tensors (%(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _defaults() -> dict:
    from .trainer import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bad = [f"--{name.replace('_', '-')}" for name in ("vae_steps", "steps", "batch_size", "vae_batch_size")
           if getattr(args, name) < (0 if name.endswith("steps") else 1)]
    if bad or (args.devices is not None and args.devices < 1):
        print(f"{PROG}: error: {(bad or ['--devices'])[0]} must be positive", file=sys.stderr)
        return 2
    output = args.output or os.path.join(args.workdir, "model.safetensors")
    if not output.endswith(".safetensors"):
        print(f"{PROG}: error: --output must end in .safetensors", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with library_output_only(os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"), \
            warnings_as_lines(PROG, shown=not args.quiet):
        return _train(args, output)


def _train(args: argparse.Namespace, output: str) -> int:
    import tensorflow as tf

    devices = _devices(tf, args.devices)
    from tqdm import tqdm

    from .trainer import Trainer, TrainConfig

    config = TrainConfig(seed=args.seed, vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size,
                         steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         prediction_type=args.prediction_type, precision=args.precision)
    try:
        trainer = Trainer(config, args.workdir, devices)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    bars: dict[str, tqdm] = {}

    def progress(stage, step, total, loss):
        if args.quiet:
            return
        if stage not in bars:
            bars[stage] = tqdm(total=total, initial=step - 1, desc=stage, unit="step", file=sys.stderr)
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{loss:.4f}", refresh=False)

    start = time.time()
    if not args.quiet:
        print(f"{PROG}: training in {args.workdir} on {len(devices or [0])} device(s)", file=sys.stderr)
    try:
        trainer.run(progress)
    except (ValueError, FloatingPointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    trainer.export(output, args.save_dtype)
    if not args.quiet:
        print(f"{PROG}: wrote {output} ({os.path.getsize(output) / 1e6:.1f} MB) in {time.time() - start:.0f} s; "
              f"loss curve: {os.path.join(args.workdir, 'loss.png')}", file=sys.stderr)
    return 0


def _devices(tf, count: int | None) -> list[str] | None:
    """The devices to train on: `count` GPUs, or `count` logical CPU devices where there is no GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/gpu:{i}" for i in range(min(count or len(gpus), len(gpus)))]
    if not count or count == 1:
        return None
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return [f"/cpu:{i}" for i in range(count)]
