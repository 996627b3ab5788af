"""Where files live: local paths and fsspec URLs (gs://, s3://, file://, ...) behind one small API.

Every reader and writer of a user-named file that may sit on object storage goes through here:
sources (`--images`, `--list` and the files it names, `--bin`, `--rec`, `--wds`, `--parquet`),
results (`--out`, `--save-embeddings`, `--save-patch-quality`) and a chunked run's chunks.

API: `is_url`, `join`, `open_read`, `read_bytes`, `exists`, `size`, `open_write`, `write_bytes`, `listdir`,
`remove`, `makedirs`, `glob` (sorted matches of a pattern), `find` (every file under a folder or prefix, with
its size), `find_names` (the same without sizes), `is_folder`, `protocol`, `local_path`, and the errors
`StorageError` (an OSError; `kind` says which failure) and its two subclasses `MissingError` (also a
FileNotFoundError) and `FolderError` (also an IsADirectoryError), so a caller that catches those OS errors
keeps working for URLs.

A local path (or a `file://` URL, read as the path it names) is read and written as the rest of the project
does: regular files only (a FIFO or a device is refused without waiting on it), and a written file never
follows or replaces a symbolic link. Only the schemes of SCHEMES are served (object stores and file://); any
other (http://, memory://, zip://, ...) and a chained URL (`a::b`) are refused. A URL goes through fsspec with
bounded waits (S3_CONFIG and S3_RETRIES; GCS_TIMEOUT, gcsfs trying 6 times over about 30 s, which it does not
let a caller change) and without fsspec's listing cache (another host's objects are seen as soon as they
exist); an S3 or GCS prefix is listed a page at a time (find_names). Object storage has no append
and no rename you can rely on: `write_bytes`/`open_write` make an object appear whole when it is complete and
never half (a remote upload is discarded on error; a local file is written beside it, flushed to disk, and
renamed in place).

Every failure is a StorageError of one sentence naming the location and the fix: no such file, a folder where
a file is expected, no such bucket, access denied, no credentials or credentials refused (expired), an
unreachable endpoint, a service still throttling after its retries, a scheme not served, or fsspec lacking the
package of a scheme (`pip install s3fs`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import stat
from collections.abc import Iterator
from typing import BinaryIO

from vitnt_jax import files
from vitnt_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The pip package that gives fsspec each scheme (fsspec itself names only some of them).
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
    "sftp": "paramiko",
    "ssh": "paramiko",
    "oci": "ocifs",
}
# The schemes read and written: local files and object stores. The others fsspec knows are refused: http(s) and
# ftp reach any host a list line names (an instance's metadata server), memory:// is another program's state, and
# the archive and caching wrappers (zip://, simplecache::, filecache::) read or write local files under a remote name.
SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oci", "hf")
# Bounded waits for S3 (botocore's settings): an endpoint that does not answer fails in minutes at most. botocore
# tries each request 3 times (its standard mode backs off on throttling too); s3fs wraps each call in a retry loop
# of its own (5 tries by default, which made a silent endpoint cost half an hour): S3_RETRIES tries here.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 20, "retries": {"max_attempts": 3, "mode": "standard"}}
S3_RETRIES = 2
# gcsfs sends its requests with no timeout at all unless given one (an endpoint that accepts and never answers
# hangs forever); it tries each request 6 times with about 30 s of back-off, which a caller cannot change.
GCS_TIMEOUT = {"sock_connect": 10, "sock_read": 20}
_GLOB = re.compile(r"[*?\[]")


class StorageError(UserError, OSError):
    """A storage location that cannot be read or written; the message names it and the fix.

    Also an OSError, so code that caught the OS errors of local files (a result reader, a merge) catches these.

    kind: 'missing', 'folder', 'bucket', 'denied', 'credentials' (none, or refused: expired, invalid),
    'unreachable', 'busy' (throttled or failing still after the retries), 'package', 'scheme' (a URL of a scheme
    not read here, a chained URL, a file:// URL naming another host), 'link', 'special', 'large' (above a
    reader's limit; `size` holds the size) or 'other'.
    """

    def __init__(self, message: str, *, kind: str = "other", field: str | None = None, also: tuple[str, ...] = ()):
        self.kind = kind
        super().__init__(message, field=field, also=also)


class MissingError(StorageError, FileNotFoundError):
    """No file or object at the location."""


class FolderError(StorageError, IsADirectoryError):
    """A folder (or a prefix holding objects) where a file is expected."""


def is_url(path: str | os.PathLike) -> bool:
    """Returns whether `path` is a URL (`scheme://...`, file:// included) rather than a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def protocol(path: str | os.PathLike) -> str:
    """Returns the URL scheme of `path` in lower case ('s3', 'gs', 'file'), '' for a local path."""
    return path.split("://", 1)[0].lower() if is_url(path) else ""


def local_path(path: str | os.PathLike) -> str | None:
    """Returns the local path `path` names (a file:// URL's path), None for a remote URL.

    A file:// URL names an absolute path (`file:///data/x`, or `file://localhost/data/x`); one naming another
    host (`file://host/x`, or a relative `file://x/y`) is refused (StorageError). Its path is not %-decoded.
    """
    if not is_url(path):
        return os.fspath(path)
    if protocol(path) == "file":
        rest = path.split("://", 1)[1]
        if rest.lower().startswith("localhost/"):
            rest = rest[len("localhost") :]
        if rest and not rest.startswith("/"):
            host = rest.split("/", 1)[0]
            raise StorageError(
                f"{path} names the host {host!r}, and only local files are read as file:// URLs; write "
                "file:///absolute/path (three slashes) or the plain path.",
                kind="scheme",
            )
        return rest or "."
    return None


def _check_scheme(url: str) -> None:
    """Raises StorageError (kind 'scheme') for a URL this module does not read or write (see SCHEMES)."""
    scheme = protocol(url)
    if "::" in url:
        raise StorageError(
            f"{url} chains locations with '::', which is not read here (a key holding '::' cannot be named "
            "either); pass one location: gs://, s3://, az://, hf:// or a local path.",
            kind="scheme",
        )
    if scheme not in SCHEMES:
        raise StorageError(
            f"{url} uses {scheme}://, which is not read or written here; use gs://, s3://, az://, hf:// or a local "
            "path (copy the file there first).",
            kind="scheme",
        )


def _options(scheme: str) -> dict:
    """Returns the options this module adds for a scheme, under those of fsspec's configuration."""
    if scheme in ("s3", "s3a"):
        import fsspec.config

        configured = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
        return {"config_kwargs": {**S3_CONFIG, **configured}, "use_listings_cache": False}
    if scheme in ("gs", "gcs"):
        import aiohttp
        import fsspec.config

        logging.getLogger("gcsfs").setLevel(max(logging.getLogger("gcsfs").level, logging.CRITICAL))
        options = {"use_listings_cache": False}
        if not any("requests_timeout" in fsspec.config.conf.get(name, {}) for name in ("gs", "gcs")):
            options["requests_timeout"] = aiohttp.ClientTimeout(total=None, **GCS_TIMEOUT)
        return options
    return {}


def _fs(url: str):
    """Returns (file system, path inside it) of a URL; StorageError when its scheme cannot be served."""
    import fsspec
    import fsspec.config

    scheme = protocol(url)
    _check_scheme(url)
    try:
        fs, inner = fsspec.core.url_to_fs(scheme + url[len(scheme) :], **_options(scheme))  # S3:// as s3://
        if scheme in ("s3", "s3a") and "retries" not in fsspec.config.conf.get("s3", {}):
            fs.retries = S3_RETRIES  # an attribute of s3fs, not an option: set on the (cached) instance
        return fs, inner
    except ImportError as error:
        package = _PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
        raise StorageError(
            f"{url} needs the {package} package to be read or written; install it (pip install {package}).",
            kind="package",
        ) from error
    except ValueError as error:
        if "protocol" in str(error).lower():
            raise StorageError(
                f"{url} has a URL scheme ({scheme}://) fsspec does not know; use gs://, s3:// or a local path.",
                kind="scheme",
            ) from error
        raise StorageError(f"{url} is not a valid location ({error}); check the URL.") from error


def _names(error: BaseException) -> set[str]:
    return {c.__name__ for c in type(error).__mro__}


_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ConnectionError",
    "TimeoutError",
}


# Error codes (S3's, or an HTTP status) that say the credentials themselves were refused: every later request
# would fail alike, so the run stops (an expired session token mid-run) rather than making error rows of the rest.
_REFUSED_CREDENTIALS = {
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "RequestTimeTooSkewed",
    "InvalidSecurity",
    "AccountProblem",
    "AllAccessDisabled",
    "NotSignedUp",
    "AuthorizationHeaderMalformed",
    "401",
}
# The service refusing for load (throttling) or failing itself, still after the retries: the run stops and a rerun
# with --resume reads the rest, instead of those rows becoming error rows that no resume reads again.
_BUSY = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "429",
    "500",
    "502",
    "503",
    "504",
}


def _codes(error: BaseException) -> list[str]:
    """Returns the service's error codes and HTTP statuses found on `error` and the errors it was raised from."""
    codes, seen = [], set()
    while error is not None and id(error) not in seen and len(seen) < 16:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            codes.append(str((response.get("Error") or {}).get("Code") or ""))
            codes.append(str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or ""))
        code = getattr(error, "code", None)  # gcsfs's HttpError
        if isinstance(code, int):
            codes.append(str(code))
        error = error.__cause__ or error.__context__
    return [c for c in codes if c]


def _from_s3(error: BaseException) -> bool:
    """Returns whether `error` (or one it was raised from) holds an answer of an S3 service (botocore's)."""
    seen = set()
    while error is not None and id(error) not in seen and len(seen) < 16:
        seen.add(id(error))
        if isinstance(getattr(error, "response", None), dict):
            return True
        error = error.__cause__ or error.__context__
    return False


def _bucket_exists(fs, inner: str) -> bool:
    """Returns whether the bucket of `inner` exists (True when that cannot be told)."""
    bucket = inner.split("/", 1)[0]
    try:
        return bool(fs.exists(bucket))
    except Exception:
        return True


def _translate(error: BaseException, url: str, action: str, fs=None, inner: str = "") -> StorageError:
    """Returns the one-sentence StorageError for a failure of `action` ('read', 'write', 'list') on `url`."""
    if isinstance(error, StorageError):
        return error
    names = _names(error)
    text = str(error)
    bucket = f"{url.split('://', 1)[0]}://{inner.split('/', 1)[0]}" if is_url(url) and inner else url
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or "NoSuchBucket" in names:
        return StorageError(f"no such bucket {bucket} (for {url}); check the bucket's name.", kind="bucket")
    if isinstance(error, FileNotFoundError):
        if fs is not None and is_url(url) and not _bucket_exists(fs, inner):
            return StorageError(f"no such bucket {bucket} (for {url}); check the bucket's name.", kind="bucket")
        return MissingError(f"{url} does not exist; check the path.", kind="missing")
    if isinstance(error, IsADirectoryError):
        return FolderError(f"{url} is a folder; pass a file.", kind="folder")
    codes = _codes(error)
    refused = next((c for c in codes if c in _REFUSED_CREDENTIALS), None)
    if refused is None and codes and set(codes) <= {"400"} and _from_s3(error):
        refused = "400 Bad Request"  # an S3 HEAD answer has no body: an expired token, a wrong region
    if refused is not None:
        return StorageError(
            f"the storage service refused the credentials to {action} {url} ({refused}); renew them (an expired "
            "session token), or fix the key, the region or the clock, and run again (--resume continues).",
            kind="credentials",
        )
    busy = next((c for c in codes if c in _BUSY), None)
    if busy is not None:
        return StorageError(
            f"the storage service kept failing to {action} {url} ({busy}) after its retries "
            "(throttling or an outage); run again later (--resume continues), or with fewer --workers.",
            kind="busy",
        )
    if names & _CREDENTIALS:
        return StorageError(
            f"no credentials to {action} {url}; set them up (AWS: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a "
            "profile; Google: gcloud auth application-default login or GOOGLE_APPLICATION_CREDENTIALS).",
            kind="credentials",
        )
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text or " 403" in text:
        return StorageError(
            f"access denied to {action} {url}; check that your credentials may {action} it.", kind="denied"
        )
    if names & _UNREACHABLE or isinstance(error, (ConnectionError, TimeoutError)):
        return StorageError(
            f"cannot reach the storage service for {url} ({_short(error)}); check the network and the endpoint.",
            kind="unreachable",
        )
    return StorageError(f"cannot {action} {url} ({_short(error)}); check the location and access.")


def _short(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _errors(url: str, action: str, fs=None, inner: str = "") -> Iterator[None]:
    """Turns every failure inside into a StorageError (MemoryError and interrupts pass)."""
    try:
        yield
    except (MemoryError, KeyboardInterrupt, SystemExit, StorageError):
        raise
    except Exception as error:
        raise _translate(error, url, action, fs, inner) from error


def join(base: str | os.PathLike, name: str) -> str:
    """Returns `name` inside the folder (or prefix) `base`."""
    base = os.fspath(base)
    if is_url(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


class _Reader:
    """A remote file for reading whose failures are StorageErrors; every other attribute is the file's own."""

    def __init__(self, f, url: str):
        self._f, self._url = f, url

    def read(self, n: int = -1) -> bytes:
        with _errors(self._url, "read"):
            return self._f.read(n)

    def readinto(self, b) -> int:
        with _errors(self._url, "read"):
            return self._f.readinto(b)

    def readline(self, n: int = -1) -> bytes:
        with _errors(self._url, "read"):
            if n is None or n < 0:
                return self._f.readline()
            start = self._f.tell()  # fsspec's readline takes no limit: read the limit, keep up to a line end
            data = self._f.read(n)
            end = data.find(b"\n")
            if end >= 0:
                data = data[: end + 1]
                self._f.seek(start + len(data))
            return data

    def seek(self, offset: int, whence: int = 0) -> int:
        with _errors(self._url, "read"):
            return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __iter__(self):
        return iter(self.readline, b"")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def open_read(path: str | os.PathLike, *, max_bytes: int | None = None) -> BinaryIO:
    """Returns a binary file (seekable) for reading `path`; a local path must be a regular file.

    MissingError when nothing is there, FolderError for a folder (a prefix of objects), StorageError otherwise;
    with `max_bytes`, StorageError (kind 'large') for a file above that size, before any of its bytes is read
    (a URL costs one metadata request either way).
    """
    local = local_path(path)
    if local is not None:
        with _errors(os.fspath(path), "read"):
            try:
                f = open(files.open_regular(local), "rb")
                if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                    f.close()
                    raise _large(path, os.stat(local).st_size, max_bytes)
                return f
            except files.NotRegularFileError as error:
                if error.kind == "a folder":
                    raise FolderError(f"{path} is a folder; pass a file.", kind="folder") from error
                raise StorageError(
                    f"{path} is {error.kind}, not a regular file; pass a file.", kind="special"
                ) from None
    fs, inner = _fs(path)
    with _errors(path, "read", fs, inner):
        info = _info(fs, inner)
        if info.get("type") == "directory":
            raise FolderError(f"{path} is a folder (a prefix of objects); pass a file.", kind="folder")
        size = int(info.get("size") or 0)
        if max_bytes is not None and size > max_bytes:
            raise _large(path, size, max_bytes)
        return _Reader(fs.open(inner, "rb", size=size), path)


def _info(fs, inner: str) -> dict:
    """Returns fsspec's info of `inner`; a bare 403 is asked again as a 1-byte read, whose answer says why.

    An S3 HEAD request's refusal has no body: an object one may not read and credentials that expired mid-run
    look alike. The read's answer names its code (AccessDenied: that object's error row; ExpiredToken: the run
    stops).
    """
    try:
        return fs.info(inner)
    except PermissionError as error:
        if set(_codes(error)) - {"403"}:  # the answer named its reason
            raise
        try:
            fs.cat_file(inner, start=0, end=1)
        except Exception as detail:
            if any(c in _REFUSED_CREDENTIALS for c in _codes(detail)):
                raise detail  # its cause, the service's answer, names the code
        raise


def _large(path, size: int, limit: int) -> StorageError:
    error = StorageError(f"{path} holds {size} bytes, above the {limit} byte limit; it is not read.", kind="large")
    error.size = size
    return error


def read_exactly(file, n: int) -> bytes:
    """Returns the next `n` bytes of an open binary file, fewer only where it ends (a read may return fewer)."""
    parts, left = [], n
    while left > 0:
        part = file.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """Returns the whole content of `path`; with `limit`, StorageError for a file above that many bytes."""
    with open_read(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise StorageError(f"{path} holds more than {limit} bytes; pass a smaller file.", kind="other")
    return data


def exists(path: str | os.PathLike) -> bool:
    """Returns whether a file or a folder (a prefix of objects) is at `path`; False for a missing bucket."""
    local = local_path(path)
    if local is not None:
        return os.path.exists(local)
    fs, inner = _fs(path)
    try:
        with _errors(path, "read", fs, inner):
            return bool(fs.exists(inner))
    except StorageError as error:
        if error.kind in ("missing", "bucket"):
            return False
        raise


def is_folder(path: str | os.PathLike) -> bool:
    """Returns whether `path` is a folder (a URL: a prefix that holds objects, or a bucket)."""
    local = local_path(path)
    if local is not None:
        return os.path.isdir(local)
    fs, inner = _fs(path)
    try:
        with _errors(path, "read", fs, inner):
            return bool(fs.isdir(inner))
    except StorageError as error:
        if error.kind in ("missing", "bucket"):
            return False
        raise


def size(path: str | os.PathLike) -> int:
    """Returns the size in bytes of the file at `path`; MissingError or FolderError otherwise."""
    local = local_path(path)
    if local is not None:
        with _errors(os.fspath(path), "read"):
            info = os.stat(local)
        if stat.S_ISDIR(info.st_mode):
            raise FolderError(f"{path} is a folder; pass a file.", kind="folder")
        return info.st_size
    fs, inner = _fs(path)
    with _errors(path, "read", fs, inner):
        info = _info(fs, inner)
    if info.get("type") == "directory":
        raise FolderError(f"{path} is a folder (a prefix of objects); pass a file.", kind="folder")
    return int(info.get("size") or 0)


@contextlib.contextmanager
def open_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; `path` appears whole when the block ends, and not at all when it raises.

    Local: written to a new temporary file beside `path` (never through a link), flushed to disk, then renamed
    over `path`; a symbolic link at `path` is refused, not replaced. Remote: one upload, discarded on error.
    """
    local = local_path(path)
    if local is None:
        fs, inner = _fs(path)
        with _errors(path, "write", fs, inner):
            f = fs.open(inner, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # an upload in parts is aborted: nothing appears
            with contextlib.suppress(Exception):
                f.closed = True  # and closing (the garbage collector's) must not upload what was buffered
            raise
        with _errors(path, "write", fs, inner):
            f.close()
        return
    if os.path.islink(local):
        raise StorageError(
            f"{path} is a symbolic link; refusing to write through it (pass the file itself).", kind="link"
        )
    found = files.file_kind(local)
    if found == "a folder":
        raise FolderError(f"{path} is a folder; pass a file name to write.", kind="folder")
    if found is not None:
        raise StorageError(f"{path} is {found}; refusing to write there (pass a file name).", kind="special")
    folder, name = os.path.split(os.path.abspath(local))
    tmp = f".{name}.tmp{os.getpid()}-{os.urandom(4).hex()}"
    # The temporary is made, renamed and removed through a descriptor of the folder: the file lands in the folder
    # opened here even when a link is put in its place meanwhile (which is then refused, not written through).
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        missing = f"cannot write {path}: its folder does not exist; create it first."
        raise MissingError(missing, kind="missing") from None
    except NotADirectoryError:
        missing = f"cannot write {path}: its folder is a file; pass a path inside a folder."
        raise MissingError(missing, kind="missing") from None
    except OSError as error:
        raise _translate(error, os.fspath(path), "write") from error
    made = False
    try:
        with _errors(os.fspath(path), "write"):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd)
        made = True
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.islink(local):  # planted while writing
            raise StorageError(
                f"{path} is a symbolic link; refusing to write through it (pass the file itself).", kind="link"
            )
        opened, now = os.fstat(dfd), _stat_or_none(folder)
        if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise StorageError(
                f"cannot write {path}: its folder was replaced while it was written (by a link or another folder); "
                "nothing was written, check the folder and run again.",
                kind="link",
            )
        with _errors(os.fspath(path), "write"):
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        made = False
        with contextlib.suppress(OSError):  # the rename itself made durable
            os.fsync(dfd)
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        os.close(dfd)


def _stat_or_none(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` as the whole content of `path` (see open_write)."""
    with open_write(path) as f:
        f.write(data)


def listdir(folder: str | os.PathLike) -> list[str]:
    """Returns the names (not paths) of the entries directly inside `folder`, sorted; [] when it does not exist."""
    local = local_path(folder)
    if local is not None:
        try:
            return sorted(os.listdir(local))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, inner = _fs(folder)
    try:
        with _errors(folder, "list", fs, inner):
            entries = fs.ls(inner.rstrip("/"), detail=False)
    except StorageError as error:
        if error.kind == "missing":
            return []
        raise
    prefix = inner.rstrip("/") + "/"
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") + "/" != prefix)


def find(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Returns (path relative to `folder`, size) of every file under it, at any depth, sorted by path.

    A URL lists its prefix's objects (one listing, no object read); a local folder is walked without following
    folder links. MissingError when nothing is there.
    """
    local = local_path(folder)
    if local is not None:
        if not os.path.isdir(local):
            raise MissingError(f"{folder} is not a folder; check the path.", kind="missing")
        found = []
        for top, _, names in os.walk(local):
            for name in names:
                full = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    info = os.lstat(full)
                    if stat.S_ISREG(info.st_mode):
                        found.append((os.path.relpath(full, local).replace(os.sep, "/"), info.st_size))
        return sorted(found)
    fs, inner = _fs(folder)
    prefix = inner.rstrip("/") + "/"
    with _errors(folder, "list", fs, inner):
        listed = fs.find(prefix.rstrip("/"), detail=True)
    out = [
        (name[len(prefix) :], int(info.get("size") or 0))
        for name, info in listed.items()
        if name.startswith(prefix) and info.get("type") != "directory" and not name.endswith("/")
    ]
    if not out and not _bucket_exists(fs, inner):
        raise StorageError(
            f"no such bucket {protocol(folder)}://{inner.split('/', 1)[0]}; check its name.", kind="bucket"
        )
    return sorted(out)


def find_names(folder: str | os.PathLike) -> list[str]:
    """Returns the paths relative to `folder` of every file under it, sorted: `find` without the sizes.

    For an s3:// or gs:// URL the listing is read a page at a time (see _pages), so memory holds one short
    string per object (a prefix of millions of objects), never one metadata record each; a folder marker (a key
    ending in '/', which s3fs lists without its slash) is no file. Other schemes use fsspec's find().
    """
    local = local_path(folder)
    if local is not None:
        return [name for name, _ in find(folder)]
    fs, inner = _fs(folder)
    prefix = inner.rstrip("/") + "/"
    bucket, _, key_prefix = prefix.partition("/")
    with _errors(folder, "list", fs, inner):
        pages = _pages(fs, bucket, key_prefix)
        if pages is not None:
            out = [key[len(key_prefix) :] for page in pages for key in page if not key.endswith("/")]
        else:
            listed = fs.find(prefix.rstrip("/"), detail=False)
            out = [name[len(prefix) :] for name in listed if name.startswith(prefix) and not name.endswith("/")]
            del listed
    if not out and not _bucket_exists(fs, inner):
        bucket = f"{protocol(folder)}://{inner.split('/', 1)[0]}"
        raise StorageError(f"no such bucket {bucket} (for {folder}); check the bucket's name.", kind="bucket")
    out.sort()
    return out


# Keys asked for a listing page: S3's and GCS's most.
_PAGE = 1000


def _pages(fs, bucket: str, prefix: str) -> Iterator[list[str]] | None:
    """Yields the keys under `prefix` of an S3 or GCS bucket a page (1000 keys) at a time, in the store's order.

    s3fs's and gcsfs's find() build a metadata record of about a kilobyte for every object before returning
    anything (a gigabyte for a prefix of a million objects), names only or not: here only the keys of one page
    are held at a time besides those kept. A folder marker (a key ending in '/') is yielded as it is. None for a
    file system of another kind (its own find() is used).
    """
    kind = type(fs).__name__
    if kind == "S3FileSystem":

        def s3() -> Iterator[list[str]]:
            token: dict = {}
            while True:
                page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=_PAGE, **token)
                yield [item["Key"] for item in page.get("Contents") or ()]
                if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                    return
                token = {"ContinuationToken": page["NextContinuationToken"]}

        return s3()
    if kind == "GCSFileSystem":

        def gcs() -> Iterator[list[str]]:
            token: dict = {}
            while True:
                page = fs.call(
                    "GET", "b/{}/o", bucket, json_out=True, prefix=prefix, maxResults=_PAGE,
                    fields="items(name),nextPageToken", **token,
                )  # fmt: skip
                yield [item["name"] for item in page.get("items") or ()]
                if not page.get("nextPageToken"):
                    return
                token = {"pageToken": page["nextPageToken"]}

        return gcs()
    return None


def glob(pattern: str | os.PathLike) -> list[str]:
    """Returns the files `pattern` matches (`*`, `?`, `[...]`; `**` any depth), sorted; a URL's are URLs.

    A pattern without those characters returns itself when it is a file, [] otherwise. Folders never match.
    """
    pattern = os.fspath(pattern)
    local = local_path(pattern)
    if local is not None:
        import glob as globbing

        if not _GLOB.search(local):
            return [pattern] if os.path.isfile(local) else []
        found = [p for p in globbing.glob(local, recursive=True) if os.path.isfile(p)]
        if pattern != local:  # a file:// pattern gives file:// URLs
            found = ["file://" + p for p in found]
        return sorted(found)
    fs, inner = _fs(pattern)
    scheme = pattern.split("://", 1)[0]
    if not _GLOB.search(inner):
        try:
            size(pattern)
        except StorageError as error:
            if error.kind in ("missing", "folder", "bucket"):
                return []
            raise
        return [pattern]
    with _errors(pattern, "list", fs, inner):
        found = fs.glob(inner, detail=True)
    paths = [p for p, info in found.items() if info.get("type") != "directory"]
    if "**" not in inner:  # fsspec's `*` may cross no '/'; check, to be sure of the rule
        paths = [p for p in paths if fnmatch.fnmatchcase(p, inner) and p.count("/") == inner.count("/")]
    return sorted(f"{scheme}://{p}" for p in paths)


def remove(path: str | os.PathLike) -> None:
    """Removes the file `path` when it exists."""
    local = local_path(path)
    if local is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)
        return
    fs, inner = _fs(path)
    try:
        with _errors(path, "write", fs, inner):
            fs.rm_file(inner)
    except StorageError as error:
        if error.kind != "missing":
            raise


def makedirs(folder: str | os.PathLike) -> None:
    """Creates a local folder (and its parents); a URL prefix needs none."""
    local = local_path(folder)
    if local is not None:
        os.makedirs(local, exist_ok=True)
