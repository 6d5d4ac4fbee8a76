"""Speed and memory of this project against diffusers, side by side on the same random SD 1.5 weights.

    python benchmarks/benchmark.py            # full size: SD 1.5 shapes, 512x512 (about 20 minutes on 2 cores)
    python benchmarks/benchmark.py --quick    # tiny model, 64x64: a smoke run of every measurement
    python benchmarks/benchmark.py --kerascv  # also against KerasCV 0.9 (pip install -e ".[bench]")

Speed figures come from one process that holds both implementations and alternates between them; peak
memory and load time come from one fresh subprocess per implementation. Every line prints both numbers
and the ratio ours / theirs (below 1 means we are faster or smaller).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def build_checkpoint(directory: str, quick: bool) -> dict:
    """Random-weight models saved as a CompVis single file and a diffusers folder (the tests' fixture code)."""
    import diffusers
    import torch
    import transformers

    import reference

    torch.manual_seed(0)
    if quick:
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**reference.CLIP_KW))
        unet, vae = diffusers.UNet2DConditionModel(**reference.UNET_KW), diffusers.AutoencoderKL(**reference.VAE_KW)
    else:
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_CLIP))
        unet, vae = diffusers.UNet2DConditionModel(**SD15_UNET), diffusers.AutoencoderKL(**SD15_VAE)
    paths = reference.save_all(directory, te.eval(), unet.eval(), vae.eval())
    with open(os.path.join(paths["diffusers"], "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f)
    return paths


def checkpoint_in(directory: str, quick: bool) -> dict:
    """The checkpoint files in `directory`, built there unless an earlier run with --workdir left them."""
    index = os.path.join(directory, "quick.json" if quick else "full.json")
    if os.path.isfile(index):
        with open(index) as f:
            return json.load(f)
    folder = os.path.join(directory, "quick" if quick else "full")
    os.makedirs(folder, exist_ok=True)
    paths = build_checkpoint(folder, quick)
    with open(index, "w") as f:
        json.dump(paths, f)
    return paths


def load_ours(paths: dict, precision: str):
    from stable_diffusion_tf import StableDiffusion

    return StableDiffusion.from_pretrained(paths["safetensors"], precision=precision)  # bfloat16: mixed_bfloat16


def load_diffusers(paths: dict, precision: str):
    import diffusers
    import torch

    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        paths["safetensors"], config=paths["diffusers"], local_files_only=True, torch_dtype=dtype,
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(paths: dict, precision: str, size: int, steps: int, repeats: int) -> list[tuple[str, float, float]]:
    """Median seconds of the UNet step (batch 2), VAE decode (1 image) and a whole image, alternating."""
    import diffusers
    import numpy as np
    import torch

    torch.set_grad_enabled(False)
    ours, theirs = load_ours(paths, precision), load_diffusers(paths, precision)
    dtype = next(theirs.unet.parameters()).dtype
    h = size // 8
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, h, h, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, ours.config.text_encoder.hidden_size)).astype(np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(dtype)
    t_context = torch.from_numpy(context).to(dtype)
    theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    from stable_diffusion_tf import StableDiffusion
    from stable_diffusion_tf.weights.load import Models

    xla = StableDiffusion(Models(ours.config, ours.text_encoder, ours.unet, ours.vae), precision=ours.precision,
                          jit_compile=True)  # the same networks, the UNet compiled by XLA
    jobs = {  # name: (ours, diffusers, warm-up first)
        "UNet step, batch 2": (lambda: ours.predict_noise(latents, 500, context),
                               lambda: theirs.unet(t_latents, 500, t_context), True),
        "UNet step, batch 2, XLA (jit_compile=True)": (lambda: xla.predict_noise(latents, 500, context),
                                                       lambda: theirs.unet(t_latents, 500, t_context), True),
        "VAE decode, 1 image": (lambda: ours.decode_latents(latents[:1]),
                                lambda: theirs.vae.decode(t_latents[:1] / 0.18215), True),
        f"whole image, {steps} steps dpm++2m": (
            lambda: ours.text_to_image("a photo", height=size, width=size, num_inference_steps=steps,
                                       sampler="dpm++2m", seed=0, output_type="np"),
            lambda: theirs("a photo", height=size, width=size, num_inference_steps=steps, output_type="np"),
            False),  # the UNet and VAE shapes are warm from the jobs above
    }
    return alternate(jobs, precision, repeats)


def alternate(jobs: dict, precision: str, repeats: int) -> list[tuple[str, float, float]]:
    """Median seconds of each job's two sides, run in turns. jobs: name -> (ours, theirs, warm up first)."""
    rows = []
    for name, (mine, reference, warm_up) in jobs.items():
        if warm_up:
            mine(), reference()
        a, b = [], []
        for _ in range(repeats):  # alternate so that drift in machine load hits both alike
            a.append(timed(mine))
            b.append(timed(reference))
        rows.append((f"{name} [{precision}]", statistics.median(a), statistics.median(b)))
    return rows


def load_kerascv(precision: str, size: int):
    """KerasCV 0.9's SD 1.x UNet and VAE decoder, made as its `StableDiffusion` makes them, with random weights.

    Its constructors download the real weights unless told not to; both are compiled with XLA for
    `predict_on_batch`, as its default `jit_compile=True` does. KerasCV takes mixed precision from Keras'
    global policy, which is set here only while its networks are made.
    """
    import keras
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        unet = DiffusionModel(size, size, 77, download_weights=False)
        decoder = Decoder(size, size, download_weights=False)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    unet.compile(jit_compile=True)
    decoder.compile(jit_compile=True)
    return unet, decoder


def kerascv_speed(paths: dict, precision: str, size: int, repeats: int) -> list[tuple[str, float, float]]:
    """Median seconds of the UNet step and the VAE decode against KerasCV 0.9, alternating.

    Two ways each: the same call shapes as ours, each side compiled as one tf.function without XLA
    (KerasCV's networks at their fastest here), and as each pipeline runs them by default: ours as
    `text_to_image` does, KerasCV as its `generate_image` does (XLA; the guided step as two batch-1
    `predict_on_batch` calls, unconditional then conditional).
    """
    import numpy as np
    import tensorflow as tf
    from keras_cv.models import StableDiffusion as KerasCVStableDiffusion

    ours = load_ours(paths, precision)
    unet, decoder = load_kerascv(precision, size)
    h = size // 8
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, h, h, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 768)).astype(np.float32)
    temb = np.asarray(KerasCVStableDiffusion(size, size, jit_compile=False)._get_timestep_embedding(500, 2))
    unet_fn = tf.function(lambda x, t, c: unet([x, t, c], training=False), autograph=False)
    decode_fn = tf.function(lambda z: decoder(z, training=False), autograph=False)

    def kerascv_guided_step():
        for i in range(2):
            unet.predict_on_batch({"latent": latents[i:i + 1], "timestep_embedding": temb[i:i + 1],
                                   "context": context[i:i + 1]})

    step, decode = (lambda: ours.predict_noise(latents, 500, context)), (lambda: ours.decode_latents(latents[:1]))
    jobs = {
        "UNet step, batch 2, one tf.function each": (step, lambda: unet_fn(latents, temb, context).numpy(), True),
        "guided UNet step, each pipeline's default": (step, kerascv_guided_step, True),
        "VAE decode, 1 image, one tf.function each": (decode, lambda: decode_fn(latents[:1]).numpy(), True),
        "VAE decode, 1 image, each pipeline's default": (decode, lambda: decoder.predict_on_batch(latents[:1]),
                                                         True),
    }
    return alternate(jobs, precision, repeats)


def worker(args) -> None:
    """One fresh process: imports, load, one whole image saved as PNG; the phases of that first image; peak RSS.

    The first image is timed in three parts from step callbacks: until its first step ends (text encoding, and for
    ours the tracing of the UNet step and its first call), the steps after the first, and after the last step
    (decode, to PIL; for ours the tracing of the decoder). `--worker kerascv` runs the KerasCV timings instead: in
    the speed process, beside the diffusers comparison's networks, they ran out of this machine's 24 GB.
    """
    paths = json.loads(args.paths)
    if args.worker == "kerascv":
        print(json.dumps(kerascv_speed(paths, args.precision, args.size, args.repeats)))
        return
    start = time.perf_counter()
    pipe = (load_ours if args.worker == "ours" else load_diffusers)(paths, args.precision)
    load_seconds = time.perf_counter() - start
    marks = [time.perf_counter()]
    if args.worker == "ours":
        image = pipe.text_to_image("a photo", height=args.size, width=args.size, num_inference_steps=args.steps,
                                   sampler="dpm++2m", seed=0,
                                   callback=lambda k, n, x: marks.append(time.perf_counter())).images[0]
    else:
        import diffusers
        import torch

        def on_step(pipeline, i, t, tensors):
            marks.append(time.perf_counter())
            return tensors

        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        with torch.no_grad():
            image = pipe("a photo", height=args.size, width=args.size, num_inference_steps=args.steps,
                         callback_on_step_end=on_step).images[0]
    end = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        image.save(os.path.join(folder, "image.png"))
    print(json.dumps({"load_s": load_seconds, "image_s": end - marks[0], "first_step_s": marks[1] - marks[0],
                      "later_steps_s": marks[-1] - marks[1], "after_steps_s": end - marks[-1],
                      "whole_s": time.perf_counter() - start, "peak_gb": peak_rss_gb()}))


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it is not inherited from the parent)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


def warm_page_cache(path: str) -> None:
    """Reads a file once, so that each implementation loads it from the page cache, not the one that goes first."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def in_subprocess(who: str, paths: dict, precision: str, size: int, steps: int, repeats: int = 1):
    """What `--worker who` prints last, parsed: its own process, so its memory is gone when it returns."""
    out = subprocess.run([sys.executable, __file__, "--worker", who, "--paths", json.dumps(paths), "--precision",
                          precision, "--size", str(size), "--steps", str(steps), "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def isolated(paths: dict, precision: str, size: int, steps: int) -> list[tuple[str, float, float]]:
    results = {}
    for who in ("ours", "diffusers"):
        warm_page_cache(paths["safetensors"])
        results[who] = in_subprocess(who, paths, precision, size, steps)
    rows = [("load single file, imports included", "load_s"), ("first image after the load", "image_s"),
            ("  of it: until the first step ends", "first_step_s"), ("  of it: the later steps", "later_steps_s"),
            ("  of it: after the last step (decode)", "after_steps_s"),
            ("whole image: load, image, PNG saved", "whole_s")]
    return [(f"{name} [{precision}] (s)", results["ours"][key], results["diffusers"][key]) for name, key in rows] + [
        (f"peak RSS, load + whole image [{precision}] (GB)", results["ours"]["peak_gb"],
         results["diffusers"]["peak_gb"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["speed", "memory"], help="run one half: the timings, or load + peak RSS")
    parser.add_argument("--kerascv", action="store_true",
                        help="also time the UNet step and VAE decode against KerasCV 0.9 (keras-cv installed)")
    parser.add_argument("--workdir", help="keep the random checkpoints in this folder and reuse them on later runs")
    parser.add_argument("--worker", choices=["ours", "diffusers", "kerascv"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 512)
    args.steps = args.steps or (3 if args.quick else 20)
    if args.kerascv and args.quick:
        parser.error("--kerascv needs full-size weights: KerasCV's networks are SD 1.x-sized only")
    if args.kerascv and importlib.util.find_spec("keras_cv") is None:
        parser.error("--kerascv needs KerasCV: pip install -e \".[bench]\"")
    if args.worker:
        worker(args)
        return
    import keras
    import tensorflow as tf
    import torch

    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    repeats = 1 if args.quick else args.repeats
    print(machine())
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, torch {torch.__version__}, "
          f"diffusers {importlib.metadata.version('diffusers')}; image {args.size}x{args.size}")
    print(f"float32 matmul 4096x4096: TensorFlow {matmul_gflops('tensorflow'):.0f} GFLOP/s, "
          f"torch {matmul_gflops('torch'):.0f}, NumPy {matmul_gflops('numpy'):.0f}")
    with contextlib.ExitStack() as stack:
        directory = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        paths = checkpoint_in(directory, args.quick)
        size_gb = os.path.getsize(paths["safetensors"]) / 2**30
        print(f"checkpoint: {size_gb:.2f} GB single file")
        for precision in precisions:
            rows = [] if args.only == "memory" else speed(paths, precision, args.size, args.steps, repeats)
            rows += [] if args.only == "speed" else isolated(paths, precision, args.size, args.steps)
            report("diffusers", rows)
            if args.kerascv and args.only != "memory":
                report("KerasCV", in_subprocess("kerascv", paths, precision, args.size, args.steps, repeats))


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> str:
    """CPU model, the flags that decide which kernels run, and the core count."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    have = [flag for flag in CPU_FLAGS if flag in flags]
    return f"CPU: {model}, {os.cpu_count()} cores; flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"


def matmul_gflops(library: str, n: int = 4096, repeats: int = 3) -> float:
    """The best float32 n x n matmul rate of one library here: the ceiling a convolution-heavy step runs against."""
    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
    if library == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(a), tf.constant(b)
        run = lambda: tf.linalg.matmul(a, b).numpy()  # noqa: E731
    elif library == "torch":
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
        run = lambda: torch.mm(a, b)  # noqa: E731
    else:
        run = lambda: a @ b  # noqa: E731
    run()
    best = min(timed(run) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def report(reference: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"{'measurement':55s} {'ours':>9s} {reference:>10s} {'ratio':>7s}")
    for name, mine, theirs in rows:
        print(f"{name:55s} {mine:9.3f} {theirs:10.3f} {mine / theirs:7.2f}", flush=True)


if __name__ == "__main__":
    main()
