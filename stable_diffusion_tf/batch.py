"""`sd-batch`: a file of jobs (JSON lines) -> one PNG per job and `results.jsonl`, in this process or on Ray Data.

Every line is checked before any model loads; a bad one becomes an `error` line of results.jsonl and the others
run. A job's seed is fixed by the reader (given, `--seed` + line - 1, or drawn once), so it gives the same pixels
in any process, on any worker, and on a retry. PNGs are written whole or not at all (`output.save_png`) by
whoever generated them; a job whose PNG exists is skipped, so a stopped run resumes where it stopped.

On Ray (`--ray [ADDRESS]`) the jobs go through `map_batches` to a pool of `Worker` actors, each holding one
pipeline; Ray restarts a worker that dies and retries the job it held (`max_restarts`, `max_task_retries`).
The driver alone appends to results.jsonl, one whole line per write, as the results stream back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Iterable, Iterator

# numpy and PIL only: TensorFlow is imported by whoever generates (this process or a Ray worker)
from .checks import MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_MULTIPLE, check_size
from .cli import EXIT_INTERRUPTED, EXIT_USAGE, _float_in, _int_in, _Parser, _fail, _print_error, _say, \
    _weights_problem, library_output_only, warnings_as_lines
from .errors import InputError, StableDiffusionError, StableDiffusionWarning
from .output import save_png
from .precision import CHOICES as PRECISIONS
from .recipe import sampler_from_label
from .samplers import SAMPLERS

PROG = "sd-batch"
RESULTS = "results.jsonl"
MODES = ("txt2img", "img2img", "inpaint")
FIELDS = ("id", "mode", "prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale", "width",
          "height", "image", "mask", "strength", "mask_blur")
ONLY_FOR = {"width": ("txt2img",), "height": ("txt2img",), "image": ("img2img", "inpaint"),
            "mask": ("inpaint",), "strength": ("img2img", "inpaint"), "mask_blur": ("inpaint",)}
STRENGTH = {"img2img": 0.75, "inpaint": 1.0}  # as the img2img and inpaint commands
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a file name anywhere: no separator, no leading dot (so no "..")
MAX_LINE = 1 << 20  # bytes: a longer line is refused unread
MAX_BLOCKS = 10_000  # Ray Data blocks: one job each up to this many (a retry redoes one block; done PNGs are skipped)
TEST_DIE_AFTER, DIED = "SD_BATCH_TEST_DIE_AFTER", ".sd-batch-test-died"  # test hook, see Worker
EXIT_FAILED_JOBS = 1


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The values of the fields a job leaves out (the command's flags); None size: the model's."""

    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # a job without one gets seed + line - 1; None: a random one each


@dataclasses.dataclass(frozen=True)
class Job:
    """One checked line: everything a worker needs, as plain JSON values (image paths are absolute)."""

    line: int
    id: str
    mode: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    guidance_scale: float
    width: int | None
    height: int | None
    image: str | None
    mask: str | None
    strength: float | None
    mask_blur: int
    given: dict  # the line's object as written, echoed in results.jsonl

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))


def result(job: Job | None, status: str, line: int | None = None, given=None, seconds: float | None = None,
           error: str | None = None, warned: list[str] | None = None) -> dict:
    """A results.jsonl row: status "ok", "skipped" (its PNG existed) or "error"."""
    return {"line": job.line if job else line, "id": job.id if job else None, "status": status,
            "output": job.file if job else None, "seed": job.seed if job else None,
            "seconds": None if seconds is None else round(seconds, 3), "error": error, "warnings": warned or [],
            "job": job.given if job else given}


def parse_job(text: str, line: int, defaults: Defaults = Defaults(), folder: str = ".") -> Job:
    """One line -> a Job, every field checked (InputError names the field); paths are relative to `folder`."""
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"invalid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise InputError(f"expected a JSON object, got {type(fields).__name__}")
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    get = fields.get
    mode = get("mode", "txt2img")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for key, modes in ONLY_FOR.items():
        if key in fields and mode not in modes:
            raise InputError(f"{key} is for mode {' or '.join(modes)} only, not {mode}")
    for key in ("prompt", "negative_prompt"):
        if key in fields and not isinstance(fields[key], str):
            raise InputError(f"{key} must be a string, got {fields[key]!r}")
    if "prompt" not in fields:
        raise InputError("prompt is missing")
    name = get("id", line)
    name = str(name) if _is_int(name) else name
    if not isinstance(name, str) or not ID.fullmatch(name):
        raise InputError(f"id must be 1 to 100 letters, digits, '.', '_' or '-' (not first: '.', '_', '-'), "
                         f"usable as a file name, got {name!r}")
    seed = get("seed")
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1) if defaults.seed is None else (defaults.seed + line - 1) % (MAX_SEED + 1)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}")
    steps = get("steps", defaults.steps)
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer between 1 and {MAX_STEPS}, got {steps!r}")
    sampler = get("sampler", defaults.sampler)
    sampler = sampler if sampler in SAMPLERS else sampler_from_label(sampler) if isinstance(sampler, str) else None
    if sampler is None:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)} (or its AUTOMATIC1111 label), "
                         f"got {get('sampler')!r}")
    scale = _number(get("guidance_scale", defaults.guidance_scale), "guidance_scale", 0, math.inf)
    width, height = (get("width", defaults.width), get("height", defaults.height)) if mode == "txt2img" else (None,) * 2
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            check_size(key, value)
    image, mask = (_file(get(key), key, folder) if mode in ONLY_FOR[key] else None for key in ("image", "mask"))
    strength = _number(get("strength", STRENGTH[mode]), "strength", 0, 1) if mode != "txt2img" else None
    blur = get("mask_blur", 0)
    if not _is_int(blur) or not 0 <= blur <= 64:
        raise InputError(f"mask_blur must be an integer between 0 and 64, got {blur!r}")
    return Job(line, name, mode, fields["prompt"], get("negative_prompt", defaults.negative_prompt), int(seed),
               steps, sampler, scale, width, height, image, mask, strength, blur, fields)


def read_jobs(path: str | os.PathLike, defaults: Defaults = Defaults()) -> tuple[list[Job], list[dict]]:
    """The valid jobs of a JSON-lines file, and an error row for each bad line (blank lines are passed over).

    A second job with the same id (they would write one file) is a bad line. InputError if the file cannot be read.
    """
    path = os.path.expanduser(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(path))
    jobs, bad, lines_of = [], [], {}
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(_lines(f), 1):
                try:
                    if raw is None:
                        raise InputError(f"line longer than {MAX_LINE} bytes")
                    text = raw.decode("utf-8")
                    if not text.strip():
                        continue
                    job = parse_job(text, number, defaults, folder)
                    if job.id in lines_of:
                        raise InputError(f"id {job.id!r} is already the id of line {lines_of[job.id]}")
                except (InputError, UnicodeDecodeError) as e:
                    bad.append(result(None, "error", line=number, given=_given(raw), error=f"line {number}: {e}"))
                    continue
                lines_of[job.id] = number
                jobs.append(job)
    except OSError as e:
        raise InputError(f"cannot read the jobs file {os.fspath(path)!r}: {e.strerror or e}") from None
    return jobs, bad


def run_job(pipe, job: Job, output_dir: str) -> dict:
    """Generates one job with a StableDiffusion pipeline and writes its PNG; a failure is an "error" row, not raised."""
    path = os.path.join(output_dir, job.file)
    if os.path.exists(path):  # done before this run, or by a retried worker that died after writing
        return result(job, "skipped")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StableDiffusionWarning)
        try:
            common = dict(negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                          guidance_scale=job.guidance_scale, sampler=job.sampler, seed=job.seed)
            if job.mode == "img2img":
                out = pipe.image_to_image(job.prompt, job.image, strength=job.strength, **common)
            elif job.mode == "inpaint":
                out = pipe.inpaint(job.prompt, job.image, job.mask, strength=job.strength, mask_blur=job.mask_blur,
                                   **common)
            else:
                out = pipe.text_to_image(job.prompt, height=job.height, width=job.width, **common)
            save_png(out.images[0], path, out.parameters[0])
            error = None
        except Exception as e:  # one job's failure (bad image, NaN, out of memory) must not end the others
            error = " ".join(str(e).split()) or type(e).__name__
    warned = [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, StableDiffusionWarning)]
    return result(job, "error" if error else "ok", seconds=time.perf_counter() - start, error=error, warned=warned)


def run_in_process(jobs: Iterable[Job], weights: str | None, output_dir: str,
                   precision: str = "auto") -> Iterator[dict]:
    """Loads the pipeline here once and yields each job's row as it finishes."""
    from .pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(weights, precision=precision)
    for job in jobs:
        yield run_job(pipe, job, output_dir)


class Worker:
    """A Ray Data actor: loads the pipeline once, then per batch generates its jobs, writes their PNGs and returns
    their rows (`{"job": [json]} -> {"result": [json]}`).

    Test hook: with `die_after` N (the driver passes env SD_BATCH_TEST_DIE_AFTER), the first worker to have
    written N images kills its own process as it takes the next job, once per output folder (a marker file
    there says it happened), so tests can see that job retried.
    """

    def __init__(self, weights: str | None, output_dir: str, precision: str = "auto", die_after: int | None = None):
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):  # workers sharing a GPU (--gpus-per-worker < 1)
            tf.config.experimental.set_memory_growth(gpu, True)
        from .pipeline import StableDiffusion

        self.pipe = StableDiffusion.from_pretrained(weights, precision=precision)
        self.output_dir, self.die_after, self.written = output_dir, die_after, 0

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = []
        for text in batch["job"]:
            if self.die_after is not None and self.written >= self.die_after:
                self._die_once()
            row = run_job(self.pipe, Job.from_json(str(text)), self.output_dir)
            self.written += row["status"] == "ok"
            rows.append(json.dumps(row))
        return {"result": np.array(rows, dtype=object)}

    def _die_once(self) -> None:
        try:
            os.close(os.open(os.path.join(self.output_dir, DIED), os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return
        os._exit(1)


def run_on_ray(jobs: list[Job], weights: str | None, output_dir: str, precision: str = "auto", workers: int = 1,
               cpus_per_worker: float = 1, gpus_per_worker: float = 0, retries: int = 3) -> Iterator[dict]:
    """The jobs through Ray Data on the cluster `ray.init` connected to (Ray Data starts one if none): map_batches over
    `workers` Worker actors; yields each row as it streams back. A job whose worker dies is retried up to
    `retries` times (the worker restarts); StableDiffusionError if the run cannot go on."""
    import numpy as np
    import ray
    import ray.data

    if not jobs:
        return
    die_after = os.environ.get(TEST_DIE_AFTER)
    # from_items, not read_json: the lines are already checked here (read_json would fail on the first bad line and
    # unify types across lines), and a job travels as its JSON text, so every field keeps its exact value
    items = ray.data.from_items([{"job": job.to_json()} for job in jobs],
                                override_num_blocks=min(len(jobs), MAX_BLOCKS))
    done = items.map_batches(Worker, batch_size=1, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=workers),
                             fn_constructor_kwargs=dict(weights=weights, output_dir=output_dir, precision=precision,
                                                        die_after=None if die_after is None else int(die_after)),
                             num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                             max_restarts=-1, max_task_retries=retries)
    try:
        for batch in done.iter_batches(batch_size=1, batch_format="numpy"):
            for text in np.atleast_1d(batch["result"]):
                yield json.loads(str(text))
    except ray.exceptions.RayError as e:  # its last line: the worker's exception, or why Ray gave up
        last = ([line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
                or [type(e).__name__])[-1].strip()
        raise StableDiffusionError(f"the Ray run stopped: {last} (the PNGs written so far are kept; run again to "
                                   "do the rest)") from None


class ResultsLog:
    """results.jsonl opened for appending: a row is one whole line in one write (a stopped run leaves whole lines)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        size = os.fstat(self.fd).st_size
        if size and os.pread(self.fd, 1, size - 1) != b"\n":  # a line cut by a crash: end it, keep ours whole
            os.write(self.fd, b"\n")

    def write(self, row: dict) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate one PNG per line of a JSON-lines file of jobs with Stable Diffusion "
                                       "(TensorFlow), in this process or on a Ray cluster.",
                epilog=f"Each line: {{\"prompt\": ...}} and optionally {', '.join(FIELDS[:-1])} and {FIELDS[-1]}. "
                       f"PNGs are named ID.png (default id: the line number); {RESULTS} gets one line per job. "
                       "A job whose PNG exists is skipped, so a stopped run resumes.")
    p.add_argument("jobs", metavar="JOBS.jsonl", help="the jobs, one JSON object per line")
    p.add_argument("--output-dir", required=True, metavar="DIR", help=f"where the PNGs and {RESULTS} go (created)")
    p.add_argument("--weights", default=None,
                   help="a .safetensors/.ckpt file, a diffusers folder, a Hub repo id, or 'demo' (default: Stable "
                        "Diffusion 1.5 from the Hugging Face Hub)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision (default: auto)")
    p.add_argument("--negative-prompt", default="", help="for jobs without one")
    size = _int_in(MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE)
    p.add_argument("--H", type=size, default=None, help="txt2img height for jobs without one (default: the model's)")
    p.add_argument("--W", type=size, default=None, help="txt2img width for jobs without one (default: the model's)")
    p.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=50, help="for jobs without steps (default: 50)")
    p.add_argument("--scale", type=_float_in(0), default=7.5, help="for jobs without guidance_scale (default: 7.5)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="for jobs without one (default: ddim)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=None,
                   help="a job without a seed gets SEED + its line number - 1 (default: a random seed each, "
                        f"recorded in {RESULTS} and the PNG)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a cluster's address ('auto': the one `ray start` runs here; 'local': a "
                        "new one of this machine), or none: RAY_ADDRESS, else the one `ray start` runs here, else a "
                        "new one")
    p.add_argument("--workers", type=_int_in(1, 100_000), default=None,
                   help="Ray workers, each loads the model once (default: 1)")
    p.add_argument("--gpus-per-worker", type=_float_in(0), default=0, help="GPUs for each Ray worker (default: 0)")
    p.add_argument("--cpus-per-worker", type=_float_in(0), default=1, help="CPUs for each Ray worker (default: 1)")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr unless there is an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line: 0 every job done or skipped, 1 some failed (see results.jsonl), 2 a bad argument or a
    run that could not go on, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.ray is None and (args.workers is not None or args.gpus_per_worker or args.cpus_per_worker != 1):
        return _fail("arguments --workers, --gpus-per-worker and --cpus-per-worker need --ray", PROG)
    problem = _weights_problem(args.weights)
    if problem:
        return _fail(f"argument --weights: {problem}", PROG)
    say = (lambda message: None) if args.quiet else (lambda message: _say(message, PROG))
    try:
        defaults = Defaults(args.negative_prompt, args.steps, args.sampler, args.scale, args.W, args.H, args.seed)
        jobs, bad = read_jobs(args.jobs, defaults)
        output_dir = os.path.abspath(os.path.expanduser(args.output_dir))
        try:
            os.makedirs(output_dir, exist_ok=True)
            log = ResultsLog(os.path.join(output_dir, RESULTS))
        except OSError as e:
            return _fail(f"argument --output-dir: cannot write to {args.output_dir!r}: {e.strerror or e}", PROG)
        try:
            counts = _run(args, jobs, bad, output_dir, log, say)
        finally:
            log.close()
    except StableDiffusionError as e:
        return _fail(str(e), PROG)
    except KeyboardInterrupt:
        _print_error("interrupted", PROG)
        return EXIT_INTERRUPTED
    print(f"{PROG}: {counts['ok']} written, {counts['skipped']} skipped, {counts['error']} failed; "
          f"see {os.path.join(output_dir, RESULTS)}")
    return EXIT_FAILED_JOBS if counts["error"] else 0


def _run(args: argparse.Namespace, jobs: list[Job], bad: list[dict], output_dir: str, log: ResultsLog, say) -> dict:
    """Records the bad lines and the jobs already done, runs the rest; the count of rows by status."""
    counts = {"ok": 0, "skipped": 0, "error": 0}
    finished = [os.path.exists(os.path.join(output_dir, job.file)) for job in jobs]
    todo = [job for job, exists in zip(jobs, finished) if not exists]
    done = [result(job, "skipped") for job, exists in zip(jobs, finished) if exists]
    for row in bad + done:
        log.write(row)
        counts[row["status"]] += 1
    if not todo:
        return counts
    say(f"{len(todo)} jobs to run, {counts['skipped']} done before, {counts['error']} bad lines")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow starts here or in local Ray workers
    started = args.ray is not None and _connect(args.ray, args.quiet)
    if args.ray is not None:
        rows = run_on_ray(todo, args.weights, output_dir, args.precision, args.workers or 1, args.cpus_per_worker,
                          args.gpus_per_worker)
    else:
        rows = run_in_process(todo, args.weights, output_dir, args.precision)
    from tqdm import tqdm

    try:
        with library_output_only(os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"), \
                warnings_as_lines(PROG, shown=not args.quiet), \
                tqdm(total=len(todo), desc=PROG, unit="image", file=sys.stderr, disable=args.quiet) as bar:
            for row in rows:
                log.write(row)
                counts[row["status"]] += 1
                bar.update(1)
    finally:
        if started:
            import ray

            ray.shutdown()
    return counts


def _connect(address: str, quiet: bool) -> bool:
    """Joins the Ray cluster at `address` ("": Ray's default choice) unless joined already; whether it joined now."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise StableDiffusionError(f"--ray needs Ray Data ({e}): pip install 'ray[data]'") from None
    ray.data.DataContext.get_current().enable_progress_bars = False  # tqdm counts the images
    if ray.is_initialized():
        return False
    try:
        with library_output_only(os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0"):  # Ray's C++ retry lines too
            ray.init(address=address or None, logging_level="error" if quiet else "warning", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StableDiffusionError(f"argument --ray: cannot join a Ray cluster at {address or 'the default address'}: "
                                   + (" ".join(str(e).split()) or type(e).__name__)) from None
    return True


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        what = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise InputError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


def _file(value, name: str, folder: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} (a file path) is missing")
    path = os.path.join(folder, os.path.expanduser(value))
    if not os.path.isfile(path):
        raise InputError(f"{name} {value!r}: no such file")
    return path


def _lines(f) -> Iterator[bytes | None]:
    """The file's lines; None for one over MAX_LINE bytes (the rest of it is skipped unread)."""
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE:
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MAX_LINE + 1)
            yield None
        else:
            yield raw


def _given(raw: bytes | None):
    """A bad line's object when it is JSON, else its text (cut short), for results.jsonl."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace").strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text[:200]


if __name__ == "__main__":
    raise SystemExit(main())
