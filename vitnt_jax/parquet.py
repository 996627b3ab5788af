"""Parquet tables of image bytes as a source (`--parquet PATTERN`), and Parquet as a result format.

Source: a file or a glob of files (local or an fsspec URL: `s3://bucket/data/train-*.parquet`), sorted by
name, each row an image. The image column holds encoded bytes: binary, or a struct with a binary `bytes`
field (the Hugging Face datasets layout `{bytes, path}`). Opening reads only the footers (schema, row
groups, row counts), so every process computes the same plan cheaply; a piece is a run of consecutive row
groups of one file, and reading it reads only those row groups and only the columns used.

Results: `write_rows` writes one chunk of rows as a Parquet table (columns id, quality, [label,] error, the
values a CSV result holds), `merge` streams chunks into one Parquet file, `read_rows` reads one back.
Embeddings and patch-quality maps are not in the table: they stay .npy files whose rows follow the table's.

pyarrow is imported only when a Parquet file is opened or written (`pip install pyarrow`).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from vitnt_jax import data, output, sources, storage

logger = logging.getLogger(__name__)

# Rows decoded from a row group at a time while a piece is read: the page buffers of one batch, not a row group.
_BATCH_ROWS = 256
# Footers read at once when a pattern names many files (each one a small range request on object storage).
_FOOTER_THREADS = 16
# A row group above this many bytes, or rows beyond this many pieces' worth, is warned about when the source
# opens: a piece holds a whole row group.
LARGE_ROW_GROUP = 2 << 30
LARGE_ROW_GROUP_PIECES = 4
# Refused when the source opens (a footer claiming more is either hostile or cannot be held as one piece): a row
# group of more rows (unless --chunk-rows asks for more), used columns of more bytes uncompressed, a footer of
# more bytes. A row group whose used columns decode to more than GROUP_BYTES_SLACK times what its footer claims
# (plus GROUP_BYTES_FLOOR) is damaged: its rows are error rows (a compressed page cannot inflate unchecked).
MAX_GROUP_ROWS = 1 << 22
MAX_GROUP_BYTES = 16 << 30
MAX_FOOTER = 64 << 20
GROUP_BYTES_SLACK = 4
GROUP_BYTES_FLOOR = 256 << 20
# The bytes (as the footer claims them) decoded at once while a piece is read: batches of fewer rows for large rows.
_BATCH_BYTES = 8 << 20
# An id longer than this is not used (the row is named FILE:ROW and is an error row).
MAX_ID_CHARS = 4096
# The end of a file read at open: the footer and its length, in one read for all but huge footers.
_TAIL = 64 << 10


def _large(rows: int, size: int, piece_rows: int) -> bool:
    return size > LARGE_ROW_GROUP or rows > LARGE_ROW_GROUP_PIECES * piece_rows


def _pyarrow(what: str, error_class: type, field: str | None):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        message = what + " needs pyarrow: pip install pyarrow."
        raise error_class(message, field=field) from error
    return pyarrow, pyarrow.parquet


def _refuse(message: str, field: str = "parquet") -> sources.SourceError:
    return sources.SourceError(message, field=field, also=("parquet",) if field != "parquet" else ())


# ---------------------------------------------------------------------------------------------------------------
# The source


@dataclass(frozen=True)
class _File:
    location: str  # what storage.open_read opens
    name: str  # the file's name as matched (relative to the pattern's folder): the FILE of FILE:ROW ids
    size: int
    row_groups: tuple[tuple[int, int], ...]  # (rows, bytes) of each row group
    schema: Any  # pyarrow.Schema (dropped once the plan is made)
    meta: Any = None  # pyarrow FileMetaData (dropped once the plan is made)
    footer: int = 0  # where the footer (metadata, its length, PAR1) starts
    digest: str = ""  # sha256 of the footer's bytes: a file rewritten to the same size is told apart
    spans: tuple[tuple[tuple[int, int], ...], ...] = ()  # (start, end) of the used columns' chunks, by row group
    used: tuple[int, ...] = ()  # the used columns' uncompressed bytes (as the footer says), by row group


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


def _prefix(pattern: str) -> str:
    """Returns the folder part of `pattern` before its first glob character, ending in '/' (or '')."""
    cut = min((pattern.index(c) for c in "*?[" if c in pattern), default=len(pattern))
    head = pattern[:cut]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def _matches(pattern: str) -> list[tuple[str, str]]:
    """Returns (location, name) of every file `pattern` names, sorted by name; SourceError when none.

    Listed through storage.glob (its bounded waits and one-line errors): folders, FIFOs and other special files
    never match; a pattern with no glob character naming a folder is refused with the hint to pass a glob.
    """
    if not _has_magic(pattern) and storage.is_folder(pattern):
        shown = storage.join(pattern.rstrip("/"), "*.parquet")
        raise _refuse("{parquet} " + f"{pattern} is a folder; pass a glob of its files, e.g. {shown}.")
    found = storage.glob(pattern)
    if _has_magic(pattern):
        base = _prefix(pattern)
    else:
        base = pattern[: pattern.rfind("/") + 1]
    pairs = [(p, p[len(base) :] if base and p.startswith(base) else p.rsplit("/", 1)[-1]) for p in found]
    if not pairs:
        local = storage.local_path(pattern)
        if not _has_magic(pattern) and local is not None and os.path.lexists(local):
            raise _refuse(
                "{parquet} " + f"{pattern} is not a regular file (a FIFO, a device or a link to nothing); pass a "
                "Parquet file."
            )
        raise _refuse("no file matches {parquet} " + f"{pattern}; check the path or the glob.")
    pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return pairs


class _NotParquet(Exception):
    """The end of a file is not a Parquet footer this source reads."""


def _read_at(stream, start: int, n: int) -> bytes:
    """Returns n bytes of `stream` from `start` (several reads when a read returns fewer)."""
    stream.seek(start)
    blob = storage.read_exactly(stream, n)
    if len(blob) != n:
        raise OSError(f"read {len(blob)} bytes at {start}, not {n}: the file changed")
    return blob


def _reading(raw, location: str, watched: _Watched) -> Callable[[int, int], bytes]:
    """Returns read(start, n) for a file storage opened: on object storage one ranged request for exactly those
    bytes through the file system storage opened it with (reading through the file object would cost one more
    metadata request first, and fsspec's read-ahead), a local file read as it is. Failures are noted on
    `watched`, as a failing file, not a damaged one."""
    fs, path = getattr(raw, "fs", None), getattr(raw, "path", None)
    if not storage.is_url(location) or fs is None or not isinstance(path, str) or not hasattr(fs, "cat_file"):
        return lambda start, n: _read_at(watched, start, n)

    def read(start: int, n: int) -> bytes:
        try:
            blob = bytes(fs.cat_file(path, start=start, end=start + n))
        except BaseException as error:
            watched.fault = watched.fault or error
            raise
        if len(blob) != n:  # the object changed, or a server that ignores ranges: the storage, not the table
            watched.fault = watched.fault or OSError(f"read {len(blob)} bytes at {start}, not {n}")
            raise OSError(f"read {len(blob)} bytes at {start}, not {n}: the file changed")
        return blob

    return read


def _footer_bytes(read: Callable[[int, int], bytes], size: int) -> tuple[int, int, bytes]:
    """Returns (where the footer starts, where the bytes read start, the bytes read: the file's last 64 KiB or,
    for a longer footer, from the footer's start), checking the magic and the footer's length before anything is
    parsed; _NotParquet otherwise."""
    if size < 12:
        raise _NotParquet(f"it holds {size} bytes, too few for a Parquet file")
    start = max(0, size - _TAIL)
    tail = read(start, size - start)
    if tail[-4:] == b"PARE":
        raise _NotParquet("it is an encrypted Parquet file (its footer is encrypted), which this source does not read")
    if tail[-4:] != b"PAR1":
        raise _NotParquet("Parquet magic bytes not found at its end")
    length = int.from_bytes(tail[-8:-4], "little")
    if length > size - 12:
        raise _NotParquet(f"its footer claims {length} bytes, more than the file holds")
    if length > MAX_FOOTER:
        raise _NotParquet(f"its footer claims {length} bytes, above the {MAX_FOOTER} bytes this source reads")
    footer = size - 8 - length
    if footer < start:
        tail = read(footer, start - footer) + tail
        start = footer
    return footer, start, tail


def _footer(location: str, name: str) -> _File:
    """Returns a file's plan facts, reading only its footer; SourceError for a file that is not Parquet."""
    _, pq = _pyarrow("{parquet}", sources.SourceError, "parquet")
    stream = None
    try:
        with storage.open_read(location) as raw:
            stream = _Watched(raw)
            size = stream.seek(0, os.SEEK_END)
            footer, start, tail = _footer_bytes(_reading(raw, location, stream), size)
            own = tail[footer - start : len(tail) - 8]
            # pyarrow parses the footer from the bytes read (one read of the file's end, on object storage one
            # request); it reads nothing else at open.
            meta = pq.ParquetFile(_Ranges(_no_fetch, size, [(start, size)], [tail])).metadata
            schema = meta.schema.to_arrow_schema()
            groups = tuple(
                (meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)
            )
    except storage.StorageError:
        raise
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if stream is None or stream.fault is not None:  # the file itself: missing, a FIFO, a network error
            why = error.strerror if isinstance(error, OSError) and error.strerror else first
            raise _refuse(
                "cannot read {parquet} " + f"file {name} ({why[:200]}); check that it exists and is readable."
            ) from error
        # a file too short, no magic, a footer length outside the file, a torn or damaged footer
        raise _refuse(
            "{parquet} " + f"file {name} is not a readable Parquet file ({first[:200]}); pass Parquet files only."
        ) from error
    return _File(location, name, size, groups, schema, meta, footer, hashlib.sha256(own).hexdigest())


def _no_fetch(start: int, end: int) -> bytes:
    raise OSError(f"bytes {start}..{end} lie before the footer, which is all that is read when a file is opened")


def _in(path: str, used: list[str]) -> bool:
    """Whether a column chunk's dotted path lies in one of the used top-level columns (whose names may hold dots)."""
    return any(path == c or path.startswith(c + ".") for c in used)


def _spans(f: _File, used: list[str]) -> tuple[tuple[tuple[tuple[int, int], ...], ...], tuple[int, ...]]:
    """Returns, for each row group of `f`, the byte ranges of the used columns' chunks and their uncompressed
    bytes (from its footer); SourceError when a chunk lies outside the file's data (a damaged or crafted footer)."""
    out, sizes = [], []
    for g in range(f.meta.num_row_groups):
        group, spans, size = f.meta.row_group(g), [], 0
        for i in range(group.num_columns):
            column = group.column(i)
            if _in(column.path_in_schema, used):
                start = column.data_page_offset
                if column.has_dictionary_page and 0 < column.dictionary_page_offset < start:
                    start = column.dictionary_page_offset
                end = start + column.total_compressed_size
                if not (4 <= start < end <= f.footer) or column.total_uncompressed_size < 0:
                    raise _refuse(
                        "{parquet} " + f"file {f.name} is not a readable Parquet file (its footer places row group "
                        f"{g} column {column.path_in_schema!r} at bytes {start}..{end}, outside the file's "
                        f"{f.footer} bytes of data); pass Parquet files only."
                    )
                if not _decodable(column.compression):
                    raise _refuse(
                        "{parquet} " + f"file {f.name} compresses column {column.path_in_schema!r} with "
                        f"{column.compression}, which this pyarrow cannot decompress; rewrite the table with zstd or "
                        "snappy (pyarrow.parquet.write_table(..., compression='zstd'))."
                    )
                spans.append((start, end))
                size += column.total_uncompressed_size
        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):  # adjacent chunks (a struct's fields, columns side by side) as one range
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        out.append(tuple(merged))
        sizes.append(size)
    return tuple(out), tuple(sizes)


@functools.cache
def _decodable(codec: str) -> bool:
    """Whether pyarrow here can decompress column chunks of this codec ('SNAPPY', 'ZSTD', 'LZO', ...)."""
    if codec == "UNCOMPRESSED":
        return True
    import pyarrow

    try:
        return bool(pyarrow.Codec.is_available(codec.lower()))
    except ValueError:  # a codec pyarrow does not know (LZO)
        return False


def _check_groups(f: _File, piece_rows: int) -> None:
    """Refuses a row group that claims more rows or bytes than one piece may hold (a crafted footer can claim a
    billion rows in a few bytes of run-length-encoded nulls, or gigabytes in a few of compressed zeros)."""
    rows_limit = max(MAX_GROUP_ROWS, piece_rows)
    for g, ((rows, _), used) in enumerate(zip(f.row_groups, f.used, strict=True)):
        if rows < 0 or rows > rows_limit or used > MAX_GROUP_BYTES:
            what = f"{rows} rows" if rows < 0 or rows > rows_limit else f"{used} bytes of the columns read"
            limit = f"{rows_limit} rows" if rows < 0 or rows > rows_limit else f"{MAX_GROUP_BYTES} bytes"
            raise _refuse(
                "{parquet} " + f"file {f.name} row group {g} holds {what} (its footer says), above the {limit} one "
                "piece may hold; rewrite the table with smaller row groups (e.g. pyarrow.parquet.write_table(..., "
                f"row_group_size={min(piece_rows, 100_000)}))."
            )


def _image_kind(pa, arrow_type) -> str | None:
    """Returns 'binary' or 'struct' for an image column type this source reads, None otherwise."""
    if _is_binary(pa, arrow_type) or (pa.types.is_dictionary(arrow_type) and _is_binary(pa, arrow_type.value_type)):
        return "binary"  # a dictionary of binary values: repeated images stored once
    if pa.types.is_struct(arrow_type):
        index = arrow_type.get_field_index("bytes")
        if index >= 0 and _is_binary(pa, arrow_type.field(index).type):
            return "struct"
    return None


def _is_binary(pa, arrow_type) -> bool:
    return (
        pa.types.is_binary(arrow_type)
        or pa.types.is_large_binary(arrow_type)
        or getattr(pa.types, "is_binary_view", lambda _: False)(arrow_type)
    )


def _is_scalar(pa, arrow_type) -> bool:
    """Whether a column of this type can be an id or a label (text, bytes, integers, booleans, floats)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or getattr(pa.types, "is_string_view", lambda _: False)(arrow_type)
        or _is_binary(pa, arrow_type)
        or pa.types.is_integer(arrow_type)
        or pa.types.is_boolean(arrow_type)
        or pa.types.is_floating(arrow_type)
    )


def _text(value: Any) -> str:
    """Returns the text of an id or label cell (integers in decimal, floats integral as integers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")  # as file names: two such ids never merge
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _single(f: _File, column: str | None) -> None:
    """Refuses a file with two columns of the name `column` (which of them the source reads would be a guess)."""
    if column is not None and f.schema.names.count(column) > 1:
        raise _refuse(
            "{parquet} " + f"file {f.name} has {f.schema.names.count(column)} columns named {column!r}; pass files "
            "whose columns have distinct names."
        )


def _columns_of(first: _File, pa, image_column: str, id_column: str | None, label_column: str | None):
    """Returns (image kind, id column or None, label column or None) decided from the first file's schema."""
    names = first.schema.names
    listed = ", ".join(repr(n) for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    for column, option in ((image_column, "image_column"), (id_column, "id_column"), (label_column, "label_column")):
        if (column or option == "image_column") and column not in names:
            raise _refuse(
                "{parquet} " + f"file {first.name} has no column {column!r}; pass " + "{" + option + "}"
                f" one of its columns: {listed}.",
                field=option,
            )
    _single(first, image_column)
    kind = _image_kind(pa, first.schema.field(image_column).type)
    if kind is None:
        raise _refuse(
            f"column {image_column!r} of {first.name} holds {first.schema.field(image_column).type}, not image bytes; "
            "pass {image_column} naming a binary column or a struct with a binary 'bytes' field.",
            field="image_column",
        )
    # None: the default column when the table has it; '': none (FILE:ROW ids, no label).
    id_column = id_column if id_column is not None else ("id" if "id" in names and image_column != "id" else "")
    label_column = label_column if label_column is not None else ("label" if "label" in names else "")
    id_column, label_column = id_column or None, label_column or None
    for column in (image_column, id_column, label_column):
        _single(first, column)
    for column, option in ((id_column, "id_column"), (label_column, "label_column")):
        if column is not None and not _is_scalar(pa, first.schema.field(column).type):
            raise _refuse(
                f"column {column!r} of {first.name} holds {first.schema.field(column).type}; pass "
                + "{"
                + option
                + "} naming a column of text or integers, or '' for "
                + ("FILE:ROW ids." if option == "id_column" else "no label."),
                field=option,
            )
    return kind, id_column, label_column


def _check_alike(first: _File, f: _File, used: list[str]) -> None:
    """Refuses a file whose used columns differ from the first file's (missing, or of another type)."""
    for column in used:
        arrow_type = first.schema.field(column).type
        _single(f, column)
        if column not in f.schema.names:
            raise _refuse(
                "{parquet} " + f"file {f.name} has no column {column!r} but {first.name} has; pass files of one "
                "table (one schema) only."
            )
        if f.schema.field(column).type != arrow_type:
            raise _refuse(
                "{parquet} " + f"file {f.name} holds column {column!r} as {f.schema.field(column).type}, "
                f"{first.name} as {arrow_type}; pass files of one table (one schema) only."
            )


def _slim(first: _File, f: _File, used: list[str], piece_rows: int) -> _File:
    """Returns the plan facts of `f` (checked against the first file) without its footer, which is dropped at once:
    a pattern of many files holds a few numbers a row group, not every file's parsed footer."""
    _check_alike(first, f, used)
    spans, used_bytes = _spans(f, used)
    f = dataclasses.replace(f, schema=None, meta=None, spans=spans, used=used_bytes)
    _check_groups(f, piece_rows)
    return f


def _plan(files: list[_File], piece_rows: int) -> list[tuple[int, int, int, int]]:
    """Returns (file index, first row group, end row group, first row) of each piece, in order.

    A file's consecutive row groups are grouped while they hold at most `piece_rows` rows together (a larger one
    is a piece alone); empty row groups join the next piece, and a file's empty last ones are no piece.
    """
    plan = []
    for k, f in enumerate(files):
        start, rows, first_row, row = None, 0, 0, 0
        for g, (n, _) in enumerate(f.row_groups):
            if start is not None and rows > 0 and rows + n > piece_rows:
                plan.append((k, start, g, first_row))
                start, rows = None, 0
            if start is None:
                start, first_row = g, row
            rows += n
            row += n
        if start is not None and rows > 0:
            plan.append((k, start, len(f.row_groups), first_row))
    return plan


def open_parquet(
    pattern: str,
    *,
    piece_rows: int,
    image_column: str = "image",
    id_column: str | None = None,
    label_column: str | None = None,
) -> sources.Pieces:
    """Returns the rows of the Parquet files `pattern` names as pieces (consecutive row groups of one file).

    id: the `id_column` cell (default the column 'id' when the table has one), else FILE:ROW (the file's name as
    matched, the row's index in that file from 0); `id_column=''` gives FILE:ROW ids whatever the table holds.
    label: the `label_column` cell (default 'label' when present; integers in decimal, text as it is, a null
    label empty); `label_column=''`: no label. A piece groups a file's consecutive row groups while
    they hold at most `piece_rows` rows together (a larger row group is a piece alone). A null image, a struct
    with null bytes (a path only: never read) or an undecodable image is that row's error. A null or empty id,
    and an id repeated within a piece after its first row, is an error row whose id is FILE:ROW.
    """
    pa, _ = _pyarrow("{parquet}", sources.SourceError, "parquet")
    if piece_rows < 1:
        raise _refuse(f"piece_rows must be at least 1, not {piece_rows}.", field="piece_rows")
    matched = _matches(pattern)
    first = _footer(*matched[0])
    kind, id_col, label_col = _columns_of(first, pa, image_column, id_column, label_column)
    used = [c for c in dict.fromkeys([image_column, id_col, label_col]) if c is not None]
    workers = max(1, min(_FOOTER_THREADS, len(matched) - 1))
    # The plan keeps names, row groups and the byte ranges a piece reads; no footer. The first failing file in
    # name order is the one reported, and the files not yet read are not read.
    files = [_slim(first, first, used, piece_rows)]
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        files.extend(pool.map(lambda pair: _slim(first, _footer(*pair), used, piece_rows), matched[1:]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    plan = _plan(files, piece_rows)
    if not plan:
        raise _refuse("{parquet} " + f"{pattern} holds no rows; pass files that hold images.")

    digest = hashlib.sha256()
    head = f"image {image_column} ({kind}); id {id_col or 'FILE:ROW'}; label {label_col or '-'}; pieces of {piece_rows}"
    digest.update(head.encode() + b"\n")
    for f in files:
        groups = ",".join(f"{n}:{b}" for n, b in f.row_groups)
        digest.update(f.name.encode("utf-8", "surrogatepass") + f"\0{f.size}\0{f.digest}\0{groups}\n".encode())
    total = sum(n for f in files for n, _ in f.row_groups)
    identity = f"parquet {len(files)} files, {total} rows, {len(plan)} pieces, sha256 {digest.hexdigest()}"

    large = [(n, b, f.name, g) for f in files for g, (n, b) in enumerate(f.row_groups) if _large(n, b, piece_rows)]
    if large:
        n, b, name, g = max(large, key=lambda x: x[1])
        logger.warning(
            "%d parquet row groups are larger than a piece should be (the largest: %s row group %d, %d rows, %d "
            "bytes); a piece holds a whole row group in memory, so rewrite the table with smaller row groups "
            "(e.g. pyarrow.parquet.write_table(..., row_group_size=%d))",
            len(large),
            name,
            g,
            n,
            b,
            piece_rows,
        )

    columns = _Columns(image_column, kind, id_col, label_col)
    pieces = []
    for index, (k, a, b, first_row) in enumerate(plan):
        f = files[k]
        rows = sum(n for n, _ in f.row_groups[a:b])
        name = f"{f.name} {_groups(a, b)} (rows {first_row}..{first_row + rows - 1})"
        pieces.append(sources.Piece(index, name, rows, _reader(f, a, b, first_row, rows, columns)))
    return sources.Pieces(f"parquet {pattern}", label_col is not None, pieces, identity)


@dataclass(frozen=True)
class _Columns:
    image: str
    kind: str  # 'binary' or 'struct'
    id: str | None
    label: str | None


def _reader(f: _File, a: int, b: int, first_row: int, rows: int, columns: _Columns) -> Callable[[], sources.Source]:
    def read() -> sources.Source:
        return _read_piece(f, a, b, first_row, rows, columns)

    return read


class _Watched:
    """A binary file that remembers an exception its reads raised: a failing file (a network error) is told
    apart from data pyarrow cannot decode (a damaged file), which pyarrow raises as the same OSError."""

    def __init__(self, stream):
        self.stream, self.fault = stream, None

    def _call(self, name, *args):
        try:
            return getattr(self.stream, name)(*args)
        except BaseException as error:
            self.fault = self.fault or error
            raise

    def read(self, *args):
        return self._call("read", *args)

    def readinto(self, *args):
        return self._call("readinto", *args)

    def seek(self, *args):
        return self._call("seek", *args)

    def tell(self):
        return self._call("tell")

    def __getattr__(self, name):
        return getattr(self.stream, name)


# Byte ranges of a piece closer than this are fetched as one request (the bytes between are read and dropped).
_RANGE_GAP = 64 << 10


@contextlib.contextmanager
def _open_piece(f: _File, a: int, b: int):
    """Yields a seekable file for reading row groups a..b-1 of `f`.

    A local file is opened as it is. On object storage (any URL), the footer and the used columns' chunks of
    those row groups are fetched at once by ranged requests for exactly their bytes (fsspec's read-ahead would
    fetch up to 50 MiB past each read), and served from memory; a read outside them (never expected) is fetched
    on its own.
    """
    with storage.open_read(f.location) as raw:
        # The file system storage opened the file with (its timeouts and retries); a local file has none.
        fs, path = getattr(raw, "fs", None), getattr(raw, "path", None)
        if not storage.is_url(f.location) or fs is None or not isinstance(path, str) or not hasattr(fs, "cat_ranges"):
            yield raw
            return
        size = raw.seek(0, os.SEEK_END)
        # pyarrow reads the last 64 KiB first (the footer and what lies before it), then the rest of a longer one.
        footer = max(0, min(f.footer, size - (64 << 10)))
        spans = sorted([s for group in f.spans[a:b] for s in group] + [(footer, size)])
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + _RANGE_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        merged = [[max(0, s), min(e, size)] for s, e in merged if s < size]
        blobs = fs.cat_ranges([path] * len(merged), [s for s, _ in merged], [e for _, e in merged])
        for blob in blobs:
            if isinstance(blob, BaseException):  # cat_ranges returns the error of a range that failed
                raise blob
        yield _Ranges(lambda start, end: fs.cat_file(path, start=start, end=end), size, merged, blobs)


class _Ranges(io.RawIOBase):
    """A read-only file of `size` bytes of which some ranges are in memory; other reads call fetch(start, end)."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int, spans, blobs):
        super().__init__()
        self.fetch, self.size, self.pos = fetch, size, 0
        self.parts = [(s, e, memoryview(blob)) for (s, e), blob in zip(spans, blobs, strict=True)]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self._get(self.pos, end)
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _get(self, start: int, end: int) -> bytes:
        for s, e, blob in self.parts:
            if s <= start and end <= e:
                return bytes(blob[start - s : end - s])
        blob = bytes(self.fetch(start, end))
        if len(blob) != end - start:
            raise OSError(f"read {len(blob)} bytes at {start}, not {end - start}: the file changed")
        self.parts.append((start, end, memoryview(blob)))
        return blob


def _groups(a: int, b: int) -> str:
    return f"row group {a}" if b - a == 1 else f"row groups {a}..{b - 1}"


def _read_piece(f: _File, a: int, b: int, first_row: int, rows: int, columns: _Columns) -> sources.Source:
    """Reads row groups a..b-1 of `f` (the used columns only) in batches; returns them as a small Source.

    A file that cannot be read (a network error, a file changed since the plan) raises SourceError: nothing of
    the piece is committed and a resumed run reads it again. Data that do not decode (a damaged row group) are
    error rows, one per planned row, with FILE:ROW ids.
    """
    try:
        with _open_piece(f, a, b) as raw:
            stream = _Watched(raw)
            try:
                return _decode_piece(stream, f, a, b, first_row, rows, columns)
            except sources.SourceError:
                raise
            except Exception as error:
                if stream.fault is not None:
                    raise
                if isinstance(error, MemoryError):  # pyarrow's ArrowMemoryError too: the host's limit, not the data's
                    raise _refuse(
                        "not enough memory to read {parquet} "
                        + f"file {f.name} {_groups(a, b)} ({sum(f.used[a:b])} bytes uncompressed as its footer says); "
                        "rewrite the table with smaller row groups or run on a host with more memory, then resume."
                    ) from error
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                # A file cut short (or rewritten) while it was read reads as damaged data: it is refused instead,
                # so that no error row is committed for rows a resumed run can read.
                _check_unchanged(stream, f)
    except sources.SourceError:
        raise
    except Exception as error:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _refuse(
            "cannot read {parquet} " + f"file {f.name} {_groups(a, b)} ({why[:200]}); check the file and access, "
            "then resume."
        ) from error
    logger.warning("parquet file %s %s cannot be decoded (%s): its rows are error rows", f.name, _groups(a, b), reason)
    why = f"{f.name} {_groups(a, b)} cannot be decoded ({reason[:200]}); the file is damaged"
    ids = [f"{f.name}:{first_row + j}" for j in range(rows)]
    labels = None if columns.label is None else [""] * rows

    def damaged(j: int):
        raise data.ImageError(why)

    return sources.Source(f"parquet {f.name}", ids, labels, damaged)


class _Undecodable(Exception):
    """The row groups decoded to another number of rows than the footer says."""


def _held(pa, array) -> int:
    """Returns the bytes an array's buffers hold (a dictionary's values counted with its indices)."""
    if pa.types.is_dictionary(array.type):
        return _held(pa, array.indices) + _held(pa, array.dictionary)
    return sum(buffer.size for buffer in array.buffers() if buffer is not None)


def _check_unchanged(stream, f: _File) -> None:
    """Refuses a file whose size or footer is not the plan's (rewritten, replaced, truncated, grown)."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    if size == f.size:
        if not f.digest:
            return
        footer = _read_at(stream, f.footer, size - 8 - f.footer)
        stream.seek(0)
        if hashlib.sha256(footer).hexdigest() == f.digest:
            return
    held = f"holds {size} bytes, not the {f.size}" if size != f.size else "has another footer than the one"
    raise _refuse(
        "{parquet} " + f"file {f.name} {held} it held when the run was planned; a run reads files that do not "
        "change (rerun on the new files with a new output)."
    )


def _decode_piece(stream, f: _File, a: int, b: int, first_row: int, rows: int, columns: _Columns) -> sources.Source:
    pa, pq = _pyarrow("{parquet}", sources.SourceError, "parquet")
    wanted = [c for c in dict.fromkeys([columns.image, columns.id, columns.label]) if c is not None]
    images: list[Any] = []  # one pyarrow array of image bytes per batch (the piece's memory)
    ids: list[str] = []
    labels: list[str] | None = [] if columns.label is not None else None
    bad: dict[int, str] = {}  # row in piece -> why it has no image (null, a path only)
    starts: list[int] = []
    _check_unchanged(stream, f)
    claimed = sum(f.used[a:b]) if f.used else 0
    # What the used columns may decode to: a page inflating past what the footer claims (a compressed bomb, or a
    # footer that lies) makes the row groups damaged, checked batch by batch; batches are small for large rows.
    allowed = GROUP_BYTES_SLACK * claimed + GROUP_BYTES_FLOOR
    batch_rows = max(1, min(_BATCH_ROWS, _BATCH_BYTES * max(1, rows) // max(1, claimed)))
    held = 0
    table = pq.ParquetFile(stream, pre_buffer=False)  # measured: a lower peak than pre-buffered ranges
    for batch in table.iter_batches(
        batch_size=batch_rows, row_groups=list(range(a, b)), columns=wanted, use_threads=False
    ):
        held += sum(_held(pa, batch.column(k)) for k in range(batch.num_columns))
        if held > allowed:
            raise _Undecodable(f"its columns decode to more than {allowed} bytes; its footer says {claimed}")
        base = len(ids)
        starts.append(base)
        cells = batch.column(wanted.index(columns.image))
        if columns.kind == "struct":
            field = cells.type.get_field_index("bytes")
            paths = cells.type.get_field_index("path")
            blobs = cells.field(field)
            valid = cells.is_valid().to_pylist()
            where = cells.field(paths).to_pylist() if paths >= 0 else None
            for j, blob_ok in enumerate(blobs.is_valid().to_pylist()):
                if not valid[j]:
                    bad[base + j] = "image is null"
                elif not blob_ok:
                    shown = "" if where is None or where[j] is None else f" (only a path, {where[j]!r:.120})"
                    bad[base + j] = f"image has no bytes{shown}; paths are not read"
            images.append(blobs)
        else:
            for j, ok in enumerate(cells.is_valid().to_pylist()):
                if not ok:
                    bad[base + j] = "image is null"
            images.append(cells)
        ids.extend(_ids(batch, wanted, columns, f.name, first_row + base, bad, base))
        if labels is not None:
            labels.extend("" if v is None else _text(v) for v in batch.column(wanted.index(columns.label)).to_pylist())
        if len(ids) > rows:
            break
    if len(ids) != rows:
        raise _Undecodable(f"{len(ids) if len(ids) <= rows else 'more'} rows, not the {rows} its footer says")
    _unique(ids, f.name, first_row, bad)

    def load(j: int):
        if j in bad:
            raise data.ImageError(bad[j])
        k = bisect.bisect_right(starts, j) - 1
        blob = images[k][j - starts[k]].as_py()
        if len(blob) > data.MAX_OBJECT_BYTES:
            raise data.ImageError(f"image of {len(blob)} bytes, above the {data.MAX_OBJECT_BYTES} byte limit, not read")
        return data.read_image(blob)

    return sources.Source(f"parquet {f.name}", ids, labels, load)


def _ids(batch, wanted, columns: _Columns, name: str, row: int, bad: dict[int, str], base: int) -> list[str]:
    """Returns the ids of one batch (its first row is row `row` of the file); a null or empty id becomes FILE:ROW."""
    if columns.id is None:
        return [f"{name}:{row + j}" for j in range(batch.num_rows)]
    out = []
    for j, value in enumerate(batch.column(wanted.index(columns.id)).to_pylist()):
        text = None if value is None else _text(value)
        if not text:
            out.append(f"{name}:{row + j}")
            what = "null" if value is None else "empty"
            bad[base + j] = f"id is {what} in column {columns.id!r}; this row is named by its file and row"
        elif len(text) > MAX_ID_CHARS:
            out.append(f"{name}:{row + j}")
            bad[base + j] = (
                f"id of {len(text)} characters in column {columns.id!r}, above {MAX_ID_CHARS}; this row is named by "
                "its file and row"
            )
        else:
            out.append(text)
    return out


def _unique(ids: list[str], name: str, first_row: int, bad: dict[int, str]) -> None:
    """Makes the ids of a piece unique as written (`output.render_id`: b'\\xff' and the text '\\xff' are one id
    there): a repeated id (after its first row) becomes FILE:ROW, an error row."""
    taken = {output.render_id(x) for x in ids}
    seen: dict[str, int] = {}
    for j, x in enumerate(ids):
        shown = output.render_id(x)
        if shown not in seen:
            seen[shown] = j
            continue
        alt, n = f"{name}:{first_row + j}", 1
        while output.render_id(alt) in taken:  # a FILE:ROW that an id cell holds too (never in practice)
            n += 1
            alt = f"{name}:{first_row + j}#{n}"
        taken.add(output.render_id(alt))
        ids[j] = alt
        seen[output.render_id(alt)] = j
        bad[j] = (
            f"id {sources.shown(shown, 120)} repeats the id of row {first_row + seen[shown]} of {name}; choose an id "
            "column of unique ids, or none for FILE:ROW ids"
        )


# ---------------------------------------------------------------------------------------------------------------
# The result format


def _schema(pa, with_label: bool):
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("quality", pa.float64())]
    if with_label:
        fields.append(pa.field("label", pa.string(), nullable=False))
    fields.append(pa.field("error", pa.string(), nullable=False))
    return pa.schema(fields)


def _table(pa, rows: Sequence[output.Row], with_label: bool):
    ids, qualities, labels, errors = [], [], [], []
    for r in rows:
        quality, error = r.quality, r.error or ""
        if quality is not None and not math.isfinite(quality):
            quality, error = None, error or f"non-finite score ({quality})"
        ids.append(output.render_id(r.id))
        qualities.append(None if quality is None else float(quality))
        labels.append(output.render_id(r.label or ""))
        errors.append(output.render_id(error))
    columns = [pa.array(ids, pa.string()), pa.array(qualities, pa.float64())]
    if with_label:
        columns.append(pa.array(labels, pa.string()))
    columns.append(pa.array(errors, pa.string()))
    return pa.Table.from_arrays(columns, schema=_schema(pa, with_label))


def _output_error(message: str) -> output.OutputError:
    return output.OutputError(message, field="out")


def write_rows(file_or_path: str | os.PathLike | BinaryIO, rows: Sequence[output.Row], with_label: bool) -> None:
    """Writes `rows` as one Parquet table: id (string), quality (float64, null for a failed row), [label,] error.

    The values are a CSV result's: text as rendered (`output.render_id`), label and error '' when none, a
    non-finite quality a failed row. A path is written whole (through a local file or object renamed in place).
    """
    pa, pq = _pyarrow("{format} parquet", output.OutputError, "format")
    table = _table(pa, rows, with_label)
    if isinstance(file_or_path, (str, os.PathLike)):
        with storage.open_write(file_or_path) as f:
            pq.write_table(table, f)
    else:
        pq.write_table(table, file_or_path)


def _read_chunk(pq, chunk, where: str, stack: contextlib.ExitStack):
    """Returns the ParquetFile of a chunk (a path, opened on `stack`, or a file); OutputError when unreadable."""
    if isinstance(chunk, (str, os.PathLike)):
        try:
            chunk = stack.enter_context(storage.open_read(chunk))
        except storage.StorageError:
            raise
        except OSError as error:
            raise _output_error(f"cannot read {where} ({error.strerror or error}).") from error
    try:
        return pq.ParquetFile(chunk)
    except Exception as error:
        raise _output_error(f"{where} is not a readable Parquet chunk ({str(error)[:200]}).") from error


def merge(
    chunk_files: Iterable[str | os.PathLike | BinaryIO], out_file: str | os.PathLike | BinaryIO, with_label: bool
) -> int:
    """Streams the chunks, in order, into one Parquet file (one row group of out_file per chunk row group).

    Holds one row group of one chunk in memory. Returns the number of rows written. Raises OutputError for a
    chunk that is not a result table of these columns.
    """
    pa, pq = _pyarrow("{format} parquet", output.OutputError, "format")
    schema = _schema(pa, with_label)
    total = 0

    def write(sink) -> None:
        nonlocal total
        with pq.ParquetWriter(sink, schema) as writer:
            for chunk in chunk_files:
                where = os.fspath(chunk) if isinstance(chunk, (str, os.PathLike)) else "a chunk"
                with contextlib.ExitStack() as stack:
                    table = _read_chunk(pq, chunk, where, stack)
                    if not table.schema_arrow.equals(schema):
                        raise _output_error(
                            f"{where} has columns {table.schema_arrow.names} ({table.schema_arrow.types}), not "
                            f"{schema.names}; it is not a result chunk of this run."
                        )
                    for g in range(table.num_row_groups):
                        try:
                            part = table.read_row_group(g, use_threads=False)
                        except Exception as error:
                            raise _output_error(
                                f"{where} is not a readable Parquet chunk ({str(error)[:200]})."
                            ) from error
                        if part.num_rows:  # an empty chunk adds no empty row group
                            writer.write_table(part)  # a failed write (a full disk) raises as it is, for the caller
                            total += part.num_rows

    if isinstance(out_file, (str, os.PathLike)):
        with storage.open_write(out_file) as f:
            write(f)
    else:
        write(out_file)
    return total


def read_rows(path: str | os.PathLike | BinaryIO) -> list[output.Row]:
    """Returns the rows of a Parquet result file (as written: rendered text, label None without a label column)."""
    pa, pq = _pyarrow("reading a Parquet result", output.OutputError, None)
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the result"
    stream = None
    try:
        if isinstance(path, (str, os.PathLike)):
            stream = storage.open_read(path)
            table = pq.ParquetFile(stream)
        else:
            table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if names not in (output.columns(False), output.columns(True)):
            raise _output_error(f"{where} has columns {names}, not {output.columns(True)}; it is not a score table.")
        for field in table.schema_arrow:
            text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
            number = pa.types.is_floating(field.type) or pa.types.is_null(field.type)
            if not (number if field.name == "quality" else text):
                raise _output_error(
                    f"{where} holds column {field.name!r} as {field.type}, not "
                    f"{'floats' if field.name == 'quality' else 'text'}; it is not a score table."
                )
        with_label = "label" in names
        rows = []
        # In batches: a row group claiming millions of rows is refused at its first null id, not decoded whole.
        for part in table.iter_batches(batch_size=4096, use_threads=False):
            part = part.to_pydict()
            labels = part["label"] if with_label else [None] * len(part["id"])
            for i, q, label, e in zip(part["id"], part["quality"], labels, part["error"], strict=True):
                if i is None:
                    raise _output_error(f"{where} has a row with a null id (row {len(rows)}); it is not a score table.")
                label = label if label is not None or not with_label else ""
                rows.append(output.Row(i, None if q is None else float(q), label, e or ""))
        return rows
    except output.OutputError:
        raise
    except FileNotFoundError:
        raise _output_error(f"{where} does not exist; check the path.") from None
    except storage.StorageError:
        raise
    except Exception as error:
        raise _output_error(f"{where} is not a readable Parquet file ({str(error)[:200]}).") from error
    finally:
        if stream is not None:
            stream.close()
