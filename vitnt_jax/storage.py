"""Where files live: local paths and fsspec URLs (gs://, s3://, file://, ...) behind one small API.

Every reader and writer of a user-named file that may sit on object storage goes through here:
sources (`--images`, `--list` and the files it names, `--bin`, `--rec`, `--wds`, `--parquet`),
results (`--out`, `--save-embeddings`, `--save-patch-quality`) and a chunked run's chunks.

A local path is read and written as the rest of the project does (regular files only, no link
followed where the caller says so); a URL through fsspec. Object storage has no append and no
rename you can rely on: `write_bytes`/`open_write` make an object appear whole when it is complete
and never half (a local file is written beside it and renamed in place).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

from vitnt_jax import files
from vitnt_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(UserError):
    """A storage location that cannot be read or written; the message names it and the fix."""


def is_url(path: str | os.PathLike) -> bool:
    """Returns whether `path` is a URL (`scheme://...`, file:// included) rather than a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def _fs(url: str):
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url)
    return fs, inner


def join(base: str | os.PathLike, name: str) -> str:
    """Returns `name` inside the folder (or prefix) `base`."""
    base = os.fspath(base)
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def open_read(path: str | os.PathLike) -> BinaryIO:
    """Returns a binary file (seekable) for reading `path`; a local path must be a regular file."""
    if is_url(path):
        fs, inner = _fs(path)
        return fs.open(inner, "rb")
    return open(files.open_regular(path), "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    """Returns the whole content of `path`."""
    with open_read(path) as f:
        return f.read()


def exists(path: str | os.PathLike) -> bool:
    if is_url(path):
        fs, inner = _fs(path)
        return fs.exists(inner)
    return os.path.exists(path)


def size(path: str | os.PathLike) -> int:
    if is_url(path):
        fs, inner = _fs(path)
        return int(fs.size(inner))
    return os.stat(path).st_size


@contextlib.contextmanager
def open_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; `path` appears whole when the block ends, and not at all when it raises."""
    path = os.fspath(path)
    if is_url(path):
        fs, inner = _fs(path)
        f = fs.open(inner, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
            raise
        f.close()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(files.open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` as the whole content of `path` (see open_write)."""
    with open_write(path) as f:
        f.write(data)


def listdir(folder: str | os.PathLike) -> list[str]:
    """Returns the names (not paths) of the files directly inside `folder`, sorted; [] when it does not exist."""
    folder = os.fspath(folder)
    if is_url(folder):
        fs, inner = _fs(folder)
        try:
            entries = fs.ls(inner, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def remove(path: str | os.PathLike) -> None:
    """Removes the file `path` when it exists."""
    if is_url(path):
        fs, inner = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(inner)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def makedirs(folder: str | os.PathLike) -> None:
    """Creates a local folder (and its parents), a file:// one too; an object-store prefix needs none."""
    if not is_url(folder):
        os.makedirs(folder, exist_ok=True)
        return
    fs, inner = _fs(os.fspath(folder))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(inner, exist_ok=True)
