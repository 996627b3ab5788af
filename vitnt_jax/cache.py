"""Where converted models, weights and compiled programs are cached: $VITNT_JAX_CACHE, else ~/.cache/vitnt_jax.

Compiled programs: JAX's persistent compilation cache, on by default in `cache_dir() / "xla"`, so a
rerun (and every host that keeps its cache folder) loads the scorer's programs instead of compiling
them again. `enable_compile_cache(setting)` turns it on, moves it or turns it off ("off");
`compile_cache(setting)` does the same for a block of code and then puts back what was set before.
The programs are kept in a subfolder named after the CPU (its architecture and instruction-set flags):
XLA:CPU builds for the host's instruction set and its cache keys do not name it, so a folder shared
by unlike machines (a home folder on NFS) never hands one machine a program built for another.
A compilation cache runs what it holds: it must be writable only by people you trust (a local folder
writable by every user is refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vitnt_jax.errors import UserError

CACHE_ENV = "VITNT_JAX_CACHE"
OFF = "off"  # the setting that turns the compilation cache off
# A program is written when it took at least this long to compile. JAX's own default (1 s) skips the
# scorer of small models on a CPU (the `testing` model's compiles in about 1 s on a 2-core container);
# 0 would also write every eager operation (about 70 tiny files while the `testing` weights are made),
# each of which compiles in milliseconds, so loading it saves nothing. Set
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS to choose another threshold.
MIN_COMPILE_TIME_S = 0.1
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"

logger = logging.getLogger(__name__)


class CompileCacheError(UserError):
    """The compilation cache folder named by the user cannot be used (one sentence naming it and the fix)."""


def cache_dir() -> Path:
    """Returns the folder converted named models and MTCNN weights are cached in (read at each call)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vitnt_jax")


def cpu_tag() -> str:
    """Returns a short name for this machine's CPU kind (architecture + instruction-set flags), stable across runs."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{digest}"


def _is_url(text: str) -> bool:
    """Whether a cache folder is remote (gs://...); a file:// URL names a local folder (vitnt_jax.storage's rules)."""
    return _local(text) is None


def _local(text: str) -> str | None:
    from vitnt_jax.storage import StorageError, local_path

    try:
        return local_path(text)
    except StorageError as error:  # file://host/x: only local files are file:// URLs
        raise CompileCacheError("{compile_cache} " + str(error), field="compile_cache") from error


def compile_cache_dir(setting: str | os.PathLike | None = None) -> str | None:
    """Returns the folder compiled programs go in for a setting: None = `cache_dir()/xla`, "off" = no cache.

    A folder (or a URL such as gs://bucket/xla, which needs the etils[epath] package) holds one
    subfolder per CPU kind (`cpu_tag()`), and so does the default.
    """
    if setting is not None and str(setting) == OFF:
        return None
    base = str(cache_dir() / "xla") if setting is None else os.fspath(setting)
    if not base:
        raise CompileCacheError(
            "{compile_cache} is empty; give a folder, or off to compile without a cache.", field="compile_cache"
        )
    if _is_url(base):
        return base.rstrip("/") + "/" + cpu_tag()
    base = _local(base)
    return str(Path(base).expanduser() / cpu_tag())


def _prepare(folder: str) -> str | None:
    """Creates a local cache folder (only the user may write what it creates); returns why it cannot be used."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        return f"cannot be created ({error.strerror or error})"
    if not path.is_dir():
        return "is not a folder"
    try:
        info = path.stat()
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if info.st_mode & stat.S_IWOTH:  # sticky or not: anyone could plant a program under a key not written yet
        return "is writable by every user, and a compilation cache runs the programs it holds"
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():  # e.g. made in a shared folder by someone else
        return f"belongs to another user (uid {info.st_uid}), and a compilation cache runs the programs it holds"
    try:
        parent = path.parent.stat()
    except OSError:
        parent = None
    if parent is not None and parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        return "lies in a folder every user can write, where anyone may swap it, and a compilation cache runs it"
    try:  # os.access is not enough on read-only mounts and for root: write a probe file
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as error:
        return f"is not writable ({error.strerror or error})"
    return None


def _current() -> tuple[str | None, float, bool]:
    import jax

    return (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_enable_compilation_cache,
    )


def _apply(folder: str | None, min_compile_time_s: float, enabled: bool) -> None:
    """Sets JAX's cache settings; when the folder changes, resets JAX's cache so the next compile uses it.

    Programs compiled already stay compiled (in memory); only the persistent store is switched.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = _current()
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    jax.config.update("jax_enable_compilation_cache", enabled)
    if (before[0], before[2]) != (folder, enabled):
        compilation_cache.reset_cache()


def enable_compile_cache(setting: str | os.PathLike | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on (or off) for this process; returns the folder in use, or None.

    setting: None (the default) = `cache_dir()/xla/<cpu_tag()>`, unless a compilation cache folder is
    configured already (JAX_COMPILATION_CACHE_DIR, or `jax.config` set by the caller or a test
    session), which is then kept as it is, or JAX's cache is turned off (JAX_ENABLE_COMPILATION_CACHE=false);
    a folder or URL = that folder's `<cpu_tag()>` subfolder;
    "off" = no persistent cache.
    The default folder, when it cannot be created or written (a read-only home), logs one warning
    and the run compiles without a cache; a folder the user named raises CompileCacheError instead.
    Safe to call again (same setting: nothing changes) and after JAX has compiled.
    """
    import jax

    if setting is None and not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false
        return None
    if setting is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = compile_cache_dir(setting)
    if folder is None:
        _apply(None, _current()[1], True)
        return None
    if _is_url(folder):
        try:
            import etils.epath  # noqa: F401  (JAX reads non-local cache folders through it)
        except ImportError:
            raise CompileCacheError(
                "{compile_cache} " + f"{setting} is not a local folder, and a compilation cache there needs the "
                "etils[epath] package; install it, or give a local folder.",
                field="compile_cache",
            ) from None
    else:
        problem = _prepare(folder)
        if problem is not None:
            if setting is not None:
                raise CompileCacheError(
                    "{compile_cache} " + f"{folder} {problem}; give a folder only you can write, "
                    "or off to compile without a cache.",
                    field="compile_cache",
                )
            logger.warning("compiling without a cache: the cache folder %s %s", folder, problem)
            return None
    _apply(folder, _current()[1] if os.environ.get(MIN_COMPILE_TIME_ENV) else MIN_COMPILE_TIME_S, True)
    return folder


@contextlib.contextmanager
def compile_cache(setting: str | os.PathLike | None = None) -> Iterator[str | None]:
    """`enable_compile_cache(setting)` for the block; then puts JAX's previous cache settings back."""
    before = _current()
    try:
        yield enable_compile_cache(setting)
    finally:
        if _current() != before:
            _apply(*before)
