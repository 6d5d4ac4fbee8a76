"""text2image: PNG output (atomic, recipe chunk, no clobbering) and the command line (flag errors, end to end)."""

import errno
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stable_diffusion_tf import cli
from stable_diffusion_tf.errors import InputError, OutputError
from stable_diffusion_tf.output import check_output_path, numbered_paths, save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "a red cube\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 96x64"


def _image(width=16, height=8):
    return Image.new("RGB", (width, height), (200, 30, 10))


def _write_old(path):
    with open(path, "wb") as f:
        f.write(b"old contents")


def _read(path):
    with open(path, "rb") as f:
        return f.read()


# --- output.py ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [RECIPE, "café crème, 50°", "a 🐱 astronaut, 日本語\nSteps: 20, Seed: 1"])
def test_save_png_round_trips_parameters(tmp_path, text):
    path = str(tmp_path / "x.png")
    assert save_png(_image(), path, text) == path
    assert os.listdir(tmp_path) == ["x.png"]  # no temporary file left
    with Image.open(path) as im:
        assert im.size == (16, 8) and im.text["parameters"] == text


def test_save_png_without_parameters(tmp_path):
    save_png(_image(), tmp_path / "x.png", None)
    with Image.open(tmp_path / "x.png") as im:
        assert "parameters" not in im.text


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_save_png_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        save_png(_image(), tmp_path / "x.png", None)
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "x.png").st_mode & 0o777 == 0o644


def test_save_png_refuses_to_overwrite_unless_asked(tmp_path):
    path = str(tmp_path / "x.png")
    _write_old(path)
    with pytest.raises(OutputError, match="already exists"):
        save_png(_image(), path, RECIPE)
    assert _read(path) == b"old contents" and os.listdir(tmp_path) == ["x.png"]
    save_png(_image(), path, RECIPE, overwrite=True)
    assert os.listdir(tmp_path) == ["x.png"]
    with Image.open(path) as im:
        assert im.text["parameters"] == RECIPE


def test_save_png_into_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        save_png(_image(), tmp_path / "missing" / "x.png", RECIPE)
    assert os.listdir(tmp_path) == []


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_write_then_disk_full(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("overwrite, target, failure", [
    (False, "os.fsync", _disk_full), (True, "os.fsync", _disk_full),
    (False, "PIL.Image.Image.save", _partial_write_then_disk_full),
    (True, "PIL.Image.Image.save", _partial_write_then_disk_full),
    (False, "os.link", _disk_full), (True, "os.replace", _disk_full),
    (False, "os.fsync", _interrupt), (True, "os.fsync", _interrupt),
])
def test_save_png_failure_leaves_nothing_behind(tmp_path, monkeypatch, overwrite, target, failure):
    path = str(tmp_path / "x.png")
    if overwrite:
        _write_old(path)
    monkeypatch.setattr(target, failure)
    with pytest.raises(KeyboardInterrupt if failure is _interrupt else OutputError):
        save_png(_image(), path, RECIPE, overwrite=overwrite)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["x.png"] if overwrite else [])  # no temporary file, no new file
    if overwrite:
        assert _read(path) == b"old contents"


def test_disk_full_message_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr("os.fsync", _disk_full)
    with pytest.raises(OutputError) as info:
        save_png(_image(), tmp_path / "x.png", RECIPE)
    assert str(info.value) == f"cannot write {str(tmp_path / 'x.png')!r}: No space left on device"


def test_numbered_paths_stay_in_the_folder():
    assert numbered_paths("out.png", 1) == ["out.png"]
    assert numbered_paths("out.png", 3) == ["out-0.png", "out-1.png", "out-2.png"]
    assert numbered_paths(os.path.join("v1.5", "a.b.PNG"), 2) == [os.path.join("v1.5", "a.b-0.PNG"),
                                                                    os.path.join("v1.5", "a.b-1.PNG")]
    with pytest.raises(ValueError):
        numbered_paths("out.png", 0)


def test_check_output_path(tmp_path, monkeypatch):
    check_output_path(tmp_path / "new.png")
    check_output_path(tmp_path / "NEW.PNG")
    _write_old(tmp_path / "old.png")
    check_output_path(tmp_path / "old.png", overwrite=True)
    for bad, message in [(tmp_path / "old.png", "already exists"), (tmp_path / "x.jpg", "must end in .png"),
                         (tmp_path / "x", "must end in .png"), (tmp_path, "is a directory"),
                         (tmp_path / "missing" / "x.png", "does not exist")]:
        with pytest.raises(OutputError, match=message):
            check_output_path(bad)
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # root ignores chmod, so pretend
    with pytest.raises(OutputError, match="not writable"):
        check_output_path(tmp_path / "new.png")


# --- cli.py, in process: every flag is checked before anything heavy runs ---------------------------------------


def _never_generate(args, paths):
    raise AssertionError("weights were loaded before every flag was checked")


BAD_FLAGS = [
    ["--H", "500"], ["--W", "4"], ["--H", "4096"], ["--W", "abc"], ["--steps", "0"], ["--steps", "1001"],
    ["--scale", "nan"], ["--scale", "-1"], ["--scale", "inf"], ["--scale", "x"], ["--sampler", "foo"],
    ["--batch", "0"], ["--batch", "65"], ["--seed", "-1"], ["--seed", str(2**32)], ["--seed", "1.5"],
    ["--seed", str(2**32 - 1), "--batch", "2"], ["--precision", "float32", "--mp"], ["--precision", "float64"],
    ["--weights", "{tmp}/missing.safetensors"], ["--weights", "missing.ckpt"], ["--weights", "./not/a-repo"],
    ["--output", "{tmp}/missing/x.png"], ["--output", "{tmp}/x.jpg"], ["--output", "{tmp}"],
    ["--output", "{tmp}/old.png"], ["--output", "{tmp}/old.png", "--batch", "2"],
    ["--output", "{tmp}/x.png", "--batch", "3"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=" ".join)
def test_bad_flag_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setattr(cli, "_generate", _never_generate)
    _write_old(tmp_path / "old.png")
    _write_old(tmp_path / "old-1.png")
    _write_old(tmp_path / "x-2.png")
    before = sorted(os.listdir(tmp_path))
    argv = ["--prompt", "a red cube", "--output", str(tmp_path / "new.png")]
    assert cli.main(argv + [f.format(tmp=tmp_path) for f in flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("text2image: error: "), err
    assert sorted(os.listdir(tmp_path)) == before and _read(tmp_path / "old.png") == b"old contents"


def test_missing_prompt(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_generate", _never_generate)
    assert cli.main([]) == 2
    assert capsys.readouterr().err == "text2image: error: the following arguments are required: --prompt\n"


def test_unwritable_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_generate", _never_generate)
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # root ignores chmod, so pretend
    assert cli.main(["--prompt", "x", "--output", str(tmp_path / "x.png")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_good_flags_reach_generation(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_generate", lambda args, paths: seen.update(args=args, paths=paths) or 0)
    _write_old(tmp_path / "x-1.png")
    argv = ["--prompt", "p", "--output", str(tmp_path / "x.png"), "--batch", "2", "--overwrite", "--scale", "0",
            "--H", "64", "--W", "2048", "--seed", str(2**32 - 2), "--sampler", "dpm++2m_karras", "--mp"]
    assert cli.main(argv) == 0
    assert seen["paths"] == [str(tmp_path / "x-0.png"), str(tmp_path / "x-1.png")]
    args = seen["args"]
    assert (args.H, args.W, args.scale, args.seed, args.mp, args.precision) == (64, 2048, 0.0, 2**32 - 2, True, None)


def test_library_errors_and_interrupts(tmp_path, monkeypatch, capsys):
    def library_error(args, paths):
        raise InputError("prompt is\ntoo long")

    def interrupt(args, paths):
        raise KeyboardInterrupt

    argv = ["--prompt", "p", "--output", str(tmp_path / "x.png")]
    monkeypatch.setattr(cli, "_generate", library_error)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "text2image: error: prompt is too long\n"
    monkeypatch.setattr(cli, "_generate", interrupt)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == "text2image: error: interrupted\n"


# --- text2image.py as a subprocess --------------------------------------------------------------------------------


def _run(*flags, **env):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "text2image.py", *map(str, flags)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _assert_one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("text2image: error: "), proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0 and "--sampler" in proc.stdout and proc.stderr == ""


def test_flag_errors_do_not_import_tensorflow(tmp_path):
    code = ("import sys; from stable_diffusion_tf.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'; raise SystemExit(rc)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code, "--prompt", "x", "--H", "500"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    _assert_one_error_line(proc, "--H", "500")


def test_unreadable_weights(tmp_path):
    weights = tmp_path / "garbage.safetensors"
    weights.write_bytes(os.urandom(1000))
    proc = _run("--prompt", "x", "--weights", weights, "--output", tmp_path / "x.png", "--quiet")
    _assert_one_error_line(proc, str(weights))
    assert not (tmp_path / "x.png").exists()


def test_library_warnings_are_one_line_and_quiet_hides_them(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(checkpoints["safetensors"])
    tensors["extra.weight"] = np.zeros(3, np.float32)  # outside the model: ignored, with a warning
    save_file(tensors, tmp_path / "extra.safetensors")
    flags = ["--weights", tmp_path / "extra.safetensors", "--prompt", "cube", "--H", 64, "--W", 64, "--steps", 1]
    proc = _run(*flags, "--output", tmp_path / "x.png", TF_CPP_MIN_LOG_LEVEL="")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if ": warning: " in line]
    assert len(warned) == 1 and warned[0].startswith("text2image: warning: ") and "ignored 1 tensors" in warned[0], \
        warned
    assert "E0000" not in proc.stderr and "cuInit" not in proc.stderr and "absl" not in proc.stderr, proc.stderr
    proc = _run(*flags, "--output", tmp_path / "y.png", "--quiet", TF_CPP_MIN_LOG_LEVEL="")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _parameters(path):
    with Image.open(path) as im:
        return im.size, im.text["parameters"]


def test_end_to_end(checkpoints, tmp_path):
    flags = ["--weights", checkpoints["safetensors"], "--prompt", "a red cube", "--H", 64, "--W", 96,
             "--steps", 3, "--seed", 42]
    proc = _run(*flags, "--output", tmp_path / "x.png", "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"wrote {tmp_path / 'x.png'} (seed 42)\n"
    size, text = _parameters(tmp_path / "x.png")
    assert size == (96, 64) and "a red cube" in text and "Seed: 42" in text

    proc = _run(*flags, "--output", tmp_path / "x.png", "--batch", 2)  # x.png exists; numbered files do not
    assert proc.returncode == 0, proc.stderr
    # one line per stage, each ours (text mode reads the bar's carriage returns as line ends: one per redraw)
    lines = [line for line in proc.stderr.splitlines() if line]
    assert all(line.startswith("text2image: ") for line in lines), proc.stderr
    stages = [line.split(":")[1].split()[0] for line in lines]
    assert [s for i, s in enumerate(stages) if s != stages[i - 1] or i == 0] == \
        ["loading", "prepared", "denoising", "decoding"], lines
    lines = [line for i, line in enumerate(lines) if i + 1 == len(lines) or stages[i + 1] != stages[i]]
    assert re.search(r"prepared the compiled step for 96x64 in \d+\.\d s \(weights loaded in \d+\.\d s\)$",
                     lines[1]), lines[1]
    assert "3/3" in lines[2] and ("step/s" in lines[2] or "s/step" in lines[2]), lines[2]
    assert sorted(os.listdir(tmp_path)) == ["x-0.png", "x-1.png", "x.png"]
    for name, seed in [("x-0.png", 42), ("x-1.png", 43)]:
        size, text = _parameters(tmp_path / name)
        assert size == (96, 64) and "a red cube" in text and f"Seed: {seed}" in text


# --- --from-png and A1111 recipes ---------------------------------------------------------------------------------


def test_parse_infotext_as_a1111_reads_it():
    from stable_diffusion_tf.recipe import parse_infotext, sampler_from_label

    text = ("a (cat:1.2), BREAK dog\nsecond line\nNegative prompt: blurry, bad\nmore\nSteps: 20, Sampler: DPM++ 2M, "
            'Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, Lora hashes: "a: 1, b: 2", Version: v1.9.0')
    prompt, negative, settings = parse_infotext(text)
    assert prompt == "a (cat:1.2), BREAK dog\nsecond line" and negative == "blurry, bad\nmore"
    assert settings["Lora hashes"] == "a: 1, b: 2" and settings["Size"] == "512x768" and settings["Steps"] == "20"
    assert sampler_from_label(settings["Sampler"], settings["Schedule type"]) == "dpm++2m_karras"
    assert sampler_from_label("Euler a") == "euler_a" and sampler_from_label("DDIM") == "ddim"
    assert sampler_from_label("Restart") is None
    assert parse_infotext("just a prompt, Steps: 3") == ("just a prompt, Steps: 3", "", {})  # < 3 fields: prompt


def test_from_png_reproduces_an_image_exactly(checkpoints, tmp_path):
    flags = ["--weights", checkpoints["safetensors"], "--quiet"]
    proc = _run(*flags, "--prompt", "a (red:1.3) cube BREAK [sky]", "--negative-prompt", "blurry", "--steps", 2,
                "--sampler", "euler_a", "--scale", 5.5, "--seed", 7, "--H", 64, "--W", 96, "--clip-skip", 2,
                "--output", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    proc = _run(*flags, "--from-png", tmp_path / "x.png", "--output", tmp_path / "y.png")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "x.png") as x, Image.open(tmp_path / "y.png") as y:
        assert x.text["parameters"] == y.text["parameters"] and "Clip skip: 2" in x.text["parameters"]
        assert x.size == y.size == (96, 64)
        assert np.array_equal(np.asarray(x), np.asarray(y))
    proc = _run(*flags, "--from-png", tmp_path / "x.png", "--seed", 8, "--output", tmp_path / "z.png")  # flags win
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "z.png") as z:
        assert "Seed: 8" in z.text["parameters"] and "Sampler: Euler a" in z.text["parameters"]


def test_from_png_refuses_files_without_a_usable_recipe(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Restart, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "restart.png", pnginfo=info)
    for name, fragment in (("plain.png", "recipe"), ("restart.png", "Restart"), ("missing.png", "cannot read")):
        proc = _run("--from-png", tmp_path / name, "--output", tmp_path / "out.png")
        _assert_one_error_line(proc, "--from-png", fragment)
    assert not (tmp_path / "out.png").exists()
