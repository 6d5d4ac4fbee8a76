"""`sd-server` / `python server.py`: the AUTOMATIC1111 HTTP API (`/sdapi/v1/...`) and a web page at `/`, on FastAPI
and uvicorn, over one loaded model (`serving.Engine`).

Requests are read as A1111 reads them (unknown fields ignored) and answered in A1111's shapes, so A1111 clients
(the `webuiapi` package, editor plug-ins, bots) work unchanged. Every error is JSON, `{"error": kind, "detail":
message}`, with a 4xx status for bad requests: 400 bad input, 401 credentials, 404 unknown sampler or model, 413
body too large, 429 queue full. No file path from a request is ever opened: models, LoRAs and embeddings are
chosen by name among the files of the folders given on the command line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.resources
import json
import os
import warnings

from fastapi import Request

from .errors import DownloadError, InputError, StableDiffusionError
from .precision import CHOICES as PRECISIONS

MAX_BODY = 64 * 1024 * 1024  # bytes of one request body: a base64 PNG of MAX_SIZE x MAX_SIZE fits well within
API = "/sdapi/v1"
STEP_DELAY = "SD_SERVER_TEST_STEP_DELAY"  # test hook: seconds added to every denoising step, to watch progress


def _json_error(status: int, kind: str, detail: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": " ".join(str(detail).split())}, status_code=status,
                        headers=headers)


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` -> [(user, pass), ...]; InputError on a malformed entry."""
    if not text:
        return []
    users = []
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise InputError("--api-auth must be user:password[,user2:password2]")
        users.append((user, password))
    return users


def _authorised(header: str | None, users: list[tuple[str, str]]) -> bool:
    """HTTP Basic credentials checked against every user in constant time (no early exit on a name match)."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    ok = False
    for name, secret in users:
        ok |= hmac.compare_digest(name.encode(), user.encode()) & hmac.compare_digest(secret.encode(),
                                                                                      password.encode())
    return ok


def create_app(engine, users: list[tuple[str, str]] | None = None):
    """The FastAPI application over a started `serving.Engine`."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    from . import serving
    from .recipe import SAMPLER_LABELS, parse_infotext

    app = FastAPI(title="stable-diffusion-tf", version="1", docs_url="/docs", redoc_url=None)
    users = users or []

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if users and not _authorised(request.headers.get("authorization"), users):
            return _json_error(401, "Unauthorized", "wrong or missing credentials",
                               {"WWW-Authenticate": 'Basic realm="stable-diffusion-tf"'})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _json_error(413, "PayloadTooLarge", f"the request body is over {MAX_BODY} bytes")
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - the last guard: a JSON answer, never a stack trace
            return _json_error(500, type(e).__name__, "the server failed on this request")

    @app.exception_handler(StableDiffusionError)
    async def library_error(request: Request, e: StableDiffusionError):
        status = 429 if isinstance(e, serving.QueueFull) else 404 if isinstance(e, serving.NotFound) else 400
        return _json_error(status, type(e).__name__, str(e))

    async def body_of(request: Request):
        """The JSON body, read up to MAX_BODY bytes (also without a Content-Length)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise _TooLarge
            chunks.append(chunk)
        try:  # NaN and Infinity are not JSON, whatever Python's parser allows
            return json.loads(b"".join(chunks) or b"{}", parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InputError("the request body is not valid JSON") from None

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, e: Exception):
        return _json_error(413, "PayloadTooLarge", f"the request body is over {MAX_BODY} bytes")

    reading = asyncio.Semaphore(engine.queue_size + 2)  # bodies read and decoded at once: memory stays bounded

    async def run_job(request: Request, mode: str):
        if engine.waiting >= engine.queue_size:  # answered before the body is read
            raise serving.QueueFull(f"the queue is full ({engine.queue_size} jobs waiting); try again later")
        async with reading:
            body = await body_of(request)
            generation = await run_in_threadpool(serving.read_generation, body, mode, engine.clip_skip)
        return JSONResponse(await asyncio.wrap_future(engine.queue(generation)))

    @app.post(f"{API}/txt2img")
    async def txt2img(request: Request):
        return await run_job(request, "txt2img")

    @app.post(f"{API}/img2img")
    async def img2img(request: Request):
        return await run_job(request, "img2img")

    @app.get(f"{API}/progress")
    async def progress(skip_current_image: bool = False):
        return await run_in_threadpool(engine.progress_answer, not skip_current_image)

    @app.post(f"{API}/interrupt")
    async def interrupt():
        engine.interrupt()
        return {}

    @app.post(f"{API}/skip")
    async def skip():
        engine.skip()
        return {}

    @app.get(f"{API}/options")
    async def get_options():
        return {"sd_model_checkpoint": engine.model_title, "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": engine.clip_skip, "samples_format": "png",
                "sd_vae": "Automatic", "queue_size": engine.queue_size,
                "default_size": engine.pipe.default_size}  # not A1111's: the page's starting width and height

    @app.post(f"{API}/options")
    async def set_options(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InputError("the options must be a JSON object")
        if "CLIP_stop_at_last_layers" in body:
            engine.clip_skip = serving._int(body, "CLIP_stop_at_last_layers", 1, 1, 48)
        if "sd_model_checkpoint" in body:
            switching = engine.switch_model(body["sd_model_checkpoint"])
            if switching is not None:
                await asyncio.wrap_future(switching)
        return None

    @app.get(f"{API}/sd-models")
    async def sd_models():
        return [{"title": title, "model_name": os.path.splitext(os.path.basename(title))[0], "hash": None,
                 "sha256": None, "filename": title, "config": None} for title in engine.models()]

    @app.post(f"{API}/refresh-checkpoints")
    async def refresh_checkpoints():
        return {}

    @app.get(f"{API}/samplers")
    async def samplers():
        return [{"name": label, "aliases": [name, *serving.SAMPLER_ALIASES.get(name, [])], "options": {}}
                for name, label in SAMPLER_LABELS.items()]

    @app.get(f"{API}/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @app.get(f"{API}/loras")
    async def loras():
        folder = engine.lora_dir or ""
        return [{"name": name, "alias": name, "path": os.path.relpath(path, folder), "metadata": {}}
                for name, path in engine.loras().items()]

    @app.post(f"{API}/refresh-loras")
    async def refresh_loras():
        return {}

    @app.get(f"{API}/embeddings")
    async def embeddings():
        loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                         "shape": int(vectors.shape[1]), "vectors": int(vectors.shape[0])}
                  for name, vectors in list(engine.pipe.embeddings.items())}  # a copy: the worker may add
        waiting = {name: {} for name in engine.embeddings() if name not in loaded}
        return {"loaded": loaded, "skipped": waiting}

    @app.post(f"{API}/refresh-embeddings")
    async def refresh_embeddings():
        return {}

    @app.post(f"{API}/png-info")
    async def png_info(request: Request):
        body = await body_of(request)
        image = await run_in_threadpool(serving.decode_base64_image, (body or {}).get("image") if
                                        isinstance(body, dict) else None, "image")
        info = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        if not isinstance(info, str):
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, settings = parse_infotext(info)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **settings}
        if "Size" in settings and "x" in settings["Size"]:
            parameters["Size-1"], _, parameters["Size-2"] = settings["Size"].partition("x")
        return {"info": info, "items": items, "parameters": parameters}

    @app.get(f"{API}/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get(f"{API}/cmd-flags")
    async def cmd_flags():
        return {"api": True, "port": None, "listen": False}

    for empty in ("sd-vae", "upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers",
                  "realesrgan-models", "prompt-styles", "extensions"):
        app.add_api_route(f"{API}/{empty}", _empty_list, methods=["GET"])

    @app.get(f"{API}/memory")
    async def memory():
        import resource

        return {"ram": {"used": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, "cuda": {}}

    page = importlib.resources.files("stable_diffusion_tf").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/internal/ping")
    async def ping():
        return {}

    return app


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _TooLarge(Exception):
    """A request body over MAX_BODY."""


async def _empty_list():
    return []


# -- the command line ----------------------------------------------------------------------------------------------


def build_parser():
    from .cli import _Parser

    p = _Parser(prog="sd-server", description="Serve Stable Diffusion (TensorFlow): the AUTOMATIC1111 API at "
                "/sdapi/v1 and a web page at /.")
    p.add_argument("--weights", default=None,
                   help="the model to load first: a .safetensors/.ckpt file, a diffusers folder, a Hub repo id or "
                        "'demo' (default: SD 1.5 from the Hub when cached or reachable, else the demo model)")
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="checkpoints offered for switching (/sdapi/v1/sd-models, option sd_model_checkpoint)")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="LoRA files used by <lora:name:weight> tags")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings used by name in prompts")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--listen", action="store_true", help="accept connections from other machines (0.0.0.0)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="require HTTP Basic credentials on every request")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision (default: auto, as text2image)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait; more are answered 429 at once (default: 16)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .cli import _fail, _say, library_output_only, warnings_as_lines
    from .hub import demo_path, resolve

    prog = "sd-server"
    args = build_parser().parse_args(argv)
    try:
        users = parse_auth(args.api_auth)
        if not 0 < args.port < 65536:
            raise InputError(f"--port must be between 1 and 65535, got {args.port}")
        if args.queue_size < 1:
            raise InputError(f"--queue-size must be at least 1, got {args.queue_size}")
        for flag in ("models_dir", "lora_dir", "embeddings_dir"):
            folder = getattr(args, flag)
            if folder is not None and not os.path.isdir(folder):
                raise InputError(f"--{flag.replace('_', '-')} {folder!r}: no such folder")
        weights = args.weights
        if weights is None:
            try:
                weights = resolve(None)
            except DownloadError as e:
                weights = demo_path()
                _say(f"Stable Diffusion 1.5 is not in the cache and cannot be downloaded ({e.reason}): serving the "
                     f"demo model", prog)
        if args.listen and not users:
            _say("warning: --listen without --api-auth: anyone who can reach this machine can use the server", prog)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with library_output_only(os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"), warnings_as_lines(prog):
            from .serving import Engine

            _say(f"loading {weights}", prog)
            engine = Engine(weights, args.models_dir, args.lora_dir, args.embeddings_dir, args.precision,
                            args.queue_size, float(os.environ.get(STEP_DELAY, "0") or 0))
            engine.start()
            import uvicorn

            host = "0.0.0.0" if args.listen else "127.0.0.1"
            _say(f"serving {engine.model_title} on http://{host}:{args.port}/ (API: http://{host}:{args.port}{API})",
                 prog)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uvicorn.run(create_app(engine, users), host=host, port=args.port, log_level="warning")
    except StableDiffusionError as e:
        return _fail(str(e), prog)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

