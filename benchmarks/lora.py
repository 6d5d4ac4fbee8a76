"""What a LoRA costs the SD 1.5 UNet step: merged into the weights (what `load_lora` + `<lora:...>` do) against the
two ways of keeping it apart, on random SD 1.5-shaped weights and a random rank-32 kohya LoRA on every attention
layer of the UNet (192 modules, as kohya trains by default).

    python benchmarks/lora.py                       # float32 and bfloat16, 512x512, UNet batch 2
    python benchmarks/lora.py --quick               # tiny model: a smoke run

- plain: the base weights;
- merged: the LoRA added into the kernels once (`apply_loras`), so the step runs the same kernels as plain;
- Keras LoRA: Keras' own `enable_lora` (kernel + A @ B recomputed on every call);
- side branch: x @ W + scale * (x @ A) @ B on every call (PEFT's unmerged LoRA).

Each step is one compiled call, alternated between the variants (median of the repeats); ratios are to plain.
The time `apply_loras` takes to merge (switching LoRAs between generations) and to put the base back is printed
too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RANK = 32


def kohya_lora(pipe, path: str, rank: int) -> int:
    """A random kohya file over every Dense of the UNet's transformer blocks and projections; returns the count."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for (part, layer), leaf in pipe._lora_targets().items():
        if part != "unet" or ".attentions." not in f".{layer}." or len(leaf.kernel.shape) != 2:
            continue
        inputs, out = leaf.kernel.shape
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, inputs)) / np.sqrt(inputs)).astype("f4")
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((out, rank)) / np.sqrt(rank) / 10).astype("f4")
        tensors[f"{name}.alpha"] = np.array(rank / 2, "f4")
    save_file(tensors, path)
    return len(tensors) // 3


def side_branches(pipe, name: str, weight: float, keras_lora: bool) -> list:
    """Puts the LoRA `name` beside the base kernels of its layers; returns an undo callable per layer."""
    import keras
    from keras import ops

    layers = pipe._lora_targets()
    undo = []
    for module in pipe.loras[name].modules:
        leaf = layers[(module.part, module.layer)]
        down, up = module.tensors["lora_down.weight"], module.tensors["lora_up.weight"]
        a = keras.Variable(down.T, dtype=leaf.kernel.dtype, trainable=False)
        b = keras.Variable((up * module.scale * weight).T, dtype=leaf.kernel.dtype, trainable=False)
        if keras_lora:
            leaf.enable_lora(down.shape[0], lora_alpha=down.shape[0])  # alpha / rank = 1: the scale is in B
            leaf.lora_kernel_a.assign(a)
            leaf.lora_kernel_b.assign(b)
            undo.append(lambda leaf=leaf: setattr(leaf, "lora_enabled", False))
        else:
            call = leaf.call
            leaf.call = lambda x, call=call, a=a, b=b: call(x) + ops.matmul(ops.matmul(x, a), b)
            undo.append(lambda leaf=leaf: vars(leaf).pop("call"))
    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for precision in (["float32", "bfloat16"] if args.precision == "both" else [args.precision]):
        run(precision, args.quick, args.repeats)


def run(precision: str, quick: bool, repeats: int) -> None:
    import numpy as np
    import tensorflow as tf

    from stable_diffusion_tf import StableDiffusion
    from stable_diffusion_tf.config import SD1
    from stable_diffusion_tf.lora import LoraTag
    from stable_diffusion_tf.precision import WEIGHT_DTYPES, policy
    from stable_diffusion_tf.weights.load import make_models

    config = SD1
    if quick:
        import dataclasses

        config = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, block_out_channels=(32, 64, 64, 64)))
    mode = policy(precision)
    pipe = StableDiffusion(make_models(config, WEIGHT_DTYPES[mode]), precision=mode)
    size = 64 if quick else 512
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.safetensors")
        count = kohya_lora(pipe, path, 8 if quick else RANK)
        pipe.load_lora(path, "bench")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, size // 8, size // 8, 4)).astype("f4")
    timesteps = np.array([500, 500], "f4")
    context = rng.standard_normal((2, 77, config.unet.cross_attention_dim)).astype("f4")

    def stepper():
        unet = pipe.unet
        step = tf.function(lambda x, t, c: unet(x, t, c))
        step(latents, timesteps, context)  # trace and warm up
        return lambda: step(latents, timesteps, context).numpy()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    tag = [LoraTag("bench", 1.0, 1.0)]
    plain = stepper()
    start = time.perf_counter()
    pipe.apply_loras(tag)
    merge_time = time.perf_counter() - start
    start = time.perf_counter()
    pipe.apply_loras([])
    restore_time = time.perf_counter() - start
    steps = {"plain": plain, "merged": plain}  # merged: the same compiled step over the changed kernels
    for kind, keras_lora in (("Keras LoRA", True), ("side branch", False)):
        undo = side_branches(pipe, "bench", 1.0, keras_lora)
        steps[kind] = stepper()  # the traced step keeps the branches after they are taken off the layers
        for u in undo:
            u()
    times = {kind: [] for kind in steps}
    for _ in range(repeats):  # alternated, so a slow moment of the machine hits every variant alike
        for kind, step in steps.items():
            pipe.apply_loras(tag if kind == "merged" else [])
            times[kind].append(timed(step))
    pipe.apply_loras([])
    base = statistics.median(times["plain"])
    print(f"\n{precision}: SD 1.5 UNet step at {size}x{size}, batch 2, rank-{8 if quick else RANK} LoRA on {count} "
          f"modules (median of {repeats})")
    print("| variant | UNet step | ratio to plain |\n|---|---|---|")
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"| {kind} | {median:.2f} s | {median / base:.3f} |")
    print(f"merging the LoRA into the weights: {merge_time:.2f} s; putting the base weights back: {restore_time:.2f} s")


if __name__ == "__main__":
    main()
