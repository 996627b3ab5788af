"""Chunked runs: a source scored piece by piece, each piece's rows committed as whole immutable objects.

The layout beside the result `OUT` (a local path or a URL such as `gs://bucket/run/scores.csv`)::

    OUT.chunks/plan.json                        the settings, the source's plan and the piece size
    OUT.chunks/process-00001-of-00004.json      each process's own record of the same (multi-process runs)
    OUT.chunks/00000012-r4096.embedding.npy     piece 12's arrays (with --save-embeddings), written first
    OUT.chunks/00000012-r4096.csv               piece 12's table: written last, it commits the piece
    OUT.chunks/merged.json                      written once OUT and its arrays are whole

A source is cut into pieces (`vitnt_jax.sources.Pieces`): `piece_rows` inputs each (a WebDataset shard
is one piece). Process k of P scores the pieces [k*n//P, (k+1)*n//P) that have no table chunk yet; each
piece starts a new batch, so a piece's rows do not depend on how many processes share the run. A piece
is committed by writing its arrays and then its table, each a whole object (object stores make an
object visible only when it is complete; a local chunk is written beside its name and renamed), so a
crash loses at most the piece in flight, and `--resume` lists the committed pieces (the manifest is
the chunk folder's listing plus plan.json: memory grows with the number of pieces, never with the
number of rows or ids). Process 0 merges once every process has reported: it streams the chunks in
piece order into `OUT` (one object, byte for byte what a single-file run writes) and each array file,
then writes merged.json and removes the chunks. Nothing is shared between the processes but the
output location (and the coordinator's address for the end-of-run report).

What is in the folder is not trusted: a chunk name that is not a regular file (a folder, a link), two table
chunks of one piece, a table chunk holding other than the rows its name claims (or cut short), an array
chunk damaged or of another size, a record that is not ours, and a process record of other settings are
refused (ChunkError) before anything is merged into them; no chunk is read past what its rows can take.
A merge that fails writes neither `OUT` nor any array file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitnt_jax import fingerprint, storage
from vitnt_jax.errors import UserError
from vitnt_jax.output import FORMATS, Row, lock_output, render_row

logger = logging.getLogger(__name__)

DEFAULT_PIECE_ROWS = 4096
PLAN = "plan.json"
MERGED = "merged.json"
RECORD_FORMAT = "vitnt-jax-chunks"
VERSION = 1
# Beyond the method's settings (fingerprint.KEYS), a chunked run's rows depend on these: the source's plan and
# its piece size decide which rows each chunk holds, the format and label column what a chunk looks like.
PLAN_KEYS = ("inputs", "piece_rows", "format", "with_label", "arrays")
TABLE_SUFFIX = {"csv": ".csv", "reference": ".txt", "parquet": ".parquet"}
ARRAY_NAMES = ("embedding", "patch_quality")
_CHUNK = re.compile(r"^(\d{8,})-r(\d+)(\.embedding\.npy|\.patch_quality\.npy|\.csv|\.txt|\.parquet)$")


class ChunkError(UserError):
    """A chunked result that cannot be continued or merged as asked; the message names the fix."""


def chunks_dir(out: str | os.PathLike) -> str:
    """Returns the folder (or URL prefix) holding the chunks of the result `out`: `<out>.chunks`."""
    return os.fspath(out) + ".chunks"


def chunk_name(index: int, rows: int, suffix: str) -> str:
    """Returns the name of piece `index`'s chunk of `rows` rows: '<index, 8+ digits>-r<rows><suffix>'."""
    return f"{index:08d}-r{rows}{suffix}"


def _entries(folder: str) -> list[tuple[str, bool]]:
    """Returns (name, is a regular file) of every entry in `folder`, one listing; a URL's entries count as files."""
    local = storage.local_path(folder)
    if local is None:
        return [(name, True) for name in storage.listdir(folder)]
    try:
        with os.scandir(local) as listed:
            return sorted((e.name, e.is_file(follow_symlinks=False)) for e in listed)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:
        raise ChunkError(
            f"cannot list {folder} ({error.strerror or error}); make it readable, or choose another " + "{out}.",
            field="out",
        ) from error


def committed(folder: str, fmt: str) -> dict[int, int]:
    """Returns {piece index: rows} of every piece whose table chunk of format `fmt` is in `folder`.

    One listing of the folder. ChunkError for a chunk name that is not a regular file (a folder, a symbolic
    link: never read or written through) or for two table chunks of one piece (another run's, planted).
    """
    suffix = TABLE_SUFFIX[fmt]
    found: dict[int, int] = {}
    for name, regular in _entries(folder):
        match = _CHUNK.match(name)
        if not match:
            continue
        if not regular:
            raise ChunkError(
                f"{storage.join(folder, name)} is not a regular file (a folder or a symbolic link), so it is no "
                "chunk of this run; remove it, or replace the result with {overwrite}.",
                field="overwrite",
            )
        if match.group(3) != suffix:
            continue
        index = int(match.group(1))
        if index in found:
            raise ChunkError(
                f"{folder} holds two table chunks of piece {index} ({chunk_name(index, found[index], suffix)} and "
                f"{name}), so one is not of this run; replace the result with " + "{overwrite}.",
                field="overwrite",
            )
        found[index] = int(match.group(2))
    return found


# ----------------------------------------------------------------------------------------------- records


def _record_text(settings: dict[str, Any], pieces: int) -> bytes:
    record = {"format": RECORD_FORMAT, "version": VERSION, "pieces": pieces, "settings": settings}
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_record(path: str) -> dict[str, Any] | None:
    """Returns the settings a plan or process record holds, None when there is none; ChunkError for a foreign file."""
    try:
        with storage.open_read(path) as f:
            data = f.read(fingerprint.MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ChunkError(
            f"cannot read {path} ({getattr(error, 'strerror', None) or error}); it records how "
            + "{out} was scored: replace the result with {overwrite}.",
            field="out",
            also=("overwrite",),
        ) from error
    try:
        record = json.loads(data.decode("utf-8"))
        ok = isinstance(record, dict) and record.get("format") == RECORD_FORMAT
        ok = ok and record.get("version") == VERSION and isinstance(record.get("settings"), dict)
    except (ValueError, RecursionError):
        ok = False
    if not ok or len(data) > fingerprint.MAX_BYTES:
        raise ChunkError(
            f"{path} is not a chunk record of this version of vitnt-jax; replace the result with "
            + "{overwrite} or choose another {out}.",
            field="out",
            also=("overwrite",),
        )
    return record["settings"]


def _shown(key: str, value: Any) -> str:
    text = value.get("weights", value) if key == "model" and isinstance(value, dict) else value
    if key == "arrays" and isinstance(value, dict):  # {'embedding': [512]}: 'embedding (512)', or 'none'
        text = ", ".join(f"{k} ({'x'.join(map(str, v)) if isinstance(v, list) else v})" for k, v in value.items())
        text = text or "none"
    return str(text)[:120].replace("{", "(").replace("}", ")")


def refuse_other_settings(where: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Raises ChunkError naming every setting (or plan part) in which `new` differs from the recorded `old`."""
    changed = fingerprint.differences(old, new, (*fingerprint.KEYS, *PLAN_KEYS))
    if not changed:
        return
    named = [k for k in changed if k in fingerprint.KEYS]
    listed = "; ".join(
        ("{" + k + "} " if k in fingerprint.KEYS else f"{k.replace('_', ' ')} ")
        + f"{_shown(k, old.get(k))} -> {_shown(k, new.get(k))}"
        for k in changed
    )
    raise ChunkError(
        f"{where} was scored with other settings or another source ({listed}); resume it with the old settings "
        "and source, choose a new {out}, or replace it with {overwrite}.",
        field="out",
        also=(*named, "overwrite"),
    )


# ----------------------------------------------------------------------------------------------- chunks


@dataclass
class Collector:
    """A writer for `pipeline.score_source` that keeps one piece's rows and array rows in memory."""

    shapes: dict[str, tuple[int, ...]]
    path: str = ""

    def __post_init__(self):
        self.rows: list[Row] = []
        self.arrays: dict[str, list[np.ndarray]] = {k: [] for k in self.shapes}
        self.done_ids: list[str] = []
        self.sinks = {k: _Shape(s) for k, s in self.shapes.items()}

    def write(self, rows, arrays=None) -> None:
        self.rows.extend(rows)
        for key in self.shapes:
            self.arrays[key].append(np.asarray(arrays[key], np.float32))

    def stacked(self, key: str) -> np.ndarray:
        parts = self.arrays[key]
        return np.concatenate(parts) if parts else np.zeros((0, *self.shapes[key]), np.float32)


@dataclass
class _Shape:
    row_shape: tuple[int, ...]


def table_bytes(rows: list[Row], fmt: str, with_label: bool) -> bytes:
    """Returns a whole table chunk: the header (csv) and the rows, rendered as a single-file result writes them."""
    rendered = [render_row(r) for r in rows]
    if fmt == "parquet":
        from vitnt_jax import parquet

        buffer = io.BytesIO()
        parquet.write_rows(buffer, rendered, with_label)
        return buffer.getvalue()
    form = FORMATS[fmt]
    for r in rendered:
        form.check_id(r.id)
    text = io.StringIO(newline="")
    text.write(form.header(with_label))
    form.write_rows(text, rendered, with_label)
    return text.getvalue().encode("utf-8", "surrogatepass")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, np.float32))
    return buffer.getvalue()


def commit(folder: str, index: int, collector: Collector, fmt: str, with_label: bool) -> None:
    """Writes piece `index`'s arrays, then its table (the commit): each a whole object."""
    rows = len(collector.rows)
    for key in collector.shapes:
        array = collector.stacked(key)
        if len(array) != rows:
            raise RuntimeError(f"piece {index} has {rows} rows but {len(array)} {key} rows")
        storage.write_bytes(storage.join(folder, chunk_name(index, rows, f".{key}.npy")), _npy_bytes(array))
    storage.write_bytes(
        storage.join(folder, chunk_name(index, rows, TABLE_SUFFIX[fmt])), table_bytes(collector.rows, fmt, with_label)
    )


# ----------------------------------------------------------------------------------------------- merging


def _npy_data(blob: bytes, what: str, shape: tuple[int, ...]) -> memoryview:
    """Returns the data of the float32 .npy chunk `blob` of `shape`; ChunkError naming `what` for any other."""
    stream = io.BytesIO(blob)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(stream)
        found, fortran, dtype = read_header[version](stream)
    except Exception:  # numpy raises ValueError, SyntaxError or TokenError for a damaged header; KeyError: a version
        raise ChunkError(
            f"{what} is not a .npy chunk of this tool (a damaged header); replace the result with " + "{overwrite}.",
            field="overwrite",
        ) from None
    if fortran or dtype != np.dtype(np.float32):
        raise ChunkError(
            f"{what} is not a float32 array chunk of this tool; replace the result with " + "{overwrite}.",
            field="overwrite",
        )
    if tuple(found) != shape:
        raise ChunkError(
            f"{what} holds an array of shape {tuple(found)}, not {shape}; replace the result with " + "{overwrite}.",
            field="overwrite",
        )
    data = memoryview(blob)[stream.tell() :]
    if len(data) != int(np.prod(shape)) * 4:
        raise ChunkError(
            f"{what} holds {len(data)} bytes of data, not the {int(np.prod(shape)) * 4} of its shape {shape} (cut "
            "short or padded); replace the result with {overwrite}.",
            field="overwrite",
        )
    return data


# The most a table chunk's row may take (an id, a label, an error): a larger chunk is not read (memory stays bounded).
MAX_ROW_BYTES = 64 << 10


def _chunk_bytes(name: str, what: str, limit: int) -> bytes:
    """Returns the whole chunk `name`; ChunkError naming it when it cannot be read (missing, a folder, a failure)
    or holds more than `limit` bytes (read no further)."""
    try:
        with storage.open_read(name) as f:
            blob = f.read(limit + 1)
    except FileNotFoundError:
        raise ChunkError(
            f"{name} is missing ({what}); replace the result with " + "{overwrite}.",
            field="overwrite",
        ) from None
    except OSError as error:
        raise ChunkError(
            f"cannot read the chunk {name} ({getattr(error, 'strerror', None) or error}); fix the storage and rerun "
            "with {resume}, or replace the result with {overwrite}.",
            field="resume",
            also=("overwrite",),
        ) from error
    if len(blob) > limit:
        raise ChunkError(
            f"{name} holds more than the {limit} bytes its rows can take, so it is no chunk of this run; replace the "
            "result with {overwrite}.",
            field="overwrite",
        )
    return blob


def _table_rows(blob: bytes, start: int, fmt: str) -> int:
    """Returns the number of rows in a csv or reference table chunk `blob` whose header ends at `start`."""
    if fmt == "csv" and blob.find(b'"', start) >= 0:  # a quoted cell may hold a line break: count records, not lines
        import csv

        text = blob[start:].decode("utf-8", "surrogatepass")
        return sum(1 for _ in csv.reader(io.StringIO(text, newline="")))
    return blob.count(b"\n", start)


def merge(
    out: str,
    fmt: str,
    with_label: bool,
    pieces: int,
    arrays: dict[str, tuple[str, tuple[int, ...]]],
    *,
    on_piece: Callable[[int], None] | None = None,
    sizes: list[int | None] | None = None,
) -> int:
    """Streams the committed chunks of `out` into `out` and each array file; returns the rows merged.

    Refuses (ChunkError, writing no file whole) when a piece has no table chunk, an array chunk is missing,
    damaged or of another shape, or a table chunk holds other than the rows its name claims (or than
    `sizes[i]`, the piece's inputs where known). Memory holds one chunk at a time. `out` is written last:
    its presence means whole.
    """
    folder = chunks_dir(out)
    done = committed(folder, fmt)
    missing = [i for i in range(pieces) if i not in done]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ChunkError(
            f"{out} cannot be merged: piece{'s' * (len(missing) > 1)} {shown} of {pieces} "
            f"{'are' if len(missing) > 1 else 'is'} not committed in {folder}; rerun with " + "{resume}.",
            field="resume",
        )
    if sizes is not None:
        wrong = next((i for i in range(pieces) if sizes[i] is not None and done[i] != sizes[i]), None)
        if wrong is not None:
            raise ChunkError(
                f"{storage.join(folder, chunk_name(wrong, done[wrong], TABLE_SUFFIX[fmt]))} claims {done[wrong]} "
                f"rows but piece {wrong} has {sizes[wrong]} inputs, so it is not a chunk of this run; replace the "
                "result with {overwrite}.",
                field="overwrite",
            )
    total = sum(done[i] for i in range(pieces))
    try:
        for key, (path, shape) in arrays.items():
            with storage.open_write(path) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(f, {**header, "shape": (total, *shape)})
                for i in range(pieces):
                    name = storage.join(folder, chunk_name(i, done[i], f".{key}.npy"))
                    limit = 4096 + done[i] * 4 * int(np.prod(shape))  # the header and the data, exactly known
                    blob = _chunk_bytes(name, f"piece {i} was committed without its {key} rows", limit)
                    f.write(_npy_data(blob, name, (done[i], *shape)))
                    del blob
        _merge_tables(out, folder, fmt, with_label, pieces, done, total, on_piece)
    except BaseException:  # the array files written go too: the result appears whole, or none of it
        for path, _ in arrays.values():
            with contextlib.suppress(Exception):
                storage.remove(path)
        raise
    return total


def _merge_tables(out, folder, fmt, with_label, pieces, done, total, on_piece) -> None:
    tables = (storage.join(folder, chunk_name(i, done[i], TABLE_SUFFIX[fmt])) for i in range(pieces))
    with storage.open_write(out) as f:
        if fmt == "parquet":
            from vitnt_jax import parquet

            written = parquet.merge(_reported(_counted_parquet(tables, done), on_piece), f, with_label)
            if written != total:  # raised inside the block: `out` is not written
                raise ChunkError(
                    f"the chunks in {folder} hold {written} rows, not the {total} their names claim, so one is not a "
                    "chunk of this run; replace the result with {overwrite}.",
                    field="overwrite",
                )
        else:
            header = FORMATS[fmt].header(with_label).encode("utf-8")
            f.write(header)
            for i, name in enumerate(_reported(tables, on_piece)):
                blob = _chunk_bytes(name, f"piece {i}'s table", len(header) + done[i] * MAX_ROW_BYTES)
                body = memoryview(blob)[len(header) :]
                if not blob.startswith(header) or (body and body[-1:] != b"\n"):
                    raise ChunkError(
                        f"{name} is not a whole table chunk of this run (another header, or cut short); replace the "
                        "result with {overwrite}.",
                        field="overwrite",
                    )
                rows = _table_rows(blob, len(header), fmt)
                if rows != done[i]:
                    raise ChunkError(
                        f"{name} holds {rows} rows, not the {done[i]} its name claims, so it is not a chunk of this "
                        "run; replace the result with {overwrite}.",
                        field="overwrite",
                    )
                f.write(body)
                del blob, body


def _counted_parquet(names: Iterable[str], done: dict[int, int]) -> Iterable[str]:
    """Yields the Parquet table chunks `names` (of pieces 0, 1, ...) once each footer says the rows its name claims."""
    import pyarrow.parquet as pq

    for i, name in enumerate(names):
        try:
            with storage.open_read(name) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except OSError as error:
            raise ChunkError(
                f"cannot read the chunk {name} ({getattr(error, 'strerror', None) or error}); fix the storage and "
                "rerun with {resume}, or replace the result with {overwrite}.",
                field="resume",
                also=("overwrite",),
            ) from error
        except Exception:  # pyarrow's ArrowInvalid and kin: not a Parquet file
            raise ChunkError(
                f"{name} is not a Parquet table chunk of this run; replace the result with " + "{overwrite}.",
                field="overwrite",
            ) from None
        if rows != done[i]:
            raise ChunkError(
                f"{name} holds {rows} rows, not the {done[i]} its name claims, so it is not a chunk of this run; "
                "replace the result with {overwrite}.",
                field="overwrite",
            )
        yield name


def _reported(names: Iterable[str], on_piece) -> Iterable[str]:
    for k, name in enumerate(names):
        yield name
        if on_piece is not None:
            on_piece(k)


# What a local write killed before its rename leaves beside the name (storage.open_write's temporary file).
_LEFT_OVER = re.compile(
    r"^\.(\d{8,}-r\d+\.[a-z_.]+|process-\d+-of-\d+\.json|plan\.json|merged\.json)\.tmp\d+-[0-9a-f]+$"
)


def remove_chunks(folder: str) -> None:
    """Removes every chunk, process record and left-over temporary file in `folder` (after a merge)."""
    for name, regular in _entries(folder):
        if regular and (_CHUNK.match(name) or _LEFT_OVER.match(name) or name.startswith("process-")):
            storage.remove(storage.join(folder, name))


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """What a chunked run's process did: rows scored and failed, rows already committed, seconds, pieces."""

    scored: int
    failed: int
    skipped: int
    seconds: float
    pieces: int


def prefetched(pieces: list, read: Callable[[Any], Any]) -> Iterable[tuple[Any, Any]]:
    """Yields (piece, read(piece)) in order, reading the next piece on a thread while the caller scores one."""
    if not pieces:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="piece-reader") as pool:
        pending = pool.submit(read, pieces[0])
        try:
            for k, piece in enumerate(pieces):
                value = pending.result()
                if k + 1 < len(pieces):
                    pending = pool.submit(read, pieces[k + 1])
                yield piece, value
        finally:
            pending.cancel()


def is_local(path: str | os.PathLike) -> bool:
    return not storage.is_url(path)


@contextlib.contextmanager
def local_lock(path: str | os.PathLike, what: str):
    """Holds the lock of a local output for the block (object storage has no locks: nothing is held there)."""
    if not is_local(path):
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with lock_output(Path(path), what):
        yield


def write_record(path: str, settings: dict[str, Any], pieces: int) -> None:
    storage.write_bytes(path, _record_text(settings, pieces))


def elapsed(start: float) -> float:
    return time.perf_counter() - start


def process_record(folder: str, process: int, processes: int) -> str:
    """Returns the path of process `process`'s own settings record in a multi-process run."""
    return storage.join(folder, f"process-{process:05d}-of-{processes:05d}.json")


_PROCESS = re.compile(r"^process-(\d{5,})-of-(\d{5,})\.json$")


def process_records(folder: str) -> list[tuple[str, int]]:
    """Returns (path, number of processes) of every process record in `folder` (this run's and earlier runs')."""
    found = []
    for name, _ in _entries(folder):
        match = _PROCESS.match(name)
        if match:
            found.append((storage.join(folder, name), int(match.group(2))))
    return found


def refuse_other_processes(folder: str, settings: dict[str, Any]) -> None:
    """Raises ChunkError when a process record in `folder` holds other settings than `settings`: the pieces that
    process committed were scored otherwise, and a resume would merge them with these."""
    for path, _ in process_records(folder):
        recorded = read_record(path)
        if recorded is not None and fingerprint.differences(recorded, settings, (*fingerprint.KEYS, *PLAN_KEYS)):
            refuse_other_settings(f"{path} (the record of a process whose pieces are committed)", recorded, settings)


def remove_pieces(folder: str, lo: int, hi: int) -> None:
    """Removes every chunk of pieces lo..hi-1 (an overwrite clears its own share before scoring it)."""
    for name, regular in _entries(folder):
        match = _CHUNK.match(name)
        if match and lo <= int(match.group(1)) < hi:
            if not regular:
                raise ChunkError(
                    f"{storage.join(folder, name)} is not a regular file (a folder or a symbolic link); remove it "
                    "yourself, then rerun with {overwrite}.",
                    field="overwrite",
                )
            storage.remove(storage.join(folder, name))
