"""precision="auto" (the CLI's default) picks by the hardware; bfloat16 without hardware support warns."""

import warnings

import numpy as np
import pytest

from stable_diffusion_tf import StableDiffusion, StableDiffusionWarning, cli, pipeline, precision

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})  # an AMD EPYC without AVX-512
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # Cooper Lake, Zen 4
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids


@pytest.mark.parametrize("gpu, flags, expected", [
    (False, AVX2, "float32"), (False, AVX512_BF16, "mixed_bfloat16"), (False, AMX, "mixed_bfloat16"),
    (False, frozenset(), "float32"), (True, AVX2, "mixed_float16"), (True, AMX, "mixed_float16"),
])
def test_auto_picks_by_the_hardware(gpu, flags, expected):
    assert precision.auto(gpu, flags) == expected


def test_cpu_flags_are_read_from_cpuinfo():
    flags = precision.cpu_flags()
    with open("/proc/cpuinfo") as f:
        listed = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    assert flags == frozenset(listed) and "fpu" in flags


@pytest.fixture
def cpu(monkeypatch):
    """Pretend this machine is a CPU with the given flags and no GPU."""
    def pretend(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(pipeline.tf.config, "list_physical_devices", lambda kind=None: [])
    return pretend


@pytest.mark.parametrize("flags, expected", [(AVX2, "float32"), (AVX512_BF16, "mixed_bfloat16")])
def test_from_pretrained_auto_runs_what_the_cpu_suits_and_says_so(checkpoints, cpu, flags, expected):
    cpu(flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StableDiffusionWarning)
        pipe = StableDiffusion.from_pretrained(checkpoints["safetensors"], precision="auto")
    assert pipe.precision == expected
    assert pipe.unet.compute_dtype == ("float32" if expected == "float32" else "bfloat16")
    result = pipe.text_to_image("a cube", height=64, width=64, num_inference_steps=1, seed=0, output_type="np")
    assert np.isfinite(result.images).all()
    name = "float32" if expected == "float32" else "bfloat16"
    assert result.parameters[0].endswith(f", Precision: {name}")


def test_bfloat16_asked_for_without_hardware_support_works_with_one_warning(checkpoints, cpu):
    cpu(AVX2)
    with pytest.warns(StableDiffusionWarning, match="no bfloat16 arithmetic") as caught:
        pipe = StableDiffusion.from_pretrained(checkpoints["safetensors"], precision="bfloat16")
    assert len([w for w in caught if issubclass(w.category, StableDiffusionWarning)]) == 1
    assert pipe.precision == "mixed_bfloat16"
    cpu(AVX512_BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StableDiffusionWarning)
        StableDiffusion.from_pretrained(checkpoints["safetensors"], precision="bfloat16")


@pytest.mark.parametrize("flags, line", [
    (AVX2, "text2image: loading weights from {path} (float32, chosen for this machine)"),
    (AVX512_BF16, "text2image: loading weights from {path} (bfloat16, chosen for this machine)"),
])
def test_the_cli_defaults_to_auto_and_names_the_precision(checkpoints, cpu, capsys, tmp_path, flags, line):
    cpu(flags)
    path = checkpoints["safetensors"]
    assert cli.main(["--prompt", "x", "--weights", path, "--H", "64", "--W", "64", "--steps", "1",
                     "--output", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == line.format(path=path), err
    cpu(AVX2)
    assert cli.main(["--prompt", "x", "--weights", path, "--H", "64", "--W", "64", "--steps", "1",
                     "--precision", "bfloat16", "--output", str(tmp_path / "y.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("(bfloat16)") and sum("warning: this CPU has no bfloat16" in e for e in err) == 1, err
