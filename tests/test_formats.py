"""Checkpoint readers: torch/safetensors round trips, hostile pickles, broken files, fuzzing and peak memory."""

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from stable_diffusion_tf.errors import CheckpointError
from stable_diffusion_tf.weights.formats import detect_format, open_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_dict() -> dict:
    """Every dtype SD checkpoints use, plus torch views: a transpose, a strided slice, two halves of one storage."""
    g = torch.Generator().manual_seed(0)
    base, shared = torch.randn(6, 8, generator=g), torch.randn(10, generator=g)
    return {
        "w32": torch.randn(4, 5, generator=g),
        "w16": torch.randn(3, 7, generator=g).half(),
        "wbf16": torch.randn(2, 9, generator=g).bfloat16(),
        "steps": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "transposed": base.t(),
        "sliced": base[2:5, ::2],
        "half_a": shared[:5],
        "half_b": shared[5:],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False, True]),
        "flag0": torch.tensor(True),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


def _expected(tensor: torch.Tensor) -> np.ndarray:
    """What get() should return for a torch tensor (bfloat16 widened to float32)."""
    tensor = tensor.detach()
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.contiguous().numpy()


def _check_same(path, state: dict) -> None:
    """open_checkpoint(path) holds exactly `state`: keys, shapes, dtypes and values."""
    with open_checkpoint(path) as f:
        assert sorted(f.keys()) == sorted(state)
        for key, tensor in state.items():
            assert key in f
            assert f.shape(key) == tuple(tensor.shape)
            assert f.dtype(key) == str(tensor.dtype).removeprefix("torch.")
            got, want = f.get(key), _expected(tensor)
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def _members(path) -> list:
    """(name, bytes) of every member of a zip, in order."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _write_zip(path, members, compression=zipfile.ZIP_STORED):
    """Write (name, bytes) members as a zip (duplicates allowed) and return the path."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression) as z:
        warnings.simplefilter("ignore")
        for name, data in members:
            z.writestr(name, data)
    return path


def _replace(members, suffix, data):
    """Members with the one ending in `suffix` given new bytes."""
    return [(n, data if n.endswith(suffix) else d) for n, d in members]


def _safetensors(path, header, data: bytes):
    """Write a safetensors file from a header (dict or raw JSON text) and a data section."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data)
    return path


class _Store:
    """A storage in a hand-crafted torch pickle."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _View:
    """A tensor view in a hand-crafted torch pickle."""

    def __init__(self, store, offset, size, stride):
        self.args = (store, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    """Writes _Store objects as torch storage references, as torch.save does."""

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, _Store) else None


def _crafted(path, obj, storages: dict):
    """A torch.save-layout zip whose data.pkl pickles `obj` with float32 storages `storages` (key -> bytes)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    members = [("archive/data.pkl", buf.getvalue()), ("archive/byteorder", b"little")]
    return _write_zip(path, members + [(f"archive/data/{k}", v) for k, v in storages.items()] +
                      [("archive/version", b"3\n")])


def _call(module: str, name: str, *args) -> bytes:
    """Protocol-2 pickle opcodes that call module.name(*args) when loaded."""
    body = pickle.dumps(args, protocol=2)[2:-1]
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A .ckpt, a Lightning .ckpt and a .safetensors of _state_dict(), plus the state dict."""
    root, state = tmp_path_factory.mktemp("saved"), _state_dict()
    torch.save(state, root / "plain.ckpt")
    lightning = {"state_dict": state, "global_step": 7, "epoch": 1, "pytorch-lightning_version": "1.4.2",
                 "hparams": {"lr": 1e-4, "name": "sd", "dtype": torch.float16}, "optimizer_states": [{"lr": 0.1}]}
    torch.save(lightning, root / "lightning.ckpt")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, root / "model.safetensors",
              metadata={"format": "pt"})
    return root, state


@pytest.mark.parametrize("name", ["plain.ckpt", "lightning.ckpt", "model.safetensors"])
def test_round_trip(saved, name):
    root, state = saved
    _check_same(root / name, state)


def test_format_from_bytes_not_name(saved, tmp_path):
    root, state = saved
    shutil.copy(root / "lightning.ckpt", tmp_path / "model.safetensors")
    shutil.copy(root / "model.safetensors", tmp_path / "model.ckpt")
    assert detect_format(tmp_path / "model.safetensors") == "torch_zip"
    assert detect_format(tmp_path / "model.ckpt") == "safetensors"
    _check_same(tmp_path / "model.safetensors", state)
    _check_same(tmp_path / "model.ckpt", state)


def test_non_tensor_entries_ignored_and_compressed_members(saved, tmp_path):
    root, state = saved
    torch.save({"a": state["w32"], "step": 3, "meta": {"x": 1.5}}, tmp_path / "mixed.pt")
    with open_checkpoint(tmp_path / "mixed.pt") as f:
        assert f.keys() == ["a"] and "step" not in f
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.save(module.state_dict(), tmp_path / "module.bin")  # an OrderedDict carrying _metadata
    _check_same(tmp_path / "module.bin", module.state_dict())
    _write_zip(tmp_path / "deflated.ckpt", _members(root / "plain.ckpt"), zipfile.ZIP_DEFLATED)
    _check_same(tmp_path / "deflated.ckpt", state)


def test_lightning_metadata_globals_are_inert(saved, tmp_path):
    root, state = saved
    torch.save({"state_dict": {"w": state["w32"]}, "callbacks": {ModelCheckpoint: {"best": np.float64(0.5)}}},
               tmp_path / "pl.ckpt")
    marker = f"c{ModelCheckpoint.__module__}\nModelCheckpoint\n".encode()
    members = _members(tmp_path / "pl.ckpt")
    pkl = next(d for n, d in members if n.endswith("data.pkl"))
    assert marker in pkl
    pkl = pkl.replace(marker, b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n")
    _write_zip(tmp_path / "sd14.ckpt", _replace(members, "data.pkl", pkl))
    _check_same(tmp_path / "sd14.ckpt", {"w": state["w32"]})


class ModelCheckpoint:
    """Stands in for pytorch_lightning's class, which SD 1.4's .ckpt uses as a dict key."""


def test_unused_strides_ignored(tmp_path):
    """Strides of size-1 dims never move the view, so even absurd ones read correctly (as torch does)."""
    data = np.arange(4, dtype="<f4").tobytes()
    path = _crafted(tmp_path / "odd.ckpt", {"w": _View(_STORE, 1, (1, 3), (10**30, 1))}, {"0": data})
    with open_checkpoint(path) as f:
        np.testing.assert_array_equal(f.get("w"), [[1, 2, 3]])


def test_get_errors(saved):
    root, _ = saved
    f = open_checkpoint(root / "plain.ckpt")
    with pytest.raises(CheckpointError, match="no tensor named"):
        f.get("nope")
    f.close()
    with pytest.raises(CheckpointError, match="closed"):
        f.get("w32")


# ---------------------------------------------------------------- hostile pickles


def _payloads(canary) -> dict:
    """Pickles that run `touch canary` (or reach numpy/torch internals) when loaded without restriction."""
    command = f"touch {canary}"
    code = f"__import__('os').system({command!r})"
    return {
        "posix.system": _call("posix", "system", command),
        "os.system": _call("os", "system", command),
        "builtins.eval": _call("__builtin__", "eval", code),
        "builtins.exec": pickle.dumps({"w": _Reduce(exec, (code,))}, protocol=4),
        "numpy runstring": _call("numpy.testing._private.utils", "runstring", f"import os; os.system({command!r})", {}),
        "numpy _reconstruct": pickle.dumps({"w": np.arange(3)}, protocol=2),
        "numpy.core _reconstruct": _call("numpy.core.multiarray", "_reconstruct", 0, (0,), b"b"),
        "torch _load_from_bytes": _call("torch.storage", "_load_from_bytes", b"\x80\x02."),
        "nested in state_dict": pickle.dumps({"state_dict": {"ok": 1, "w": _Reduce(os.system, (command,))}}, 2),
    }


class _Reduce:
    """Pickles as a call of func(*args)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["posix.system", "builtins.eval", "builtins.exec", "numpy runstring",
                                  "nested in state_dict"])
def test_payload_is_live(tmp_path, kind):
    """The payloads really run code under plain pickle, so refusing them below means something."""
    pickle.loads(_payloads(tmp_path / "live")[kind])
    assert (tmp_path / "live").exists()


@pytest.mark.parametrize("kind", list(_payloads("x")))
def test_hostile_pickle_refused(saved, tmp_path, kind):
    root, _ = saved
    canary = tmp_path / "canary"
    members = _replace(_members(root / "plain.ckpt"), "data.pkl", _payloads(canary)[kind])
    path = _write_zip(tmp_path / "evil.ckpt", members)
    with pytest.raises(CheckpointError, match="refuses to load global") as error:
        with open_checkpoint(path) as f:
            [f.get(k) for k in f.keys()]
    assert str(path) in str(error.value)
    assert not canary.exists()


# ---------------------------------------------------------------- broken files


def _ckpt(root) -> list:
    """Members of the saved plain.ckpt (its folder is named `plain`)."""
    return _members(root / "plain.ckpt")


_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_STORE = _Store("0", 4)
_VALID_ST = {"a": _ENTRY, "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}
# name -> (build(path, root of the `saved` fixture), fragment the message must contain)
BROKEN = {
    "truncated safetensors": (lambda p, r: _safetensors(p, _VALID_ST, bytes(9)), "truncated"),
    "header too large": (lambda p, r: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length"),
    "overlap": (lambda p, r: _safetensors(p, {"a": _ENTRY, "b": _ENTRY}, bytes(8)), "overlap"),
    "hole": (lambda p, r: _safetensors(p, {"a": _ENTRY, "b": {**_ENTRY, "data_offsets": [12, 20]}}, bytes(20)),
             "hole"),
    "duplicate key": (lambda p, r: _safetensors(p, '{"a": %s, "a": %s}' % (json.dumps(_ENTRY), json.dumps(_ENTRY)),
                                                bytes(8)), "duplicate key"),
    "wrong data size": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "shape": [3]}}, bytes(8)), "needs 12"),
    "trailing bytes": (lambda p, r: _safetensors(p, {"a": _ENTRY}, bytes(9)), "trailing bytes"),
    "bad dtype": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "dtype": "X9"}}, bytes(8)), "unsupported dtype"),
    "negative shape": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "shape": [-2]}}, bytes(8)), "sane sizes"),
    "absurd empty shape": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "shape": [0, 10**30]}}, b""), "sane sizes"),
    "too many dims": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "shape": [1] * 70 + [2]}}, bytes(8)), "at most"),
    "too many view dims": (lambda p, r: _crafted(p, {"w": _View(_STORE, 0, (1,) * 70, (1,) * 70)}, {"0": bytes(16)}),
                           "malformed"),
    "header not json": (lambda p, r: _safetensors(p, "{]", b""), "not valid JSON"),
    "dotdot member": (lambda p, r: _write_zip(p, _ckpt(r) + [("plain/../evil", b"x")]), "unsafe"),
    "absolute member": (lambda p, r: _write_zip(p, _ckpt(r) + [("/etc/evil", b"x")]), "unsafe"),
    "two data.pkl": (lambda p, r: _write_zip(p, _ckpt(r) + [("other/data.pkl", b"x")]), "data.pkl"),
    "hidden data.pkl": (lambda p, r: _write_zip(p, [(n.replace("/data.pkl", "/.x/data.pkl"), d) for n, d in _ckpt(r)]),
                        "data.pkl"),
    "bad dtype type": (lambda p, r: _safetensors(p, {"a": {**_ENTRY, "dtype": []}}, bytes(8)), "unsupported dtype"),
    "duplicate member": (lambda p, r: _write_zip(p, _ckpt(r) + _ckpt(r)[:1]), "duplicate"),
    "stray member": (lambda p, r: _write_zip(p, _ckpt(r) + [("plain/code/x.py", b"x")]), "does not belong"),
    "byteorder big": (lambda p, r: _write_zip(p, _replace(_ckpt(r), "byteorder", b"big")), "byteorder"),
    "short storage": (lambda p, r: _crafted(p, {"w": _View(_STORE, 0, (4,), (1,))}, {"0": bytes(12)}), "holds 12"),
    "missing storage": (lambda p, r: _crafted(p, {"w": _View(_STORE, 0, (4,), (1,))}, {}), "missing"),
    "view past storage": (lambda p, r: _crafted(p, {"w": _View(_STORE, 1, (2, 2), (2, 1))}, {"0": bytes(16)}),
                          "exceeds"),
    "expanded past storage": (lambda p, r: _crafted(p, {"w": _View(_STORE, 0, (10**12,), (0,))}, {"0": bytes(16)}),
                              "more elements"),
    "huge memo index": (lambda p, r: _write_zip(p, [("a/data.pkl", b"\x80\x02}r\x00\x00\x00\x7f.")]), "memo index"),
    "huge bytes length": (lambda p, r: _write_zip(p, [("a/data.pkl", b"\x80\x05\x96" + struct.pack("<Q", 1 << 40))]),
                          "not a valid checkpoint pickle"),
    "corrupt storage": (lambda p, r: _write_zip(p, _ckpt(r)) and _flip_member(p, "/data/0"), "CRC"),
    "corrupt deflated": (lambda p, r: _write_zip(p, _ckpt(r), zipfile.ZIP_DEFLATED) and _flip_member(p, "/data/0"),
                         "cannot read"),
    "legacy torch": (lambda p, r: torch.save({"a": torch.ones(2)}, p, _use_new_zipfile_serialization=False),
                     "legacy"),
    "truncated zip": (lambda p, r: p.write_bytes((r / "plain.ckpt").read_bytes()[:-100]), "zip"),
    "empty": (lambda p, r: p.write_bytes(b""), "empty"),
    "lfs pointer": (lambda p, r: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
                    "git lfs pull"),
    "html": (lambda p, r: p.write_text("\n<!DOCTYPE html><html><body>Sign in</body></html>"), "web page"),
    "random bytes": (lambda p, r: p.write_bytes(np.random.default_rng(0).bytes(4096).replace(b"{", b"x")),
                     "not a .safetensors or torch checkpoint"),
    "tiny": (lambda p, r: p.write_bytes(b"abc"), "only 3 bytes"),
    "missing": (lambda p, r: None, "no such file"),
    "directory": (lambda p, r: p.mkdir(), "directory"),
}


def _flip_member(path, suffix):
    """Flip one byte inside the compressed data of the member ending in `suffix`, keeping the zip readable."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_file(tmp_path, saved, kind):
    build, fragment = BROKEN[kind]
    path = tmp_path / "model.bin"
    build(path, saved[0])
    with pytest.raises(CheckpointError) as error:
        with open_checkpoint(path) as f:
            [f.get(k) for k in f.keys()]
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert fragment.lower() in message.lower(), message


# ---------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Bytes of a valid small .safetensors and .ckpt, plus a scratch directory."""
    root = tmp_path_factory.mktemp("fuzz")
    state = {"a": torch.randn(3, 2), "b": torch.randn(4).half(), "c": torch.randn(2, 2).bfloat16().t()}
    torch.save(state, root / "s.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "s.safetensors")
    return {"safetensors": (root / "s.safetensors").read_bytes(), "ckpt": (root / "s.ckpt").read_bytes(),
            "members": _members(root / "s.ckpt"), "dir": root}


def _read_everything(path) -> None:
    """Open and read every tensor; only numpy arrays or CheckpointError may come out."""
    try:
        with open_checkpoint(path) as f:
            for key in f.keys():
                assert isinstance(f.get(key), np.ndarray)
                assert isinstance(f.shape(key), tuple) and isinstance(f.dtype(key), str)
    except CheckpointError:
        pass


def _mutations():
    """Up to six byte overwrites, and maybe a truncation."""
    return st.tuples(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
                     st.one_of(st.none(), st.integers(0, 10**6)))


def _mutate(data: bytes, mutation) -> bytes:
    """Apply one of _mutations() to data."""
    edits, cut = mutation
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[: cut % (len(out) + 1)] if cut is not None else out)


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(mutation=_mutations(), kind=st.sampled_from(["safetensors", "ckpt"]))
def test_fuzz_file_bytes(small, mutation, kind):
    path = small["dir"] / f"mutant.{kind}"
    path.write_bytes(_mutate(small[kind], mutation))
    _read_everything(path)


@FUZZ
@given(mutation=_mutations())
def test_fuzz_pickle_bytes(small, mutation):
    """Mutate data.pkl itself and re-zip it with a valid CRC, so the restricted unpickler sees the damage."""
    pkl = next(d for n, d in small["members"] if n.endswith("data.pkl"))
    path = _write_zip(small["dir"] / "mutant_pkl.ckpt", _replace(small["members"], "data.pkl", _mutate(pkl, mutation)))
    _read_everything(path)


# ---------------------------------------------------------------- memory

_MEASURE = """
import resource, sys
import numpy as np
from stable_diffusion_tf.weights.formats import open_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open_checkpoint(sys.argv[1]) as f:
    for key in f.keys():
        array = f.get(key).astype(np.float32, copy=False)
        del array
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_peak_memory(tmp_path, suffix):
    """Loading every tensor of a ~200 MB file one at a time grows peak RSS by less than 1.5x the file size."""
    if shutil.disk_usage(tmp_path).free < 1 << 30:
        pytest.skip("needs 1 GiB free in the temporary directory")
    rng = np.random.default_rng(0)
    sizes = [20 << 20, 15 << 20, 10 << 20, 5 << 20]  # 200 MB of float32 in four tensors
    tensors = {f"t{i}": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}
    path = tmp_path / f"big.{suffix}"
    if suffix == "ckpt":
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    else:
        save_numpy(tensors, str(path))
    del tensors
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    growth, size = int(result.stdout.strip().splitlines()[-1]), path.stat().st_size
    assert growth < 1.5 * size, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
