"""Where faces come from: the source registry (image folder, path list, insightface .bin, TFDS).

Every source is a random-access sequence: `ids[i]`, `labels[i]` (or None) and `load(i)` -> the
decoded (H, W, 3) uint8 array, raising `ImageError` for an unusable image. Ids are unique.

`SOURCES` declares each kind once: its name (the command-line flag is `--<name>`), what its
location is, its extra options (each a flag of its own), how it opens, and the channel order and
alignment its images hold by default. `add_flags` puts them on a parser and `spec_from_args`
reads them back, so the scorer and every experiment command offer the same sources. A new source
is one `SourceKind` in `SOURCES` (plus its tests):

    SOURCES["webdataset"] = SourceKind("webdataset", "SHARDS", "tar shards ...", open_webdataset)
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import os
import socket
import stat
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitnt_jax import storage
from vitnt_jax.data import IMAGE_SUFFIXES, ImageError, read_file, read_image
from vitnt_jax.errors import UserError
from vitnt_jax.packs import PackError, read_bin

logger = logging.getLogger(__name__)


class SourceError(UserError):
    """A source that cannot be opened; the message names the problem and the fix."""


@dataclass
class Source:
    """A random-access face source. `color`/`align`: what its images hold (None: its kind's default).

    align: 'none' (aligned faces), 'center' (fixed face box) or 'mtcnn' (detect and align).
    """

    name: str
    ids: list[str]
    labels: list[str] | None
    loader: Any  # callable index -> np.ndarray
    color: str | None = None
    align: str | None = None
    problems: list[str] = field(default_factory=list)  # inputs that could not even be listed

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> np.ndarray:
        return self.loader(index)


@dataclass(frozen=True)
class Piece:
    """A run of consecutive inputs of a source, scored and committed as one chunk of a chunked run.

    index: its position among the source's pieces (0, 1, ...). name: what it is, for messages
    ('train.rec keys 1..4096', 'shard train-000003.tar'). size: its number of inputs when known
    before reading it (None: a tar shard, known once read). read(): its inputs as a small Source,
    in order: ids, labels (or None) and load(j); reading the image bytes of this piece only.
    """

    index: int
    name: str
    size: int | None
    read: Callable[[], Source]


@dataclass
class Pieces:
    """A source as consecutive pieces (a chunked run scores and commits one piece at a time).

    with_label: whether its rows have a label column (decided before any piece is read, alike on
    every process). identity: a text naming the plan (the pieces and their sizes) that every process
    of one run computes alike. color/align/problems: as for Source.
    """

    name: str
    with_label: bool
    pieces: list[Piece]
    identity: str
    color: str | None = None
    align: str | None = None
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pieces)


def as_pieces(source: Source, rows: int) -> Pieces:
    """Returns a random-access source cut into pieces of `rows` inputs (the last one may be shorter)."""
    import hashlib

    n = len(source)
    bounds = [(a, min(a + rows, n)) for a in range(0, n, rows)]

    def reader(a: int, b: int) -> Callable[[], Source]:
        def read() -> Source:
            labels = None if source.labels is None else list(source.labels[a:b])
            return Source(source.name, list(source.ids[a:b]), labels, lambda j: source.load(a + j))

        return read

    digest = hashlib.sha256()
    for image_id in source.ids:
        digest.update(image_id.encode("utf-8", "surrogatepass") + b"\0")
    pieces = [Piece(k, f"inputs {a}..{b - 1}", b - a, reader(a, b)) for k, (a, b) in enumerate(bounds)]
    return Pieces(
        source.name,
        source.labels is not None,
        pieces,
        f"{n} inputs in pieces of {rows}, sha256 {digest.hexdigest()}",
        source.color,
        source.align,
        list(source.problems),
    )


def shown(text: str, limit: int = 200) -> str:
    """Returns repr(text), its middle cut when it is longer than `limit` characters (a 10 MB list line)."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit // 2]}...{shown[-limit // 2 :]}"


def _check_unique(ids: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in seen:
            raise SourceError(
                f"{what} lists {shown(x)} twice (entries {seen[x] + 1} and {i + 1}); remove the duplicate."
            )
        seen[x] = i


# The most problems a folder walk reports one by one; the rest are counted in one more line.
MAX_PROBLEMS = 100


def image_folder(root: str | Path) -> Source:
    """Returns every PNG/JPEG/WEBP under `root` (recursive, never following folder links); id = the relative path.

    Ids are sorted; `root` may be a URL prefix (gs://bucket/faces/): see _object_folder. A folder link
    inside `root` is not entered and a sub-folder that cannot be listed is reported in `problems`, not
    skipped silently. A file link keeps its row: its file is read when the link resolves inside `root`,
    and is that row's error when it leads outside. Only regular files are read (a FIFO or a device named
    like an image is an error row at once). The walk keeps its own stack, so no nesting depth is too
    deep, and holds only the ids (tens of bytes a file).
    """
    if _remote(root):
        return _object_folder(root)
    root = Path(storage.local_path(root))
    if not root.is_dir():
        raise SourceError(
            "{images} " + f"{root} is not a folder; pass the folder that holds the face images.", field="images"
        )
    top, inside = os.fspath(root), os.path.realpath(root)
    problems: list[str] = []
    untold = [0]  # problems past MAX_PROBLEMS: counted, not kept (a folder of a million links)

    def note(problem: str) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(problem)
        else:
            untold[0] += 1

    ids: list[str] = []
    links: dict[str, Callable[[], np.ndarray]] = {}  # how each file link is read (they are few)
    folders = [(top, "")]  # (path, id prefix) still to list
    while folders:
        folder, prefix = folders.pop()
        inner, linked = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_folder = entry.is_dir()  # a link to a folder counts as one, and is never entered
                    except OSError:
                        is_folder = False
                    if is_folder:
                        (linked if entry.is_symlink() else inner).append((entry.path, f"{prefix}{entry.name}"))
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        ids.append(prefix + entry.name)
                        if entry.is_symlink():
                            links[ids[-1]] = _link_reader(entry.path, inside)
        except OSError as error:
            note(f"cannot list folder {error.filename} ({error.strerror}); its images are not scored")
        for _, link in sorted(linked):
            note(f"folder link {link} is not followed; its images are not scored (pass its target)")
        folders.extend((path, f"{name}/") for path, name in sorted(inner, reverse=True))  # listed in name order
    if untold[0]:
        problems.append(f"{untold[0]} more folder links or folders that cannot be listed; their images are not scored")
    ids.sort()
    if not ids:
        extra = f" ({problems[0]})" if problems else ""
        raise SourceError(
            f"no PNG, JPEG or WEBP files under {root}{extra}; point " + "{images} at a folder of face images.",
            field="images",
        )

    def load(i: int) -> np.ndarray:
        link = links.get(ids[i])
        # Not a link when listed: read without following one (a file swapped for a link since is refused).
        return link() if link is not None else read_file(os.path.join(top, ids[i]), follow_links=False)

    return Source(f"folder {root}", ids, None, load, problems=problems)


def _remote(location) -> bool:
    """Returns whether `location` is a URL read through object storage (a file:// URL is a local path)."""
    return storage.is_url(location) and storage.protocol(location) != "file"


def _object_folder(root: str) -> Source:
    """Returns every PNG/JPEG/WEBP object under the prefix `root` (any depth); id = the key relative to it.

    One listing (fsspec's find), no object read; an object is read when its row is scored.
    """
    try:
        found = storage.find_names(root)
    except storage.StorageError as error:
        raise SourceError("cannot list {images} " + f"{root}: {error}", field="images") from error
    ids = [name for name in found if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    del found
    if not ids:
        raise SourceError(
            f"no PNG, JPEG or WEBP objects under {root}; point " + "{images} at a prefix of face images.",
            field="images",
        )
    prefix = root.rstrip("/") + "/"
    return Source(f"folder {root}", ids, None, lambda i: read_image(prefix + ids[i]))


def _link_reader(path: str, inside: str) -> Callable[[], np.ndarray]:
    """Returns how to read a listed file link: its target when it lies inside `inside`, else that row's error."""
    target = os.path.realpath(path)
    try:
        outside = os.path.commonpath([inside, target]) != inside
    except ValueError:  # another drive (Windows)
        outside = True
    if outside:
        return functools.partial(_refuse, "is a link to a file outside the folder, not read (copy the file in)")
    return functools.partial(read_file, target, follow_links=False)


def _refuse(reason: str) -> np.ndarray:
    raise ImageError(reason)


def path_list(list_file: str | Path, root: str | Path | None = None) -> Source:
    """Returns the images named one per line in `list_file` (the authors' image_path_list.txt).

    id = the line as written, without its line end: lines end at LF only (a CR before it is dropped, for
    files written on Windows), so a name may hold any other character (form feed, U+2028, NEL, ...).
    The path is `root / line` when root is given. Empty lines (and lines of spaces and tabs only) are
    skipped. Listed links are followed (the list is the user's own choice); only regular files are read.
    The list itself may be a file or a pipe (`--list <(find ...)`), never a device. It is UTF-8 text; a
    name that is not UTF-8 keeps its bytes (surrogate-escaped, as `os.walk` gives them) and reads as named.
    A list holding a NUL byte (a binary file, UTF-16 text) is refused: no file name holds one.
    """
    list_file = list_file if _remote(list_file) else Path(storage.local_path(list_file))
    ids = _list_lines(list_file)
    if not ids:
        raise SourceError("{list} " + f"{list_file} names no images; write one image path per line.", field="list")
    _check_unique(ids, f"list {list_file}")
    base = os.fspath(root) if root is not None else None
    if base is not None and not _remote(base):
        base = storage.local_path(base)
    try:
        is_folder = base is None or storage.is_folder(base)
    except storage.StorageError as error:
        raise SourceError("{root} " + f"{base}: {error}", field="root") from error
    if not is_folder:
        raise SourceError(
            "{root} " + f"{base} is not a folder; pass the folder the listed paths are relative to.", field="root"
        )

    def path(i: int) -> str:
        # Each path is made when it is read: a Path object per line cost hundreds of bytes on lists of millions.
        # A line that is itself a URL is read as written; else it is relative to root (a folder or a URL prefix).
        name = ids[i]
        if base is None or storage.is_url(name):
            return name
        return storage.join(base, name) if storage.is_url(base) else os.path.join(base, name)

    return Source(f"list {list_file}", ids, None, lambda i: read_image(path(i)))


_LIST_READ = 1 << 20  # a list is read in blocks of this many bytes, each checked for NUL bytes first


def _list_lines(list_file: Path) -> list[str]:
    """Returns the names a list file or pipe holds (see path_list); raises SourceError for a folder, a device or a
    binary file. Read and split block by block: memory holds the names and one block, not the whole text too.
    """

    def refuse(why: str) -> SourceError:
        return SourceError("{list} " + f"{list_file} {why}", field="list")

    # A byte-order mark is no part of the first path. A name that is not UTF-8 (a list written by `find`) keeps
    # its bytes, surrogate-escaped as os.walk does.
    text = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
    names: list[str] = []
    rest, lines = "", 0

    def add(chunk: str) -> str:
        *complete, tail = (rest + chunk).split("\n")  # lines end at LF only
        for line in complete:
            line = line.removesuffix("\r")
            if line.strip(" \t"):
                names.append(line)
        return tail

    try:
        if _remote(list_file):
            opened = storage.open_read(list_file)
        else:
            mode = os.stat(list_file).st_mode
            if stat.S_ISDIR(mode):
                raise refuse("is a folder; pass a text file, one image path per line.")
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
                raise refuse(
                    "is not a file or a pipe (a device or a socket); pass a text file, one image path per line."
                )
            # Opened non-blocking so a pipe nobody writes to reads as empty instead of waiting forever.
            fd = os.open(list_file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            os.set_blocking(fd, True)
            opened = open(fd, "rb")
        with opened as f:
            first = True
            while block := f.read(_LIST_READ):
                if b"\0" in block:  # refused at the first such block: a 10 GB archive given as a list is not read
                    line = lines + block[: block.index(b"\0")].count(b"\n") + 1
                    utf16 = first and block[:2] in (b"\xff\xfe", b"\xfe\xff")
                    kind = "UTF-16 text" if utf16 else "a binary file or UTF-16 text"
                    raise refuse(f"holds a NUL byte (line {line}): it is {kind}; save it as UTF-8 text.")
                lines += block.count(b"\n")
                rest = add(text.decode(block))
                first = False
    except storage.StorageError as error:
        if error.kind == "missing":
            raise refuse("does not exist; check the path.") from error
        if error.kind == "folder":
            raise refuse("is a folder; pass a text file, one image path per line.") from error
        raise SourceError("cannot read {list} " + f"{list_file}: {error}", field="list") from error
    except FileNotFoundError as error:
        raise refuse("does not exist; check the path.") from error
    except OSError as error:
        raise SourceError(
            "cannot read {list} " + f"{list_file} ({error.strerror or error}); it must be UTF-8 text, one path a line.",
            field="list",
        ) from error
    add(text.decode(b"", final=True) + "\n")
    return names


def insightface_bin(path: str | Path) -> Source:
    """Returns the images of an insightface verification pack (`lfw.bin`, `agedb_30.bin`, ...).

    Read by `vitnt_jax.packs.read_bin` (restricted: a crafted file cannot run code).
    id = the image's position in the pack; label = its pair's issame flag (1 or 0), when the pack
    holds one flag per pair.
    """
    try:
        pack = read_bin(path)
    except PackError as error:
        raise SourceError(error.template, field=error.field) from error
    labels = None if pack.issame is None else [str(int(pack.issame[i // 2])) for i in range(len(pack.images))]
    blobs = pack.images
    return Source(f"pack {path}", [str(i) for i in range(len(blobs))], labels, lambda i: read_image(blobs[i]))


def tfds_source(
    spec: str,
    data_dir: str | None = None,
    image_key: str = "image",
    id_key: str | None = None,
    label_key: str | None = "label",
    prepare: bool = True,
) -> Source:
    """Returns a TFDS dataset read through `tfds.data_source` (ArrayRecord; no TensorFlow).

    spec: NAME or NAME:SPLIT (default split 'train'). id = the example's `id_key` feature, or
    NAME/SPLIT/INDEX. label = the `label_key` feature when the dataset has it. A dataset that is
    not prepared yet is downloaded and prepared in ArrayRecord format first.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise SourceError("{tfds} needs tensorflow-datasets: pip install 'vitnt-jax[tfds]'.", field="tfds") from error
    name, _, split = spec.partition(":")
    split = split or "train"
    try:  # a malformed split is said so, before it can pass for a dataset that is not prepared yet
        tfds.core.ReadInstruction.from_spec(split)
    except ValueError as error:
        raise SourceError(
            f"TFDS split {split!r} is not one TFDS reads ({str(error).splitlines()[0]}); write NAME:SPLIT, e.g. "
            f"{name}:train, {name}:test[:100] or {name}:train[:10%]+test.",
            field="tfds",
        ) from error
    with _quiet("absl"):  # TFDS's warnings about a folder it looked in: the outcome is said in one sentence
        return _tfds_source(tfds, name, split, data_dir, image_key, id_key, label_key, prepare)


def _tfds_source(tfds, name, split, data_dir, image_key, id_key, label_key, prepare) -> Source:
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError as error:
        raise SourceError(f"TFDS has no dataset {name!r}; check the name (tfds.list_builders()).") from error
    except Exception as first:  # not prepared yet (or prepared as TFRecord), or no such split
        splits = _known_splits(tfds, name, data_dir)
        if splits and any(part.split("[")[0].strip() not in splits for part in split.split("+")):
            raise SourceError(
                f"TFDS {name} has no split {split!r}; choose one of {', '.join(sorted(splits))}."
            ) from first
        if not prepare:
            raise SourceError(
                f"TFDS dataset {name} is not prepared in {data_dir or 'the default data dir'}."
            ) from first
        data = _prepare_and_open(tfds, name, split, data_dir)
    n = len(data)
    if n == 0:
        raise SourceError(f"TFDS {name}:{split} holds no examples.")
    data = _encoded_images(tfds, data, name, split, data_dir, image_key)
    try:
        first_example = data[0]
    except Exception as error:
        raise SourceError(f"TFDS {name}:{split} cannot be read ({type(error).__name__}: {error}).") from error
    for key, option in ((image_key, "image_key"), (id_key, "id_key")):
        if key is not None and key not in first_example:
            raise SourceError(
                f"TFDS {name} has no feature {key!r}; pass " + "{" + option + "}" + f" one of {sorted(first_example)}.",
                field=option,
            )
    has_label = label_key is not None and label_key in first_example

    def text(value) -> str:
        # Bytes that are not UTF-8 keep their identity (surrogate-escaped, as file names): two such ids never merge.
        value = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        return str(value.item() if isinstance(value, np.generic) else value)

    # Reading ids and labels touches every record once, one at a time; images are decoded only when loaded.
    ids = [f"{name}/{split}/{i}" for i in range(n)] if id_key is None else []
    labels: list[str] | None = [] if has_label else None
    if id_key is not None or has_label:
        for i in range(n):
            example = data[i]
            if id_key is not None:
                ids.append(text(example[id_key]))
            if labels is not None:
                labels.append(text(example[label_key]))
        del example
    _check_unique(ids, f"TFDS {name}:{split} ({id_key})")

    def load(i: int) -> np.ndarray:
        try:
            value = data[i][image_key]
        except Exception as error:  # a damaged record
            raise ImageError(f"unreadable record ({type(error).__name__}: {error})") from error
        if isinstance(value, bytes):
            return read_image(value)
        return np.asarray(value)

    # LFW holds unaligned 250x250 photos: detect and align the face (an explicit alignment overrides it).
    return Source(f"tfds {name}:{split}", ids, labels, load, align="mtcnn" if name == "lfw" else None)


def _encoded_images(tfds, data, name: str, split: str, data_dir: str | None, image_key: str):
    """Returns the data source with `image_key` left encoded when it is a TFDS Image, else `data` itself.

    read_image then decodes it (PNG and JPEG only, every failure one error row), instead of TFDS's own
    decoding, which opens any format PIL knows; reading ids and labels also decodes no image.
    """
    try:
        encoded = isinstance(data.dataset_info.features[image_key], tfds.features.Image)
    except Exception:  # no such feature (reported below) or no metadata: decoded as TFDS decodes it
        return data
    if not encoded:
        return data
    skip = {image_key: tfds.decode.SkipDecoding()}
    try:
        raw = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=skip)
        raw[0]
    except ModuleNotFoundError:  # TFDS's mock data (tfds.testing) needs TensorFlow to hand encoded images over
        return data
    except Exception:  # a damaged first record: the caller reads it again and says so
        pass
    return raw


def _known_splits(tfds, name: str, data_dir: str | None) -> list[str]:
    try:
        return list(tfds.builder(name, data_dir=data_dir).info.splits)
    except Exception:  # no metadata yet: the dataset is simply not prepared
        return []


# How long the network probe before a TFDS download waits for a connection to the download host.
PROBE_TIMEOUT_S = 5.0


def probe(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Returns None when a TCP connection to host:port opens within about timeout_s, else why it did not.

    The name lookup has no timeout of its own, so the attempt runs on a daemon thread that is waited for
    a bounded time. Tests replace this function: they never reach the network.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(str(error) or type(error).__name__)

    thread = threading.Thread(target=attempt, name=f"probe {host}", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def _download_host(builder) -> tuple[str, int] | None:
    """Returns the (host, port) a TFDS download reaches first (the https proxy, when one is set), or None."""
    try:
        urls = list(builder.url_infos or ())
    except Exception:  # a dataset without registered checksums: nothing to probe
        return None
    if not urls:
        return None
    target = urllib.parse.urlsplit(urls[0])
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not target.hostname:
        return None
    return target.hostname, target.port or (443 if target.scheme == "https" else 80)


def _offline(name: str, data_dir: str | None, why: str) -> SourceError:
    where = data_dir or "the default TFDS data dir"
    return SourceError(
        f"TFDS dataset {name} is not prepared in {where} and the network is unreachable ({why}); prepare it on "
        f"a machine with network access (`tfds build {name} --file_format=array_record --data_dir DIR`), copy "
        "DIR here and pass {data_dir} DIR.",
        field="data_dir",
    )


def _prepare_and_open(tfds, name, split, data_dir):
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:
        raise SourceError(f"preparing TFDS {name} failed ({type(error).__name__}: {error}).") from error
    host = _download_host(builder)
    if host is not None:  # fail in seconds, not after minutes of download retries
        why = probe(*host)
        if why is not None:
            raise _offline(name, data_dir, f"{host[0]}: {why}")
    logger.info("TFDS %s is not prepared in ArrayRecord format; preparing it (this downloads it)...", name)
    try:
        with _quiet("urllib3"):  # no warning per retry: a failure is one sentence
            builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as error:
        if "tensorflow" in str(error):
            raise SourceError(
                f"preparing TFDS {name} needs TensorFlow (pip install tensorflow), or prepare it elsewhere with "
                f"`tfds build {name} --file_format=array_record` and pass " + "{data_dir}.",
                field="data_dir",
            ) from error
        raise SourceError(f"preparing TFDS {name} failed ({error}).") from error
    except Exception as error:
        detail = str(error).splitlines()[0] if str(error) else ""
        raise SourceError(
            f"preparing TFDS {name} failed ({type(error).__name__}: {detail}); "
            "check the network, or prepare it elsewhere and pass {data_dir}.",
            field="data_dir",
        ) from error
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:
        raise SourceError(
            f"TFDS {name}:{split} cannot be read after preparing ({str(error).splitlines()[0]}); it may be prepared "
            f"as TFRecord: rebuild it with `tfds build {name} --file_format=array_record`."
        ) from error


@contextlib.contextmanager
def _quiet(name: str):
    """Keeps the warnings of logger `name` out of the output for a while; its level is restored after."""
    chatty = logging.getLogger(name)
    level = chatty.level
    chatty.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        chatty.setLevel(level)


# ---------------------------------------------------------------------------------------------- the registry


def location(text: str) -> str | Path:
    """Returns a location given on a command line: a URL (`gs://...`, `s3://...`, `file://...`) as is, else a Path."""
    from vitnt_jax.storage import is_url

    return text if is_url(text) else Path(text)


@dataclass(frozen=True)
class Option:
    """An extra setting of a source kind: a keyword of its opener and a flag `--<name with dashes>`."""

    name: str
    help: str
    metavar: str | None = None
    type: Callable[[str], Any] = str


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: `open(location, **options)` returns its Source.

    name: the flag is `--<name>`, and the location its value (metavar/help describe it).
    color/align: what its images hold unless the opened Source says otherwise (see Source).
    """

    name: str
    metavar: str
    help: str
    open: Callable[..., Source]
    options: tuple[Option, ...] = ()
    location_type: Callable[[str], Any] = location
    color: str = "rgb"
    align: str = "none"
    chunked: bool = False  # open(location, piece_rows=N, **options) returns Pieces (scored in chunked runs only)


def _open_rec(location, **options) -> Pieces:
    from vitnt_jax.recordio import open_rec  # these modules build on this one: imported when used

    return open_rec(location, **options)


def _open_wds(location, **options) -> Pieces:
    from vitnt_jax.wds import open_wds

    return open_wds(location, **options)


def _open_parquet(location, **options) -> Pieces:
    from vitnt_jax.parquet import open_parquet

    return open_parquet(location, **options)


SOURCES: dict[str, SourceKind] = {
    kind.name: kind
    for kind in (
        SourceKind(
            "images",
            "DIR",
            "folder (or URL prefix) of PNG/JPEG/WEBP faces, searched recursively; id = the relative path",
            image_folder,
        ),
        SourceKind(
            "list",
            "FILE",
            "text file, one image path per line (the authors' image_path_list.txt); id = the line",
            path_list,
            (Option("root", "with --list: folder the listed paths are relative to", "DIR", location),),
        ),
        SourceKind(
            "bin",
            "FILE",
            "insightface verification pack (lfw.bin, ...); id = the position, label = the pair's issame flag",
            insightface_bin,
        ),
        SourceKind(
            "tfds",
            "NAME[:SPLIT]",
            "TFDS dataset read with tfds.data_source, e.g. lfw (id = NAME/SPLIT/INDEX)",
            tfds_source,
            (
                Option("data_dir", "with --tfds: TFDS data directory (default: TFDS's own)", "DIR"),
                Option("image_key", "with --tfds: image feature (default: image)"),
                Option("id_key", "with --tfds: feature used as id (default: NAME/SPLIT/INDEX)"),
                Option("label_key", "with --tfds: feature written to the label column when present (default: label)"),
            ),
            location_type=str,
        ),
        SourceKind(
            "rec",
            "FILE.rec",
            "insightface/MXNet RecordIO (train.rec, its .idx beside it), read without MXNet; id = the record's key, "
            "label = its header's label",
            _open_rec,
            location_type=str,
            chunked=True,
        ),
        SourceKind(
            "wds",
            "PATTERN",
            "WebDataset tar shards, brace patterns such as 'train-{000000..000999}.tar'; id = the sample's __key__, "
            "label = its cls member",
            _open_wds,
            location_type=str,
            chunked=True,
        ),
        SourceKind(
            "parquet",
            "PATTERN",
            "Parquet files (a file or a glob) with an image-bytes column, as Hugging Face datasets write them",
            _open_parquet,
            (
                Option("image_column", "with --parquet: the image column, binary or {bytes, path} (default: image)"),
                Option("id_column", "with --parquet: the id column (default: id when present, else FILE:ROW)"),
                Option("label_column", "with --parquet: the label column (default: label when present)"),
            ),
            location_type=str,
            chunked=True,
        ),
    )
}


@dataclass(frozen=True)
class SourceSpec:
    """What to open: a kind of `SOURCES`, its location and its options (name, value) pairs."""

    kind: str
    location: Any
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in SOURCES:
            raise SourceError(f"unknown source kind {self.kind!r}; choose one of {', '.join(SOURCES)}.")
        allowed = {o.name for o in SOURCES[self.kind].options}
        for name, _ in self.options:
            if name not in allowed:
                owner = next((k.name for k in SOURCES.values() if name in {o.name for o in k.options}), None)
                where = f"only applies to the {owner} source" if owner else "is no source option"
                raise SourceError("{" + name + "} " + f"{where}; drop it or use that source.", field=name)

    @property
    def chunked(self) -> bool:
        """Whether this kind is read piece by piece only (its runs are always chunked)."""
        return SOURCES[self.kind].chunked

    def open(self) -> Source:
        """Returns the opened Source, its color and align filled in from its kind where it left them open."""
        kind = SOURCES[self.kind]
        if kind.chunked:
            raise SourceError(
                "{" + kind.name + "} is read piece by piece: score it with a chunked run (pipeline.run does).",
                field=kind.name,
            )
        source = kind.open(self.location, **dict(self.options))
        source.color = source.color or kind.color
        source.align = source.align or kind.align
        return source

    def open_pieces(self, rows: int) -> Pieces:
        """Returns the source as Pieces of about `rows` inputs each (a tar shard is one piece whatever its size)."""
        kind = SOURCES[self.kind]
        if kind.chunked:
            pieces = kind.open(self.location, piece_rows=rows, **dict(self.options))
        else:
            pieces = as_pieces(self.open(), rows)
        pieces.color = pieces.color or kind.color
        pieces.align = pieces.align or kind.align
        return pieces


def flag(name: str) -> str:
    """Returns the command-line flag of a source kind or option name: `data_dir` -> `--data-dir`."""
    return "--" + name.replace("_", "-")


def flag_names(kinds: Sequence[str] | None = None) -> dict[str, str]:
    """Returns {python name: flag} for the kinds and their options (to render SourceError messages)."""
    out = {}
    for kind in (SOURCES[k] for k in (kinds or SOURCES)):
        out[kind.name] = flag(kind.name)
        out.update({o.name: flag(o.name) for o in kind.options})
    return out


def add_flags(parser, kinds: Sequence[str] | None = None, *, title: str = "source (exactly one)") -> None:
    """Adds one flag per source kind (exactly one required) and one per option to an argparse parser."""
    group = parser.add_argument_group(title)
    one = group.add_mutually_exclusive_group(required=True)
    for kind in (SOURCES[k] for k in (kinds or SOURCES)):
        one.add_argument(flag(kind.name), type=kind.location_type, metavar=kind.metavar, help=kind.help)
    for kind in (SOURCES[k] for k in (kinds or SOURCES)):
        for option in kind.options:
            group.add_argument(flag(option.name), type=option.type, metavar=option.metavar, help=option.help)


def spec_from_args(args, kinds: Sequence[str] | None = None) -> SourceSpec:
    """Returns the SourceSpec of parsed `add_flags` flags; raises SourceError for an option of another kind."""
    names = list(kinds or SOURCES)
    kind = next(k for k in names if getattr(args, k, None) is not None)
    given = {o.name: getattr(args, o.name) for k in names for o in SOURCES[k].options}
    return SourceSpec(kind, getattr(args, kind), tuple((k, v) for k, v in given.items() if v is not None))


def open_source(spec: SourceSpec | Mapping[str, Any]) -> Source:
    """Returns the Source of a spec (or of a mapping with `kind`, `location` and options)."""
    if not isinstance(spec, SourceSpec):
        spec = dict(spec)
        spec = SourceSpec(spec.pop("kind"), spec.pop("location"), tuple(spec.items()))
    return spec.open()
