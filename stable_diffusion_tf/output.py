"""Writing images: PNG files that carry their generation recipe, written atomically, never clobbering by accident."""

from __future__ import annotations

import errno
import os
import secrets


from .errors import OutputError
from .recipe import pnginfo

# File systems without hard links (FAT, some network mounts) answer link() with one of these.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def numbered_paths(output: str | os.PathLike, count: int) -> list[str]:
    """One path per image: `out.png` for one image; `out-0.png`, `out-1.png`, ... in the same folder for more."""
    output = os.fspath(output)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if count == 1:
        return [output]
    folder, name = os.path.split(output)  # split the file name only, so a dot in a folder name stays put
    stem, ext = os.path.splitext(name)
    return [os.path.join(folder, f"{stem}-{i}{ext}") for i in range(count)]


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises OutputError unless `path` is a .png file name in an existing writable folder, new or `overwrite`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"output {path!r} is a directory; give a file name such as {os.path.join(path, 'out.png')!r}")
    if os.path.splitext(path)[1].lower() != ".png":
        raise OutputError(f"output {path!r} must end in .png (only PNG files are written)")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise OutputError(f"output folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder!r} is not writable")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"output {path!r} already exists; pass --overwrite to replace it")


def save_png(image, path: str | os.PathLike, parameters: str | None = None, overwrite: bool = False) -> str:
    """Writes `image` (PIL) as PNG with a `parameters` text chunk (AUTOMATIC1111's key) atomically; returns the path.

    The bytes go to a hidden temporary file in the same folder, are fsynced, then published with a hard
    link (fails if `path` exists, so nothing is clobbered even in a race) or, with `overwrite`, os.replace.
    On any failure, KeyboardInterrupt included, the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    info = pnginfo(parameters)
    folder, name = os.path.split(path)
    try:
        fd, tmp = _create_temp(folder or ".", name)
    except OSError as e:
        raise OutputError(f"cannot write {path!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, FileExistsError):
            raise OutputError(f"output {path!r} already exists; pass --overwrite to replace it") from None
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path!r}: {e.strerror or e}") from None
        raise
    return path


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """Opens a new hidden file next to the target; mode 0o666 minus the umask (mkstemp would give 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name[:100]}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Moves the finished temporary file to `path`; without `overwrite` an existing `path` is an error."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: check then rename (a small race, never a partial file)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)
