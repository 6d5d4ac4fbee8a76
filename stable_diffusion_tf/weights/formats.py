"""Lazy NumPy readers for .safetensors and torch.save zip checkpoints, without torch and without running pickles.

`get()` returns little-endian NumPy arrays: float16 stays float16, bfloat16 comes back as float32 (exact widening)
while `dtype()` still reports 'bfloat16', bool comes back as numpy bool. Every failure raises CheckpointError
naming the file.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import threading
import zipfile
import zlib
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from stable_diffusion_tf.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors JSON header cap
_MAX_PICKLE = 256 * 1024 * 1024  # torch data.pkl cap (an SD state dict pickles to well under 1 MB)
_MAX_DEFLATE_RATIO = 1100  # deflate cannot beat ~1032:1, so a larger declared size is corrupt or a zip bomb
_CHUNK = 1 << 20
_MAX_DIMS = 32  # NumPy 1.x's limit (2.x allows 64); no real weight comes close
ALIGNMENT = 64  # bytes: TensorFlow adopts buffers aligned so without a copy (and aborts on unaligned ones)

# Raw little-endian layout per dtype name; bfloat16 is read as uint16 and widened, bool as bytes.
_NUMPY = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8", "int32": "<i4",
    "int16": "<i2", "int8": "i1", "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "u1",
}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_TORCH_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_TORCH_DTYPES = frozenset(_NUMPY) - {"uint16", "uint32", "uint64"}
# Metadata globals seen in real Lightning checkpoints (SD 1.4 keys its callback state by the ModelCheckpoint class;
# some fine-tunes store numpy scalars): they resolve to an inert stand-in, never to the real callable.
_INERT = frozenset({
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})
_MEMBER = re.compile(r"(?P<root>[^/]+)/(?:data\.pkl|version|byteorder|data/\w+|\.[^/]+(?:/[^/]+)*)\Z")


class _Storage(NamedTuple):
    """Where one storage's bytes live: a range of the file, or a compressed zip member (start == -1)."""

    name: str
    dtype: str
    numel: int
    start: int
    member: zipfile.ZipInfo | None


class _Tensor(NamedTuple):
    """A view (element offset, shape, element strides) into a storage; immutable so a pickle cannot edit it."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class _StorageType(NamedTuple):
    """What `torch.FloatStorage` and friends resolve to while unpickling."""

    dtype: str


class _Inert:
    """Stand-in for allowed metadata globals: accepts any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Bad(Exception):
    """A problem found while unpickling; turned into CheckpointError with the path."""


def _error(path: str, message: str) -> CheckpointError:
    """One-line CheckpointError that starts with the file's path."""
    return CheckpointError(f"{path}: {message}")


def _is_count(value: Any) -> bool:
    """True for a plain non-negative int (not bool)."""
    return type(value) is int and value >= 0


def _is_shape(dims: Any) -> bool:
    """At most _MAX_DIMS counts whose non-zero product NumPy can represent (an empty tensor's other dims are free)."""
    return len(dims) <= _MAX_DIMS and all(map(_is_count, dims)) and math.prod(d for d in dims if d) < 1 << 48


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides for a shape."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class TensorFile:
    """An open checkpoint: names, shapes and dtypes come from the header; get() reads one tensor at a time."""

    def __init__(self, path: str, fmt: str, tensors: dict[str, _Tensor], fh: Any, archive: Any = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.format = fmt
        self.metadata = metadata or {}  # a safetensors file's __metadata__ (strings to strings)
        self._tensors = tensors
        self._fh = fh
        self._archive = archive
        self._lock = threading.Lock()
        self._closed = False
        self._scratch = np.empty(0, np.uint8)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file and free the read buffer; later get() calls raise CheckpointError."""
        with self._lock:
            self._closed = True
            self._scratch = np.empty(0, np.uint8)
            if self._archive is not None:
                self._archive.close()
            self._fh.close()

    def _scratch_buffer(self, nbytes: int) -> np.ndarray:
        """The first `nbytes` of the reused aligned buffer, grown as needed."""
        if self._scratch.size < nbytes:
            self._scratch = aligned_bytes(nbytes)
        return self._scratch[:nbytes]

    def keys(self) -> list[str]:
        """Tensor names in file order (non-tensor entries such as global_step are left out)."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def _entry(self, key: str) -> _Tensor:
        """The view for a key, or a CheckpointError naming it."""
        try:
            return self._tensors[key]
        except (KeyError, TypeError):
            raise _error(self.path, f"has no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, without reading its data."""
        return self._entry(key).shape

    def dtype(self, key: str) -> str:
        """Stored dtype name: 'float32', 'float16', 'bfloat16', 'int64', ..."""
        return self._entry(key).storage.dtype

    def get(self, key: str, scratch: bool = False) -> np.ndarray:
        """Read one tensor into a new array (bfloat16 widened to float32, see the module docstring).

        With `scratch` the array may live in a buffer this file reuses (64-byte aligned): it is valid
        until the next `get(..., scratch=True)`. The loader copies each tensor out at once, so reading
        4 GB does not fault in 4 GB of fresh pages.
        """
        tensor = self._entry(key)
        storage = tensor.storage
        item = np.dtype(_NUMPY[storage.dtype])
        flat = self._read(storage, scratch).view(item)
        numel = math.prod(tensor.shape)
        if tensor.strides == _contiguous(tensor.shape) and numel == storage.numel:
            array = flat.reshape(tensor.shape)
        else:  # a torch view (transpose, slice, shared storage): gather it; bounds were checked at open
            # strides of size-1 dims and of empty views never move the view: zero them so no value can overflow
            strides = tuple(s * item.itemsize if n > 1 and numel else 0 for n, s in zip(tensor.shape, tensor.strides))
            array = np.lib.stride_tricks.as_strided(flat[tensor.offset:], tensor.shape, strides, writeable=False)
            array = np.array(array)
        if storage.dtype == "bfloat16":
            return array.view(ml_dtypes.bfloat16).astype(np.float32)
        return array.astype(bool) if storage.dtype == "bool" else array

    def _read(self, storage: _Storage, scratch: bool = False) -> np.ndarray:
        """All bytes of one storage as a uint8 array, fresh or in the scratch buffer (CRC-checked for zip members)."""
        nbytes = storage.numel * np.dtype(_NUMPY[storage.dtype]).itemsize
        buf = self._scratch_buffer(nbytes) if scratch else np.empty(nbytes, np.uint8)
        view, got = memoryview(buf), 0
        with self._lock:
            if self._closed:
                raise _error(self.path, "is closed")
            try:
                if storage.start < 0:
                    with self._archive.open(storage.member) as member:
                        while got < nbytes and (n := member.readinto(view[got:got + _CHUNK])):
                            got += n
                        if member.read(1):  # also makes zipfile verify the CRC at end of stream
                            got = -1
                else:
                    self._fh.seek(storage.start)
                    while got < nbytes and (n := self._fh.readinto(view[got:])):
                        got += n
            except Exception as exc:  # noqa: BLE001 - zipfile raises many types on damaged archives
                raise _error(self.path, f"cannot read {storage.name}: {exc}") from None
        if got != nbytes:
            raise _error(self.path, f"{storage.name} is truncated or longer than its {nbytes} bytes")
        if storage.start >= 0 and storage.member is not None and zlib.crc32(buf) != storage.member.CRC:
            raise _error(self.path, f"{storage.name} fails its CRC check (corrupt download?)")
        return buf


def aligned_bytes(nbytes: int) -> np.ndarray:
    """A new uint8 array of `nbytes` starting on an ALIGNMENT-byte boundary."""
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start:start + nbytes]


def detect_format(path: str | os.PathLike) -> str:
    """'safetensors' or 'torch_zip' from the file's first bytes, else a CheckpointError saying what it is."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error(path, "no such file")
    if os.path.isdir(path):
        raise _error(path, "is a directory, expected a checkpoint file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise _error(path, "is empty (0 bytes); the download or copy did not finish")
    text = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs.github.com/spec/v1"):
        raise _error(path, "is a Git LFS pointer, not the weights; run `git lfs pull` in that repository")
    if text.startswith(b"<!doctype html") or text.startswith(b"<html"):
        raise _error(path, "looks like a web page saved instead of the checkpoint; download the file itself")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch_zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _error(path, "is a legacy (pre-1.6, non-zip) torch pickle or a plain pickle, which is not supported; "
                     "convert it to .safetensors")
    if len(head) < 9:
        raise _error(path, f"is only {len(head)} bytes; truncated, or not a checkpoint")
    raise _error(path, "is not a .safetensors or torch checkpoint")


def open_checkpoint(path: str | os.PathLike) -> TensorFile:
    """Open a .safetensors or torch zip checkpoint (format read from the bytes) for lazy, tensor-at-a-time reads."""
    path = os.fspath(path)
    fmt = detect_format(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        if fmt == "safetensors":
            tensors, metadata = _safetensors_index(path, fh)
            return TensorFile(path, fmt, tensors, fh, metadata=metadata)
        archive, tensors = _torch_zip_index(path, fh)
        return TensorFile(path, fmt, tensors, fh, archive)
    except BaseException:
        fh.close()
        raise


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook that rejects repeated keys."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        raise ValueError(f"duplicate key {next(k for k, _ in pairs if k in seen or seen.add(k))!r}")
    return result


def _safetensors_index(path: str, fh: Any) -> tuple[dict[str, _Tensor], dict[str, str]]:
    """Validate a safetensors header as the spec requires; its tensors, in header order, and its metadata."""
    size = os.fstat(fh.fileno()).st_size
    if size < 8:
        raise _error(path, f"is truncated: {size} bytes, no safetensors header")
    (header_len,) = struct.unpack("<Q", fh.read(8))
    if header_len > min(_MAX_HEADER, size - 8):
        raise _error(path, f"safetensors header length {header_len} exceeds the file ({size} bytes) or the cap")
    try:
        header = json.loads(fh.read(header_len).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _error(path, f"safetensors header is not valid JSON ({exc})") from None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, "safetensors __metadata__ must map strings to strings")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors, spans = {}, []
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _error(path, f"tensor {key!r} needs dtype, shape and data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise _error(path, f"tensor {key!r} has unsupported dtype {info['dtype']!r}")
        if not (isinstance(shape, list) and _is_shape(shape)):
            raise _error(path, f"tensor {key!r} shape {shape!r} is not a list of at most {_MAX_DIMS} sane sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise _error(path, f"tensor {key!r} data_offsets {offsets!r} are not [begin, end] with begin <= end")
        numel = math.prod(shape)
        if (nbytes := numel * np.dtype(_NUMPY[dtype]).itemsize) != offsets[1] - offsets[0]:
            raise _error(path, f"tensor {key!r} spans {offsets[1] - offsets[0]} bytes but {shape} {dtype} "
                         f"needs {nbytes}")
        storage = _Storage(f"tensor {key!r}", dtype, numel, data_start + offsets[0], None)
        tensors[key] = _Tensor(storage, 0, tuple(shape), _contiguous(tuple(shape)))
        spans.append((offsets[0], offsets[1], key))
    end, previous = 0, None
    for begin, stop, key in sorted(spans):
        if begin != end:
            kind = "an overlap" if begin < end else "a hole"
            raise _error(path, f"safetensors data has {kind} between tensors {previous!r} and {key!r}")
        end, previous = stop, key
    if end != data_len:
        what = "is truncated" if end > data_len else "has trailing bytes"
        raise _error(path, f"{what}: tensors cover {end} data bytes but the file holds {data_len}")
    return tensors, metadata


def _find_global(module: str, name: str) -> Any:
    """The only globals a checkpoint pickle may name; everything else is refused."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in _REBUILDERS:
        return _REBUILDERS[name]
    if module == "torch" and name in _TORCH_STORAGES:
        return _StorageType(_TORCH_STORAGES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return f"torch.{name}"  # dtype objects only appear as metadata, which is ignored
    if module.split(".")[0] in ("pytorch_lightning", "lightning") or (module, name) in _INERT:
        return _Inert
    raise _Bad(f"refuses to load global {module}.{name}: a checkpoint may only contain tensors and plain data")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    """Stand-in for torch._utils._rebuild_tensor(_v2): a bounds-checked lazy view of a storage."""
    if not isinstance(storage, _Storage):
        raise _Bad("tensor is not built on a storage")
    if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and _is_shape(size) and all(map(_is_count, stride))):
        raise _Bad(f"tensor on {storage.name} has a malformed offset/size/stride {offset!r} {size!r} {stride!r}")
    if math.prod(size) > storage.numel:  # also bounds what get() allocates for a zero-stride (expanded) view
        raise _Bad(f"tensor view {size} has more elements than {storage.name} ({storage.numel})")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise _Bad(f"tensor view {size} stride {stride} at offset {offset} exceeds {storage.name} "
                   f"({storage.numel} elements)")
    if not math.prod(size) and offset > storage.numel:
        raise _Bad(f"empty tensor offset {offset} lies past the end of {storage.name}")
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> _Tensor:
    """Stand-in for torch._utils._rebuild_parameter: a parameter is just its tensor."""
    if not isinstance(data, _Tensor):
        raise _Bad("parameter does not wrap a tensor")
    return data


_REBUILDERS = {
    "_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
}


def _check_opcodes(data: bytes) -> None:
    """Reject unknown or truncated opcodes and memo indices past the data, before the C unpickler runs."""
    # The C unpickler sizes its memo table by the largest index: a 1 KB pickle could make it allocate 20 GB.
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
            raise _Bad(f"data.pkl uses memo index {arg}, more than its {len(data)} bytes allow")


class _Unpickler(pickle.Unpickler):
    """Restricted unpickler: allow-listed globals only; storages become lazy references to zip members."""

    def __init__(self, data: bytes, storage: Any) -> None:
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        return _find_global(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Bad(f"unsupported persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and _is_count(numel)):
            raise _Bad(f"malformed storage reference {str(pid)[:80]}")
        return self._storage(kind.dtype, key, numel)


def _torch_root(path: str, members: dict[str, zipfile.ZipInfo]) -> str:
    """Check that zip members are exactly a torch.save layout (one folder, one data.pkl); return the folder."""
    roots = set()
    for name, info in members.items():
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
            raise _error(path, f"zip member name {name!r} is unsafe (absolute, empty or '..' path parts)")
        match = _MEMBER.match(name)
        if match is None:
            raise _error(path, f"zip member {name!r} does not belong in a torch.save checkpoint")
        if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _error(path, f"zip member {name!r} is encrypted or uses an unsupported compression")
        stored_mismatch = info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size
        if stored_mismatch or info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise _error(path, f"zip member {name!r} declares an impossible size {info.file_size}")
        roots.add(match["root"])
    pickles = [name for name in members if name.endswith("data.pkl")]
    if len(roots) != 1 or pickles != [f"{next(iter(roots))}/data.pkl"]:
        raise _error(path, f"zip archive has {len(pickles)} data.pkl under {len(roots)} top-level folders, "
                     "expected exactly one <folder>/data.pkl (not a torch.save checkpoint)")
    if members[pickles[0]].file_size > _MAX_PICKLE:
        raise _error(path, f"data.pkl is {members[pickles[0]].file_size} bytes, over the cap")
    return roots.pop()


def _torch_zip_index(path: str, fh: Any) -> tuple[zipfile.ZipFile, dict[str, _Tensor]]:
    """Check a torch.save zip, unpickle data.pkl with the restricted unpickler and return its tensors."""
    try:
        archive = zipfile.ZipFile(fh)  # wraps fh without owning it: open_checkpoint closes fh on failure
        infos = archive.infolist()
        members = {info.filename: info for info in infos}
        if len(members) != len(infos):
            raise _error(path, "zip archive has duplicate member names")
        root = _torch_root(path, members)
        byteorder = b"little"  # older torch.save wrote no byteorder member; such files come from x86/ARM hosts
        if (order := members.get(f"{root}/byteorder")) is not None:
            with archive.open(order) as member:
                byteorder = member.read(16)
        data = archive.read(members[f"{root}/data.pkl"])
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on damaged archives
        raise _error(path, f"is not a readable zip archive, truncated or corrupt ({type(exc).__name__}: {exc})") \
            from None
    if byteorder != b"little":
        raise _error(path, f"byteorder is {byteorder[:16]!r}; only little-endian checkpoints are supported")
    size = os.fstat(fh.fileno()).st_size
    storages: dict[str, _Storage] = {}

    def storage(dtype: str, key: str, numel: int) -> _Storage:
        name = f"{root}/data/{key}"
        known = storages.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (dtype, numel):
                raise _Bad(f"storage {name} is used with two different types or sizes")
            return known
        info = members.get(name)
        nbytes = numel * np.dtype(_NUMPY[dtype]).itemsize
        if info is None:
            raise _Bad(f"storage member {name} is missing")
        if info.file_size != nbytes:
            raise _Bad(f"storage member {name} holds {info.file_size} bytes but {numel} x {dtype} needs {nbytes}")
        start = -1
        if info.compress_type == zipfile.ZIP_STORED:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise _Bad(f"storage member {name} has no valid local zip header")
            start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
            if start + nbytes > size:
                raise _Bad(f"storage member {name} runs past the end of the file (truncated?)")
        storages[key] = _Storage(name, dtype, numel, start, info)
        return storages[key]

    try:
        _check_opcodes(data)
        obj = _Unpickler(data, storage).load()
    except _Bad as exc:
        raise _error(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure while parsing hostile bytes means a corrupt pickle
        raise _error(path, f"data.pkl is not a valid checkpoint pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a Lightning checkpoint, as SD .ckpt files are
    if not isinstance(obj, dict):
        raise _error(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    return archive, _flat_tensors(obj)


def _flat_tensors(obj: dict, prefix: str = "", depth: int = 0) -> dict[str, _Tensor]:
    """The tensors of a dict; those of dicts inside it under dotted names (`string_to_param.*`, as A1111's
    embedding files nest them), at most three levels down."""
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, _Tensor):
            out[prefix + key] = value
        elif isinstance(value, dict) and depth < 2:
            out.update(_flat_tensors(value, f"{prefix}{key}.", depth + 1))
    return out
