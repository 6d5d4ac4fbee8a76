"""Speed and memory of our SDXL against diffusers' on the same random SDXL base 1.0-shaped weights, at 1024 x 1024.

    python benchmarks/sdxl.py --workdir /tmp/sdxl_bench   # full size, float32 and bfloat16: ~45-90 minutes
    python benchmarks/sdxl.py --quick                     # the tests' tiny SDXL at 64x64: a smoke run (~2.5 minutes)
    python benchmarks/sdxl.py --precision bfloat16 --only memory --workdir /tmp/sdxl_bench

Full size: SDXL base 1.0's shapes with random weights (UNet 2.567B parameters, CLIP ViT-L, OpenCLIP bigG, the SDXL
VAE: 3.47B in all), written once as one original-layout .safetensors in float16, as Stability ships
sd_xl_base_1.0.safetensors (6.94 GB; both sides load that file, widening it for float32), plus a diffusers folder of
configs and tokenizers only, which diffusers' `from_single_file(config=...)` reads. With --workdir the file is kept
and reused by later runs; without, it goes to a temporary folder (7 GB free needed).

Measured, each against diffusers (ratio ours / diffusers; below 1: we are faster or smaller):
  - one guided UNet step: batch 2, 128x128 latents (1024 x 1024), with the pooled text embeds and time ids;
  - one 1024 x 1024 VAE decode, ours as text_to_image decodes (tiled above 768 px) and untiled, against diffusers'
    `vae.decode` (untiled, as its pipeline decodes by default); in bfloat16 our decoder redoes a decode that
    overflows in float32, and a note says whether it did;
  - in a fresh process each: loading the single file (imports included), then one whole 1024 x 1024 image (2 Euler
    steps, decode, PNG saved) and the process's peak RSS: what making an SDXL image takes within 24 GB.
The notes also give how far apart the two sides' UNet outputs and decoded images are (same weights, same inputs).

Unlike benchmark.py, the speed figures come from one fresh process per implementation, run one after the other on
the same inputs (the same NumPy draws), not alternated within one process: two float32 SDXL pipelines (14 GB each)
do not fit in 24 GB together. The machine line and matmul rates printed first say how fast the machine is that day
(it drifts, up to 2x: compare only ratios from the same run). Run it with nothing else large in memory: expect a float32
process to peak near 17 GB (ours) to 21 GB (diffusers, which maps the float16 file beside its widened weights).

Time on 2 cores: a guided SDXL UNet step at 1024^2 is about 6.7 TFLOP, 35-65 s in float32 at this machine's
100-200 GFLOP/s (bfloat16 about 0.6x that), and a 1024^2 decode costs about as much. Building the file took 111 s
(builder peak RSS 7.8 GB). Each precision runs 4 processes (speed and memory, ours and diffusers), about 25 step
times and 4 loads in all with the default 2 repeats: about 25 minutes for float32 and 17 for bfloat16 on a good
day, twice that on a slow one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE]
# benchmark.py also puts the repository root and tests/ on sys.path and sets TF_CPP_MIN_LOG_LEVEL and HF_HUB_OFFLINE
from benchmark import load_ours, machine, matmul_gflops, peak_rss_gb, report, timed, warm_page_cache  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
GUIDANCE = 5.0  # diffusers' SDXL default; any scale above 1 runs the UNet at batch 2
FILE_GB_NEEDED = 8  # the float16 single file is 6.9 GB


# -- the checkpoint ---------------------------------------------------------------------------------------------------


def build_checkpoint(directory: str, quick: bool) -> dict:
    """Random SDXL base as one float16 original-layout .safetensors, plus a diffusers folder of configs only.

    The UNet is made on the meta device, cast to float16 and only then given memory, so the builder never holds
    float32 UNet weights (10.3 GB); the text towers and the VAE are made as usual and cast to float16. Every
    parameter is then drawn as the tests draw theirs (`reference.randomize`: norms around 1, weights with
    variance 1 / fan_in), not left at the constructors' initial values (some of which are zeros).
    """
    import diffusers
    import torch
    import transformers
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import save_file

    import reference
    import reference_sdxl as rx
    from stable_diffusion_tf.weights import names

    if quick:
        unet_kw, vae_kw, clip_l, clip_g = rx.UNET_XL_KW, rx.VAE_XL_KW, rx.CLIP_L_KW, rx.CLIP_G_KW
    else:
        from test_sdxl import BASE_YAML, BIG_G, CLIP_L  # Stability's sd_xl_base.yaml, the Hub's text configs

        original = {"model": {"params": {"network_config": {"params": BASE_YAML},
                                         "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
        unet_kw = sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
        vae_kw = {**rx.VAE_XL_KW, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                  "sample_size": 1024}
        clip_l, clip_g = CLIP_L, BIG_G
    torch.manual_seed(0)
    half = lambda model, seed: reference.randomize(model, seed).to(torch.float16)  # noqa: E731
    text_encoder = half(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_l)), 1)
    text_encoder_2 = half(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip_g)), 2)
    vae = half(diffusers.AutoencoderKL(**vae_kw), 3)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_kw).to(torch.float16)
    assert not list(unet.buffers())  # to_empty leaves buffers unset; the UNet has none
    unet = reference.randomize(unet.to_empty(device="cpu"), 4)

    # reference_sdxl.compvis_state_sdxl, less its last check (that diffusers takes a tiny file for SD 1.x, which a
    # full-size one is not): the UNet, VAE and CLIP-L names are checked against diffusers' converters here, and
    # bigG's by both loaders, which are strict
    state = rx._unet_vae_state(text_encoder, unet, vae)
    state.update(reference.text_encoder_state(text_encoder, prefix=names.SDXL_CLIP_PREFIX + "text_model."))
    state[names.SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update(rx.open_clip_state_xl(text_encoder_2, names.SDXL_OPEN_CLIP_PREFIX))
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}  # logit_scale
    paths = {"safetensors": os.path.join(directory, "sdxl-random-fp16.safetensors"),
             "config": os.path.join(directory, "sdxl-config")}
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    del state

    models = types.SimpleNamespace(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet)
    pipe = rx.xl_pipeline("StableDiffusionXLPipeline", models, paths["config"])  # writes tokenizer, tokenizer_2
    pipe.save_config(paths["config"])  # model_index.json
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(os.path.join(paths["config"], name))
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(os.path.join(paths["config"], name))
    params = sum(p.numel() for m in (text_encoder, text_encoder_2, unet, vae) for p in m.parameters())
    return {**paths, "params": params, "unet_params": sum(p.numel() for p in unet.parameters())}


def checkpoint_in(directory: str, quick: bool) -> dict:
    """The checkpoint in `directory`, built there (in a subprocess, so its memory is gone) unless already there."""
    index = os.path.join(directory, "quick.json" if quick else "full.json")
    if not os.path.isfile(index):
        free = shutil.disk_usage(directory).free / 2**30
        if not quick and free < FILE_GB_NEEDED:
            sys.exit(f"{directory}: {free:.1f} GB free, the checkpoint needs {FILE_GB_NEEDED} GB")
        print(f"building the {'tiny' if quick else 'full-size'} random SDXL checkpoint in {directory} ...", flush=True)
        built = run_worker(["--worker", "build", "--workdir", directory] + (["--quick"] if quick else []))
        if built is None:
            sys.exit("building the checkpoint failed")
        print(f"built in {built['seconds']:.0f} s, builder peak RSS {built['peak_gb']:.2f} GB", flush=True)
    with open(index) as f:
        return json.load(f)


def build_worker(args) -> dict:
    start = time.perf_counter()
    folder = os.path.join(args.workdir, "quick" if args.quick else "full")
    os.makedirs(folder, exist_ok=True)
    paths = build_checkpoint(folder, args.quick)
    with open(os.path.join(args.workdir, "quick.json" if args.quick else "full.json"), "w") as f:
        json.dump(paths, f)
    return {"seconds": time.perf_counter() - start, "peak_gb": peak_rss_gb()}


# -- the two implementations --------------------------------------------------------------------------------------


def load_diffusers_xl(paths: dict, precision: str):
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        paths["safetensors"], config=paths["config"], local_files_only=True, add_watermarker=False,
        torch_dtype=torch.bfloat16 if precision == "bfloat16" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(size: int, context_width: int, pooled_width: int) -> dict:
    """The same draws in every process: guided-step inputs (batch 2) at `size` x `size`."""
    import numpy as np

    rng = np.random.default_rng(0)
    h = size // 8
    return {"latents": rng.standard_normal((2, h, h, 4), dtype=np.float32),
            "context": rng.standard_normal((2, 77, context_width), dtype=np.float32),
            "text_embeds": rng.standard_normal((2, pooled_width), dtype=np.float32),
            "time_ids": np.array([[size, size, 0, 0, size, size]] * 2, np.float32)}


def median_time(fn, repeats: int) -> tuple[float, object]:
    """The median seconds of `repeats` calls after a warm-up (ours traces its compiled call there, both touch
    their working memory), and the last call's output."""
    out = [fn()]
    seconds = [timed(lambda: out.__setitem__(0, fn())) for _ in range(repeats)]
    return statistics.median(seconds), out[0]


def speed_worker(args) -> dict:
    """One implementation's median seconds: the guided UNet step and the 1-image VAE decode, each warmed up first;
    their outputs are saved so that the parent can check that both sides computed the same thing."""
    import numpy as np

    paths = json.loads(args.paths)
    out = os.path.join(args.workdir, f"{args.who}-{args.precision}-{args.size}")
    result, notes = {}, []
    if args.who == "ours":
        pipe = load_ours(paths, args.precision)
        x = inputs(args.size, pipe.config.unet.cross_attention_dim, pipe.config.text_encoder_2.projection_dim)
        step = lambda: pipe.predict_noise(x["latents"], 500, x["context"], text_embeds=x["text_embeds"],  # noqa
                                          time_ids=x["time_ids"])
        result["unet_s"], noise = median_time(step, args.repeats)
        np.save(out + "-unet.npy", noise)
        result["decode_s"], _ = median_time(lambda: pipe.decode_latents(x["latents"][:1]), args.repeats)
        result["decode_untiled_s"], images = median_time(
            lambda: pipe.decode_latents(x["latents"][:1], tiled=False), args.repeats)
        if pipe.precision != "float32":
            redone = getattr(pipe._decoder, "_vae32", None) is not None  # no public way to ask
            notes.append(f"our {args.precision} decode " + ("overflowed: redone in float32 (timed with the redo)"
                                                            if redone else "did not overflow (no float32 redo)"))
    else:
        import torch

        torch.set_grad_enabled(False)
        pipe = load_diffusers_xl(paths, args.precision)
        x = inputs(args.size, pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim)
        t = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if k == "latents" else v))
             .to(pipe.unet.dtype) for k, v in x.items()}
        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
        step = lambda: pipe.unet(t["latents"], 500, t["context"], added_cond_kwargs=added).sample  # noqa: E731
        result["unet_s"], noise = median_time(step, args.repeats)
        np.save(out + "-unet.npy", noise.float().numpy().transpose(0, 2, 3, 1))
        z = t["latents"][:1] / pipe.vae.config.scaling_factor
        result["decode_s"], images = median_time(lambda: pipe.vae.decode(z).sample, args.repeats)
        images = (images.float().numpy().transpose(0, 2, 3, 1) / 2 + 0.5).clip(0, 1)
    np.save(out + "-decode.npy", images)
    if not np.isfinite(images).all():
        notes.append(f"{args.who}: the {args.precision} decode has NaN/inf")
    return {**result, "notes": notes, "peak_gb": peak_rss_gb()}


def memory_worker(args) -> dict:
    """A fresh process: load the single file, make one whole image and save it; the load and image times and the
    peak RSS."""
    paths = json.loads(args.paths)
    png = os.path.join(args.workdir, f"{args.who}-{args.precision}-{args.size}.png")
    notes = []
    start = time.perf_counter()
    if args.who == "ours":
        pipe = load_ours(paths, args.precision)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        image = pipe.text_to_image(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                                   guidance_scale=GUIDANCE, sampler="euler", seed=0).images[0]
        if pipe.precision != "float32" and getattr(pipe._decoder, "_vae32", None) is not None:
            notes.append(f"our {args.precision} decode overflowed and was redone in float32 (in the peak)")
    else:
        import torch

        torch.set_grad_enabled(False)
        pipe = load_diffusers_xl(paths, args.precision)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                     guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(png)
    image_s = time.perf_counter() - start
    return {"load_s": load_s, "image_s": image_s, "peak_gb": peak_rss_gb(), "notes": notes}


def run_worker(argv: list[str]) -> dict | None:
    """What a worker subprocess prints last, parsed; None (after its error output) if it failed."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        print(f"worker {' '.join(argv[:4])} failed (exit {done.returncode}):\n{tail}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent -----------------------------------------------------------------------------------------------------


def both(kind: str, args, paths: dict, precision: str) -> dict:
    results = {}
    for who in ("ours", "diffusers"):
        warm_page_cache(paths["safetensors"])  # each loads from the page cache, not only the second
        start = time.perf_counter()
        results[who] = run_worker(["--worker", kind, "--who", who, "--precision", precision, "--paths",
                                   json.dumps(paths), "--workdir", args.workdir, "--size", str(args.size),
                                   "--steps", str(args.steps), "--repeats", str(args.repeats)])
        print(f"  {kind} [{precision}] {who}: {time.perf_counter() - start:.0f} s"
              + (f", peak RSS {results[who]['peak_gb']:.2f} GB" if results[who] else ""), flush=True)
    return results


def rows(results: dict, precision: str, fields: list[tuple[str, str, str]]) -> list[tuple[str, float, float]]:
    ours, theirs = results["ours"], results["diffusers"]
    if ours is None or theirs is None:
        return []
    return [(f"{name} [{precision}]", ours[mine], theirs[reference]) for name, mine, reference in fields]


def agreement(args, precision: str) -> list[str]:
    """How far apart the two sides' UNet outputs and decoded images are (same weights, same inputs)."""
    import numpy as np

    lines = []
    for what in ("unet", "decode"):
        files = [os.path.join(args.workdir, f"{who}-{precision}-{args.size}-{what}.npy") for who in ("ours",
                                                                                                  "diffusers")]
        if all(os.path.isfile(f) for f in files):
            a, b = (np.load(f).astype(np.float32) for f in files)
            lines.append(f"{what} output, ours vs diffusers [{precision}]: max |diff| {np.abs(a - b).max():.3g}, "
                         f"mean |diff| {np.abs(a - b).mean():.3g} (mean |diffusers| {np.abs(b).mean():.3g})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tests' tiny SDXL at 64x64: a smoke run")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--only", choices=["speed", "memory"], help="the timings alone, or load + whole image alone")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps of the whole image (default 2)")
    parser.add_argument("--workdir", help="keep the random checkpoint (and outputs) here and reuse it on later runs")
    parser.add_argument("--worker", choices=["build", "speed", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--who", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 1024)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        worker = {"build": build_worker, "speed": speed_worker, "memory": memory_worker}[args.worker]
        print(json.dumps(worker(args)))
        return

    import keras
    import tensorflow as tf
    import torch

    print(machine())
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, torch {torch.__version__}, "
          f"diffusers {importlib.metadata.version('diffusers')}; SDXL {'tiny (--quick)' if args.quick else 'base'}, "
          f"image {args.size}x{args.size}, {args.repeats} repeat(s)")
    print(f"float32 matmul 4096x4096: TensorFlow {matmul_gflops('tensorflow'):.0f} GFLOP/s, "
          f"torch {matmul_gflops('torch'):.0f}, NumPy {matmul_gflops('numpy'):.0f}", flush=True)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    with contextlib.ExitStack() as stack:
        if args.workdir:
            os.makedirs(args.workdir, exist_ok=True)
        else:
            args.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdxl-bench-"))
        paths = checkpoint_in(args.workdir, args.quick)
        print(f"checkpoint: {os.path.getsize(paths['safetensors']) / 2**30:.2f} GB float16 single file, "
              f"{paths['params'] / 1e9:.3f}B parameters (UNet {paths['unet_params'] / 1e9:.3f}B)", flush=True)
        table, notes = [], []
        for precision in precisions:
            if args.only != "memory":
                results = both("speed", args, paths, precision)
                table += rows(results, precision, [
                    (f"UNet step, batch 2, {args.size // 8}^2 latents (s)", "unet_s", "unet_s"),
                    (f"VAE decode {args.size}^2, ours as text_to_image (s)", "decode_s", "decode_s"),
                    (f"VAE decode {args.size}^2, both untiled (s)", "decode_untiled_s", "decode_s")])
                notes += [n for r in results.values() if r for n in r["notes"]] + agreement(args, precision)
                notes += [f"peak RSS of the speed process [{precision}]: ours {results['ours']['peak_gb']:.2f} GB, "
                          f"diffusers {results['diffusers']['peak_gb']:.2f} GB"] if all(results.values()) else []
            if args.only != "speed":
                results = both("memory", args, paths, precision)
                table += rows(results, precision, [
                    ("load the single file, imports included (s)", "load_s", "load_s"),
                    (f"first image after it, {args.steps} steps euler (s)", "image_s", "image_s"),
                    ("peak RSS, load + whole image (GB)", "peak_gb", "peak_gb")])
                notes += [n for r in results.values() if r for n in r["notes"]]
        print()
        report("diffusers", table)
        for note in notes:
            print("-", note)


if __name__ == "__main__":
    main()
