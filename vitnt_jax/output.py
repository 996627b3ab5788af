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


def read_ids(path: Path, fmt: str, header: list[str]) -> list[str]:
    """Returns the ids already written to `path` (after dropping a torn last line)."""
    _truncate_torn_tail(path)
    text = path.read_text(encoding="utf-8")
    if fmt == "reference":
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    if rows[0] != header:
        raise OutputError(
            f"{path} has columns {rows[0]}, not {header}; it comes from another kind of run, so choose a new --out."
        )
    return [r[0] for r in rows[1:]]


class ArraySink:
    """Appends fixed-shape float32 rows to PATH.partial; `finish` writes PATH as .npy."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], rows_done: int, resume: bool):
        self.path, self.row_shape = path, tuple(row_shape)
        self.partial = path.with_name(path.name + ".partial")
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
        fresh = not (exists and resume)
        self.file = open(path, "w" if fresh else "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.csv = csv.writer(self.file, lineterminator="\n") if fmt == "csv" else None
        if fresh and self.csv is not None:
            self.csv.writerow(self.header)
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


def merge_parts(out: Path, count: int, fmt: str, arrays: Sequence[Path]) -> None:
    """Concatenates the finished parts of `count` processes into `out` (and each array file)."""
    tmp = out.with_name(out.name + ".merging")
    with open(tmp, "w", encoding="utf-8", newline="") as merged:
        for i in range(count):
            text = part_path(out, i, count).read_text(encoding="utf-8")
            if fmt == "csv" and i > 0:
                text = text.split("\n", 1)[1] if "\n" in text else ""
            merged.write(text)
    os.replace(tmp, out)
    for path in arrays:
        parts = [np.load(part_path(path, i, count), mmap_mode="r") for i in range(count)]
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
    for i in range(count):
        for path in (out, *arrays):
            part_path(path, i, count).unlink(missing_ok=True)
        done_marker(out, i, count).unlink(missing_ok=True)


def done_marker(out: Path, index: int, count: int) -> Path:
    return part_path(out, index, count).with_name(part_path(out, index, count).name + ".done")
