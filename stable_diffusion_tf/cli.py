"""`text2image`, `img2img` and `inpaint`: the command lines for StableDiffusion.text_to_image, image_to_image
and inpaint, sharing their flags, checks, output files and progress bar.

Every flag (and the input image and mask) is checked before TensorFlow is imported or weights are loaded; a
bad one gives one `text2image: error:` (`img2img: error:`, `inpaint: error:`) line on stderr and exit code 2,
and no file is written. Status goes to stderr, one line per stage (loading, preparing the compiled step,
the denoising bar, decoding), the written paths and seeds to stdout; `--quiet` keeps stderr empty on
success. The library's warnings come as one `text2image: warning:` line each; TensorFlow's, absl's and
Keras' own output is hidden (set TF_CPP_MIN_LOG_LEVEL=0 to see it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
import warnings

# numpy and PIL only, all of them: TensorFlow is imported after the flags are checked
from .checks import MAX_BATCH, MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_MULTIPLE
from .config import REFINER_SWITCH
from .embeddings import embedding_files
from .errors import DownloadError, InputError, StableDiffusionError, StableDiffusionWarning
from .hub import DEMO, demo_path, looks_like_repo_id, resolve
from .images import load_image, load_image_and_mask
from .lora import LORA_KINDS, TAG, lora_files, lora_name, lora_tags
from .output import check_output_path, numbered_paths, save_png
from .recipe import PNG_KEY, parse_infotext, sampler_from_label
from .precision import CHOICES as PRECISIONS, WEIGHT_DTYPES
from .samplers import SAMPLERS
from .schedules import PREDICTION_TYPES

DESCRIPTIONS = {"text2image": "Generate images from a text prompt with Stable Diffusion (TensorFlow).",
                "img2img": "Redraw an image guided by a text prompt with Stable Diffusion (TensorFlow).",
                "inpaint": "Repaint the white part of a mask over an image with Stable Diffusion (TensorFlow)."}
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage block), so scripts can show it as is."""

    def error(self, message: str):
        _print_error(message, self.prog)
        raise SystemExit(EXIT_USAGE)


def _int_in(low: int, high: int, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high or value % multiple:
            what = f"a multiple of {multiple} " if multiple > 1 else "an integer "
            raise argparse.ArgumentTypeError(f"must be {what}between {low} and {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, above: bool = False):
    """A parser of numbers in [low, high], or (low, high] when `above`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high or above and value == low:
            what = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            what = f"above {low:g} and at most {high:g}" if above else what
            raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
        return value

    return parse


def build_parser(mode: str = "text2image") -> argparse.ArgumentParser:
    """The flags of `mode` (text2image, img2img or inpaint): the shared ones plus the mode's inputs."""
    p = _Parser(prog=mode, description=DESCRIPTIONS[mode],
                epilog="With --batch N > 1 the files are numbered: out.png -> out-0.png, out-1.png, ... "
                       "Each PNG stores its recipe (prompt, steps, sampler, seed...) in a 'parameters' text chunk.")
    p.add_argument("--prompt", required=True,
                   help="the text to draw (AUTOMATIC1111's syntax: (word:1.2), BREAK, [from:to:when], <lora:name:0.8>)")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="take prompt (with its <lora:...> tags: give --lora-dir), negative prompt, steps, sampler, "
                        "scale, seed, size, clip skip (and strength, mask blur) from a PNG's AUTOMATIC1111 recipe "
                        "(ours or A1111's); flags given beside it win")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--output", default="output.png", help="PNG file to write (default: output.png)")
    if mode == "text2image":
        size = _int_in(MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE)
        p.add_argument("--H", type=size, default=None,
                       help="image height, multiple of 8 (default: the model's: 1024 for SDXL, 768 for SD 2.x "
                            "v-models, else 512)")
        p.add_argument("--W", type=size, default=None,
                       help="image width, multiple of 8 (default: the model's: 1024 for SDXL, 768 for SD 2.x "
                            "v-models, else 512)")
        p.add_argument("--refiner", default=None, metavar="WEIGHTS",
                       help="a model (the SDXL refiner: a file, folder or Hub repo id) that takes over the last steps")
        p.add_argument("--refiner-switch", type=_float_in(0, 1, above=True), default=REFINER_SWITCH,
                       metavar="FRACTION", help="where the refiner takes over, as diffusers' denoising_end "
                                                f"(default: {REFINER_SWITCH})")
    else:
        p.add_argument("--init-image", "--image", dest="image", required=True, metavar="PATH",
                       help="the starting image (PNG, JPEG, WebP, BMP, GIF or TIFF); the output has its size, "
                            "rounded down to multiples of 8")
        strength = 0.75 if mode == "img2img" else 1.0
        p.add_argument("--strength", type=_float_in(0, 1), default=strength,
                       help=f"how much to change, 0 (nothing) to 1 (all of it) (default: {strength:g})")
    if mode == "inpaint":
        p.add_argument("--mask", required=True, metavar="PATH",
                       help="same size as the image: white is repainted, black kept, grey partly "
                            "(a mask with transparency: its alpha channel)")
        p.add_argument("--mask-blur", type=_int_in(0, 64), default=0, help="feather the mask, in pixels (default: 0)")
    p.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=50, help="denoising steps (default: 50)")
    p.add_argument("--scale", type=_float_in(0), default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=None,
                   help="random seed; image i of a batch uses seed + i (default: random)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (.pt, .safetensors, .bin) to use by its file name in prompts "
                        "(repeatable)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="a folder of embeddings: those whose file name appears in the prompts are used")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA file (kohya/A1111, LyCORIS LoHa/LoKr, diffusers) applied at WEIGHT (default 1), as "
                        "if <lora:name:WEIGHT> ended the prompt (repeatable)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="a folder of LoRA files: <lora:name:weight> tags in the prompt use DIR/name.safetensors "
                        "(subfolders are searched too)")
    p.add_argument("--clip-skip", type=_int_in(1, 48), default=1,
                   help="read the text encoder's N-th last layer (AUTOMATIC1111's numbering; default: 1, the last)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampling method (default: ddim)")
    p.add_argument("--batch", type=_int_in(1, MAX_BATCH), default=1, help="number of images (default: 1)")
    p.add_argument("--weights", default=None,
                   help="a .safetensors/.ckpt file, a diffusers folder, a Hub repo id, or 'demo' (the small "
                        "shapes model in this package) (default: Stable Diffusion 1.5 from the Hugging Face Hub "
                        "when it is cached or reachable, else the demo model)")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="a VAE of its own to use (a .safetensors/.ckpt file or diffusers folder, e.g. "
                        "vae-ft-mse-840000 for SD 1.5 or the fp16-fix VAE for SDXL)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the model predicts, for single files that do not say (default: v_prediction for "
                        "SD 2.x files, epsilon otherwise; a diffusers folder's scheduler config)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--precision", choices=PRECISIONS, default=None,
                           help="compute precision (default: auto: float16 on a GPU, bfloat16 on a CPU with "
                                "bfloat16 arithmetic (AVX-512 BF16, AMX), float32 elsewhere)")
    precision.add_argument("--mp", action="store_true", help="mixed precision as the hardware suits: the same as auto")
    p.add_argument("--jit", action="store_true",
                   help="compile the UNet with XLA (slow first step; on CPU faster in float32, slower in bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, status messages or warnings: stderr stays empty unless there is an error")
    return p


def main(argv: list[str] | None = None, mode: str = "text2image") -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad argument or library error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        recipe = _recipe_flags(argv, mode)
    except StableDiffusionError as e:
        return _fail(str(e), mode)
    try:  # the recipe's flags first: flags given on the command line come later, and win
        args = build_parser(mode).parse_args(recipe + argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.mode = mode
    try:
        if args.seed is not None and args.seed + args.batch - 1 > MAX_SEED:  # image i uses seed + i
            return _fail(f"argument --seed: must be at most {MAX_SEED - args.batch + 1} with --batch {args.batch}",
                         mode)
        for flag in ("weights", "refiner", "vae"):
            problem = _weights_problem(getattr(args, flag, None))
            if flag == "vae" and args.vae is not None and not os.path.exists(os.path.expanduser(args.vae)):
                problem = f"{args.vae!r}: no such file or directory"
            if problem:
                return _fail(f"argument --{flag}: {problem}", mode)
        if mode == "img2img":  # read now, so a bad file is reported before the model loads
            args.image = load_image(args.image)
        elif mode == "inpaint":  # unblurred: inpaint blurs by --mask-blur and records it
            args.image, args.mask = load_image_and_mask(args.image, args.mask)
        args.embedding = _embedding_files(args)
        args.loras = _lora_files(args)
        paths = numbered_paths(args.output, args.batch)
        for path in paths:
            check_output_path(path, overwrite=args.overwrite)
        return _generate(args, paths)
    except StableDiffusionError as e:
        return _fail(str(e), mode)
    except KeyboardInterrupt:
        _print_error("interrupted", mode)
        return EXIT_INTERRUPTED


def img2img(argv: list[str] | None = None) -> int:
    """The `img2img` command: StableDiffusion.image_to_image."""
    return main(argv, "img2img")


def inpaint(argv: list[str] | None = None) -> int:
    """The `inpaint` command: StableDiffusion.inpaint."""
    return main(argv, "inpaint")


def _generate(args: argparse.Namespace, paths: list[str]) -> int:
    """Loads the model, runs the mode's generation and writes the files; argument checks are done."""
    say = (lambda message: None) if args.quiet else (lambda message: _say(message, args.mode))
    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if args.weights is None:
        say("finding Stable Diffusion 1.5 on the Hugging Face Hub")
        try:
            source = resolve(None)  # before TensorFlow is imported: offline, the answer comes at once
        except DownloadError as e:
            source = demo_path()
            say(f"Stable Diffusion 1.5 is not in the cache and cannot be downloaded ({e.reason}): using the demo model ({source}: coloured shapes, 64x64, prompts such as "
                f"'a red circle on a blue background'); for SD 1.5 connect to the Hub once, or pass --weights "
                "path/to/v1-5-pruned-emaonly.safetensors")
    else:
        if args.weights != DEMO and not os.path.exists(os.path.expanduser(args.weights)):
            say(f"finding {args.weights} on the Hugging Face Hub")
        source = resolve(args.weights)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with library_output_only(os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"), \
            warnings_as_lines(args.mode, shown=not args.quiet):
        from .pipeline import StableDiffusion, resolve_precision

        precision = args.precision or "auto"  # --mp is auto too
        chosen = ", chosen for this machine" if precision == "auto" else ""
        say(f"loading weights from {source} ({WEIGHT_DTYPES[resolve_precision(precision, warn=False)]}{chosen})")
        loading = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(source, precision=precision, jit_compile=args.jit,
                                               prediction_type=args.prediction_type,
                                               vae=os.path.expanduser(args.vae) if args.vae else None)
        refiner = None
        if getattr(args, "refiner", None):
            refiner_source = resolve(os.path.expanduser(args.refiner))
            say(f"loading the refiner from {refiner_source}")
            refiner = StableDiffusion.from_pretrained(refiner_source, precision=pipe.precision, jit_compile=args.jit,
                                                      vae=os.path.expanduser(args.vae) if args.vae else None)
            for path in args.embedding:  # an SDXL embedding's clip_g vectors serve the refiner's bigG
                refiner.load_embedding(path)
        for path in args.embedding:
            pipe.load_embedding(path)
        for name, path in args.loras.items():
            pipe.load_lora(path, name)
        if args.mode == "text2image":
            height, width = args.H or pipe.default_size, args.W or pipe.default_size
        else:
            height, width = args.image.shape[:2]
        start = time.perf_counter()
        pipe.prepare(height, width, args.batch, args.scale)
        say(f"prepared the compiled step for {width}x{height} in {time.perf_counter() - start:.1f} s "
            f"(weights loaded in {start - loading:.1f} s)")
        with _progress_bar(args.mode, enabled=not args.quiet) as callback:
            common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                          guidance_scale=args.scale, sampler=args.sampler, seed=args.seed, batch_size=args.batch,
                          output_type="pil", callback=callback, clip_skip=args.clip_skip)
            if args.mode == "img2img":
                result = pipe.image_to_image(args.prompt, args.image, strength=args.strength, **common)
            elif args.mode == "inpaint":
                result = pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength,
                                      mask_blur=args.mask_blur, **common)
            else:
                result = pipe.text_to_image(args.prompt, height=height, width=width, refiner=refiner,
                                            refiner_switch=args.refiner_switch, **common)
    written = [save_png(image, path, parameters, overwrite=args.overwrite)
               for image, path, parameters in zip(result.images, paths, result.parameters, strict=True)]
    print("wrote " + ", ".join(f"{path} (seed {seed})" for path, seed in zip(written, result.seeds, strict=True)))
    return 0


def _recipe_flags(argv: list[str], mode: str) -> list[str]:
    """The flags a --from-png file's AUTOMATIC1111 recipe stands for (none without --from-png): prompt (with its
    <lora:...> tags), negative prompt, steps, sampler, CFG scale, seed, size (text2image), clip skip, denoising
    strength, mask blur, refiner switch (the refiner's file is given with --refiner)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-png", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.from_png is None:
        return []
    path = os.path.expanduser(known.from_png)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY) if image.format == "PNG" else None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"argument --from-png: cannot read {known.from_png!r}: {e}") from None
    if not isinstance(text, str):
        raise InputError(f"argument --from-png: {known.from_png!r} is not a PNG with a 'parameters' recipe")
    prompt, negative, settings = parse_infotext(text)
    flags = [f"--prompt={prompt}"] + ([f"--negative-prompt={negative}"] if negative else [])
    fields = {"Steps": "--steps", "CFG scale": "--scale", "Seed": "--seed", "Clip skip": "--clip-skip"}
    if mode != "text2image":
        fields["Denoising strength"] = "--strength"
    if mode == "inpaint":
        fields["Mask blur"] = "--mask-blur"
    flags += [f"{flag}={settings[key]}" for key, flag in fields.items() if key in settings]
    if "Sampler" in settings:
        sampler = sampler_from_label(settings["Sampler"], settings.get("Schedule type"))
        if sampler is None:
            raise InputError(f"argument --from-png: sampler {settings['Sampler']!r} of {known.from_png!r} is not "
                             f"one of ours ({', '.join(SAMPLERS)})")
        flags.append(f"--sampler={sampler}")
    if mode == "text2image" and "Size" in settings:
        width, _, height = settings["Size"].partition("x")
        flags += [f"--W={width}", f"--H={height}"]
    if mode == "text2image" and "Refiner" in settings:
        if "--refiner" not in argv:  # a model is named, not a file: the user says which file it is
            raise InputError(f"argument --from-png: {known.from_png!r} was refined by {settings['Refiner']!r}: pass "
                             "--refiner FILE to use that model (the switch point is read from the recipe)")
        flags += [f"--refiner-switch={settings['Refiner switch at']}"] if "Refiner switch at" in settings else []
    return flags


def _embedding_files(args: argparse.Namespace) -> list[str]:
    """--embedding files (each must exist), and those in --embeddings-dir (or below) whose name is in a prompt."""
    files = []
    for path in args.embedding:
        if not os.path.isfile(os.path.expanduser(path)):
            raise InputError(f"argument --embedding: {path!r}: no such file")
        files.append(os.path.expanduser(path))
    if args.embeddings_dir is not None:
        folder = os.path.expanduser(args.embeddings_dir)
        if not os.path.isdir(folder):
            raise InputError(f"argument --embeddings-dir: {args.embeddings_dir!r}: no such folder")
        text = f"{args.prompt}\n{args.negative_prompt or ''}"
        files += [path for name, path in embedding_files(folder).items() if name and name in text]
    return files


def _lora_files(args: argparse.Namespace) -> dict[str, str]:
    """The LoRA file of each name the prompt's tags use: --lora files (whose tags are added to the prompt, replacing
    any of the same name) and files of --lora-dir. A tag no file answers is an error, before any weights load."""
    named = {}
    for flag in args.lora:
        path, weight = os.path.expanduser(flag), "1"
        if not os.path.isfile(path) and ":" in flag:
            head, _, tail = flag.rpartition(":")
            try:
                float(tail)
            except ValueError:
                pass
            else:
                path, weight = os.path.expanduser(head), tail
        if not os.path.isfile(path):
            raise InputError(f"argument --lora: {flag!r}: no such file")
        name = lora_name(path)
        if not name or any(c in name for c in "<>:"):
            raise InputError(f"argument --lora: {flag!r}: a LoRA's file name cannot be written in a <lora:...> tag")
        named[name] = path
        mine = [m[0] for m in TAG.finditer(args.prompt) if m[1] in LORA_KINDS and m[2].split(":")[0] == name]
        for tag in mine:
            args.prompt = args.prompt.replace(tag, "")
        args.prompt = f"{args.prompt.rstrip()} <lora:{name}:{weight}>"
    with warnings.catch_warnings():  # an unknown tag kind is reported once, by the generation
        warnings.simplefilter("ignore")
        _, tags = lora_tags(args.prompt)
    folder = None
    if args.lora_dir is not None:
        folder = os.path.expanduser(args.lora_dir)
        if not os.path.isdir(folder):
            raise InputError(f"argument --lora-dir: {args.lora_dir!r}: no such folder")
    found, in_folder = dict(named), lora_files(folder)
    for tag in tags:
        if tag.name in found:
            continue
        path = in_folder.get(tag.name)
        if path is None:
            where = f"in --lora-dir {args.lora_dir!r}" if folder else "(give --lora FILE or --lora-dir DIR)"
            raise InputError(f"prompt tag <lora:{tag.name}>: no LoRA file named {tag.name!r} {where}")
        found[tag.name] = path
    return found


def _weights_problem(source: str | None) -> str | None:
    """Why `source` cannot be a checkpoint, checked without loading it; None when it may be one."""
    if source is None:
        return None
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return None
    if os.path.exists(path):
        try:
            with open(path, "rb"):
                return None
        except OSError as e:
            return f"cannot read {source!r}: {e.strerror or e}"
    if looks_like_repo_id(source) or source == DEMO:
        return None  # resolved (downloaded, or the shipped demo model) by the library
    return f"{source!r}: no such file or directory (expected a checkpoint file, a diffusers folder or owner/name)"


@contextlib.contextmanager
def _progress_bar(prog: str, enabled: bool):
    """A generation callback drawing a tqdm bar over the denoising steps on stderr (None when disabled).

    The bar closes after the last step, before the decode, which gets its own status line: the bar's
    s/step is the denoising alone.
    """
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = None

    def callback(step, total_steps, latents):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total_steps, desc=f"{prog}: denoising", unit="step", file=sys.stderr)
        bar.update(1)
        if step + 1 == total_steps:
            bar.close()
            _say("decoding", prog)

    try:
        yield callback
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def library_output_only(enabled: bool):
    """Sends file descriptor 2 (where TensorFlow's C++ logs go, whatever TF_CPP_MIN_LOG_LEVEL says before absl
    is set up, and CUDA's cuInit complaints) to /dev/null, while `sys.stderr` keeps writing to the terminal.
    TensorFlow's and absl's Python loggers are set to errors only."""
    if not enabled:
        yield
        return
    import logging

    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hide
        yield
        return
    stream = sys.stderr
    try:
        if _fileno(stream) == 2:  # the usual case: our own messages go on through a copy of the terminal's fd
            sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), line_buffering=True,
                                          encoding=stream.encoding, errors="backslashreplace")
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if sys.stderr is not stream:
            sys.stderr.close()
            sys.stderr = stream


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def warnings_as_lines(prog: str, shown: bool = True):
    """The library's warnings (StableDiffusionWarning) as one `prog: warning: ...` line each (none if not
    `shown`); the warnings of the libraries under it (TensorFlow, Keras, NumPy) are not shown."""
    def show(message, category, filename, lineno, file=None, line=None):
        if shown and issubclass(category, StableDiffusionWarning):
            print(f"{prog}: warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", StableDiffusionWarning)
        warnings.showwarning = show
        yield


def _say(message: str, prog: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def _print_error(message: str, prog: str) -> None:
    print(f"{prog}: error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def _fail(message: str, prog: str) -> int:
    _print_error(message, prog)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
