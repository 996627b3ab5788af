"""Append-only result files: one row per input, flushed per batch, resumable, mergeable.

Rows go to a CSV (`id,quality[,label],error`) or the authors' text format (`<id> <score>`).
Per-row arrays (embeddings, patch-quality maps) are appended to `FILE.npy.partial` in the same
row order and turned into `FILE.npy` when the run completes, so row i of the array belongs to
row i of the table. A crash loses at most the batch in flight; `resume` continues after the last
complete row and never writes an id twice.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class OutputError(Exception):
    """An output that cannot be written or resumed; the message names the fix."""


@dataclass
class Row:
    id: str
    quality: float | None
    label: str | None = None
    error: str = ""


def columns(with_label: bool) -> list[str]:
    return ["id", "quality", "label", "error"] if with_label else ["id", "quality", "error"]


def _truncate_torn_tail(path: Path) -> None:
    # A crash mid-write can leave a last line without its newline: drop that partial row.
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


_REFERENCE_LINE = re.compile(r"^.+ (nan|[-+0-9.eE]+)$")


def read_ids(path: Path, fmt: str, header: list[str]) -> list[str]:
    """Returns the ids already written to `path` (after dropping a torn last line).

    The file is checked to be one of ours, of the same format and columns, BEFORE anything in it
    is changed; a file with no complete line yet counts as empty.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{path} is not a text file written by this tool; choose a new --out.") from None
    complete = text[: text.rfind("\n") + 1]
    lines = complete.splitlines()
    if fmt == "reference":
        if lines and lines[0].split(",")[:2] == ["id", "quality"]:
            raise OutputError(f"{path} is a CSV, not a --format reference file; choose a new --out.")
        bad = next((line for line in lines if not _REFERENCE_LINE.match(line)), None)
        if bad is not None:
            raise OutputError(f"{path} has a line that is not '<id> <score>' ({bad[:60]!r}); choose a new --out.")
    elif lines:
        first = next(csv.reader([lines[0]]))
        if first != header:
            raise OutputError(
                f"{path} has columns {first}, not {header}; it comes from another kind of run, so choose a new --out."
            )
    _truncate_torn_tail(path)
    if fmt == "reference":
        return [line.rsplit(" ", 1)[0] for line in lines]
    rows = list(csv.reader(io.StringIO(complete)))
    return [r[0] for r in rows[1:]]


class ArraySink:
    """Appends fixed-shape float32 rows to PATH.partial; `finish` writes PATH as .npy."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], rows_done: int, resume: bool):
        self.path, self.row_shape = path, tuple(row_shape)
        self.partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.row_bytes = int(np.prod(self.row_shape)) * 4
        if resume:
            if not self.partial.exists() and path.exists():
                self._unfinish(rows_done)
            have = self.partial.stat().st_size // self.row_bytes if self.partial.exists() else 0
            if have < rows_done:
                raise OutputError(
                    f"{self.partial} holds {have} rows but the table holds {rows_done}; the array file belongs to "
                    "another run: remove it or start again without --resume."
                )
            with open(self.partial, "r+b" if self.partial.exists() else "wb") as f:
                f.truncate(rows_done * self.row_bytes)  # rows written after the table's last flush
        else:
            self.partial.unlink(missing_ok=True)
            self.partial.touch()
        self.file = open(self.partial, "ab")  # noqa: SIM115 (closed in finish/close)

    def _unfinish(self, rows_done: int) -> None:
        array = np.load(self.path, mmap_mode="r")
        if array.shape[1:] != self.row_shape:
            raise OutputError(
                f"{self.path} has rows of shape {array.shape[1:]}, not {self.row_shape}; choose a new path."
            )
        with open(self.partial, "wb") as f:
            f.write(np.ascontiguousarray(array[:rows_done], np.float32).tobytes())

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, np.float32).tobytes())

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def finish(self) -> None:
        """Writes PATH (.npy) from the partial rows and removes the partial file."""
        self.close()
        n = self.partial.stat().st_size // self.row_bytes
        data = np.memmap(self.partial, np.float32, "r", shape=(n, *self.row_shape)) if n else None
        tmp = self.path.with_name(self.path.name + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *self.row_shape))
        if n:
            out[:] = data
        out.flush()
        del out, data
        os.replace(tmp, self.path)
        self.partial.unlink()


class ResultWriter:
    """Writes rows (and row-aligned arrays) for one output; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        fmt: str = "csv",
        with_label: bool = False,
        arrays: dict[str, tuple[Path, tuple[int, ...]]] | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path, self.fmt = path, fmt
        self.header = columns(with_label)
        self.with_label = with_label
        exists = path.exists()
        if exists and not (resume or overwrite):
            raise OutputError(
                f"{path} already exists; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out."
            )
        self.done_ids: list[str] = read_ids(path, fmt, self.header) if (exists and resume) else []
        if len(set(self.done_ids)) != len(self.done_ids):
            raise OutputError(f"{path} already holds an id twice; it was not written by this tool, choose a new --out.")
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file cut off before its header was complete holds nothing: start it afresh.
        fresh = not (exists and resume) or (fmt == "csv" and path.stat().st_size == 0)
        self.file = open(path, "w" if fresh else "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.csv = csv.writer(self.file, lineterminator="\n") if fmt == "csv" else None
        if fresh and self.csv is not None:
            self.csv.writerow(self.header)
            self.file.flush()  # before the first batch (and its compilation) can be interrupted
        self.sinks = {
            name: ArraySink(p, shape, len(self.done_ids), not fresh) for name, (p, shape) in (arrays or {}).items()
        }

    def write(self, rows: Sequence[Row], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Appends rows (and their array rows, written first) and flushes both to disk."""
        for name, sink in self.sinks.items():
            sink.append(arrays[name])
            sink.flush()
        for r in rows:
            if self.csv is not None:
                q = "" if r.quality is None else repr(float(r.quality))
                fields = [r.id, q, r.label or "", r.error] if self.with_label else [r.id, q, r.error]
                self.csv.writerow(fields)
            else:
                self.file.write(f"{r.id} {'nan' if r.quality is None else format(r.quality, '.15f')}\n")
        self.file.flush()

    def close(self, finished: bool) -> None:
        """Closes the files; when `finished`, the array files become .npy files."""
        self.file.close()
        for sink in self.sinks.values():
            sink.finish() if finished else sink.close()


def part_path(path: Path, index: int, count: int) -> Path:
    """Returns the path of process `index`'s part of `path` (multi-process runs)."""
    return path.with_name(f"{path.name}.part{index:05d}-of-{count:05d}")


def merge_parts(out: Path, count: int, fmt: str, arrays: Sequence[Path], *, append: bool = False) -> int:
    """Concatenates the parts of `count` processes into `out` (and each array file); returns the rows.

    append: keep what `out` (and each array file) already holds and add the parts after it
    (a --resume of a finished multi-process run). Refuses parts whose table and arrays disagree.
    """
    texts, counts = [], []
    for i in range(count):
        text = part_path(out, i, count).read_text(encoding="utf-8")
        if fmt == "csv":
            text = text.split("\n", 1)[1] if "\n" in text else ""
        texts.append(text)
        counts.append(len(text.splitlines()))
    for path in arrays:
        for i in range(count):
            rows = np.load(part_path(path, i, count), mmap_mode="r").shape[0]
            if rows != counts[i]:
                raise OutputError(
                    f"part {i} of {path} holds {rows} rows but its table {counts[i]}; rerun that process with --resume."
                )
    tmp = out.with_name(out.name + ".merging")
    with open(tmp, "w", encoding="utf-8", newline="") as merged:
        if append and out.exists():
            merged.write(out.read_text(encoding="utf-8"))
        elif fmt == "csv":
            merged.write(part_path(out, 0, count).read_text(encoding="utf-8").split("\n", 1)[0] + "\n")
        for text in texts:
            merged.write(text)
    for path in arrays:
        parts = [np.load(part_path(path, i, count), mmap_mode="r") for i in range(count)]
        if append and path.exists():
            parts.insert(0, np.load(path, mmap_mode="r"))
        total = sum(p.shape[0] for p in parts)
        tmp_npy = path.with_name(path.name + ".merging.npy")
        result = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(total, *parts[0].shape[1:]))
        row = 0
        for p in parts:
            result[row : row + p.shape[0]] = p
            row += p.shape[0]
        result.flush()
        del result, parts
        os.replace(tmp_npy, path)
    os.replace(tmp, out)
    for i in range(count):
        for path in (out, *arrays):
            part_path(path, i, count).unlink(missing_ok=True)
    return sum(counts)
