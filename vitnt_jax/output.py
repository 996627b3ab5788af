"""Append-only result files: one row per input, flushed per batch, resumable, mergeable, locked.

Rows go to a CSV (`id,quality[,label],error`) or the authors' text format (`<id> <score>`).
Per-row arrays (embeddings, patch-quality maps) are appended to `FILE.npy.partial` in the same
row order and turned into `FILE.npy` when the run completes, so row i of the array belongs to
row i of the table. A crash loses at most the batch in flight; `resume` cuts the file back to its
last complete record (a quoted one torn after an inner line break included) and never writes an
id twice. Ids are written as `render_id` gives them (always valid UTF-8); CSV cells are quoted and
guarded against spreadsheet formulas (`CsvFormat`). A failed write (a full disk) is one OutputError
naming the file, leaves no temporary file and keeps what was written resumable. One writer per
file: `lock_output` (`ResultWriter` takes it by default). Nothing is written through a link, even one
planted after the caller's checks: files are opened with O_NOFOLLOW, temporaries created with O_EXCL
(`_open`, `_create`). A merge killed at any point is finished by merging again (`merge_parts`).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import logging
import math
import os
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitnt_jax import files
from vitnt_jax.errors import UserError

log = logging.getLogger(__name__)


class OutputError(UserError):
    """An output that cannot be written or resumed; the message names the fix."""


def _slot(what: str | None) -> tuple[str, str, dict]:
    """Returns (the placeholder naming setting `what` before a path, the words for "another one", UserError kwargs)."""
    if what is None:
        return "", "another path", {}
    return "{" + what + "} ", "another {" + what + "}", {"field": what}


def _link_error(path: Path, what: str | None) -> OutputError:
    slot, _, kwargs = _slot(what)
    return OutputError(
        slot + f"{path} is a symbolic link; results are never written through a link: remove it, or give the file "
        "it points to.",
        **kwargs,
    )


def _nofollow(path, flags: int) -> int:
    """`open`'s opener: never follows a link at the last component (it fails with ELOOP instead), never waits on
    a FIFO and never writes into a device (files.NotRegularFileError)."""
    return files.open_regular(path, flags | os.O_NOFOLLOW)


def _open(path: Path, mode: str, what: str | None = "out", **kwargs):
    """Returns `open(path, mode)` without following a link there, even one planted after the checks: OutputError.

    Likewise for a FIFO, a device or a socket there: refused at once, never waited on.
    """
    try:
        return open(path, mode, opener=_nofollow, **kwargs)
    except files.NotRegularFileError as error:
        raise _special_error(path, error.kind, what) from None
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise _link_error(path, what) from None
        raise


def _special_error(path: Path, kind: str, what: str | None) -> OutputError:
    slot, _, kwargs = _slot(what)
    return OutputError(slot + f"{path} is {kind}, not a file; give a file path.", **kwargs)


def _memmap(path: Path) -> np.ndarray:
    """Returns the .npy at `path` as a read-only memory map (np.load's), opened as `files.open_regular` does."""
    with open(files.open_regular(path), "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        return np.memmap(f, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=f.tell())


def _create(path: Path, mode: str, what: str | None = "out", **kwargs):
    """Returns a new file at `path` opened for writing (O_CREAT|O_EXCL|O_NOFOLLOW): a temporary to be renamed.

    A link there is refused, never followed; a file there is the leftover of a killed run (its caller holds the
    lock of the output the temporary belongs to) and is replaced.
    """
    for attempt in range(2):
        try:
            return open(path, mode.replace("w", "x"), opener=_nofollow, **kwargs)
        except files.NotRegularFileError as error:
            raise _special_error(path, error.kind, what) from None
        except FileExistsError:
            if os.path.islink(path):
                raise _link_error(path, what) from None
            if attempt:
                raise
            path.unlink()


# Never through a link, and never waiting on a FIFO planted at the lock's name (refused once open).
_LOCK_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class OutputLock:
    """An exclusive lock on one output file, held by this run: `<file>.lock`, `flock`ed, removed on release.

    The lock file names its holder (pid, host, start time) so a refused run can say who writes the output.
    `flock` belongs to the open file, so a second lock on the same path conflicts even inside this
    process, and the kernel releases it when the holder dies (kill -9 included): a lock file left
    behind by a dead run blocks nothing; the next run locks it and overwrites its content.
    Use as a context manager (`with lock_output(path): ...`) or call `release()`.
    A file system that cannot lock at all (some FUSE mounts) gets a warning and no lock.
    """

    def __init__(self, path: str | os.PathLike, what: str | None = "out"):
        self.path, self.what = Path(path), what
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None
        self._pid = os.getpid()  # a forked child inherits the object but not the right to remove the lock
        self._unlockable = False  # acquired on a file system without locks: held, but by nothing

    @property
    def held(self) -> bool:
        """Returns whether this object holds the lock now (acquired and not released)."""
        return self._fd is not None or self._unlockable

    def acquire(self) -> OutputLock:
        """Takes the lock (never waits); returns self. Raises OutputError when another run holds it."""
        if self.held:
            return self
        slot, other, kwargs = _slot(self.what)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # opening the lock file below says what is wrong
        for _ in range(100):  # each retry follows a holder that removed the file we opened: bounded
            try:
                try:
                    fd = os.open(self.lock_path, _LOCK_FLAGS | os.O_RDWR | os.O_CREAT, 0o644)
                except PermissionError as denied:  # another user's lock file: a read-only descriptor locks it as well
                    try:
                        fd = os.open(self.lock_path, _LOCK_FLAGS | os.O_RDONLY)
                    except FileNotFoundError:  # no lock file, and none can be made (a read-only folder)
                        raise denied from None
            except OSError as error:
                raise OutputError(
                    slot + f"{self.path}: cannot create its lock file {self.lock_path} ({error.strerror}); "
                    f"remove what is there or choose {other}.",
                    **kwargs,
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(
                    slot + f"{self.path}: its lock file {self.lock_path} is not a regular file (a pipe, device or "
                    f"socket); remove it or choose {other}.",
                    **kwargs,
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().splitlines()
                os.close(fd)
                holder = "".join(c for c in note[0][:120] if c.isprintable()) if note else ""
                by = f" ({holder})" if holder else ""
                raise OutputError(
                    slot + f"{self.path} is being written by another run{by}; wait for it to finish or choose {other}.",
                    **kwargs,
                ) from None
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OutputError(
                        slot + f"{self.path}: cannot lock {self.lock_path} ({error.strerror}); choose {other}.",
                        **kwargs,
                    ) from None
                log.warning(
                    "%s cannot be locked on this file system (%s): nothing stops another run writing it too",
                    self.path,
                    error.strerror,
                )
                self.lock_path.unlink(missing_ok=True)
                self._unlockable = True
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it between our open and our lock: lock the file there now
                os.close(fd)
                continue
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            info = f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
            except OSError:
                pass  # the lock holds without its note (a full disk): a refused run then names no holder
            self._fd, self._pid = fd, os.getpid()
            return self
        raise OutputError(slot + f"{self.lock_path} keeps changing; choose {other}.", **kwargs)

    def release(self) -> None:
        """Removes the lock file and releases the lock (nothing when not held)."""
        self._unlockable = False
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid:
            os.close(fd)  # this process's copy only: the process that took the lock still holds it
            return
        try:
            # Removed while still locked: a run waiting on this file sees it gone and locks a new one.
            if os.path.samestat(os.fstat(fd), os.stat(self.lock_path, follow_symlinks=False)):
                self.lock_path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()


def lock_output(path: str | os.PathLike, what: str | None = "out") -> OutputLock:
    """Returns a held OutputLock on `path` (a context manager); raises OutputError when another run holds it.

    what: the setting the path was given as, for the message (`{out}` renders as `--out` on the command
    line); None names no setting. The message: "out x.csv is being written by another run (pid 123 on
    host h since 2026-01-01 12:00:01 UTC); wait for it to finish or choose another out."
    """
    return OutputLock(path, what).acquire()


@dataclass
class Row:
    id: str
    quality: float | None
    label: str | None = None
    error: str = ""


def columns(with_label: bool) -> list[str]:
    return ["id", "quality", "label", "error"] if with_label else ["id", "quality", "error"]


def render_id(image_id: str) -> str:
    """Returns the text written to a result file for `image_id`: valid text unchanged, every undecodable byte escaped.

    A file name that is not valid UTF-8 arrives surrogate-escaped (`os.fsdecode`: byte 0xHH as the
    character U+DCHH); each such character is written as the four characters `\\xHH` (lower-case hex),
    any other lone surrogate as the six characters `\\uXXXX`, so a result file is always valid UTF-8.
    Character by character and deterministic: the same id always gives the same text, and a rendered
    id renders to itself. Two ids can render alike (`bad_\\udcff.png` and the literal `bad_\\xff.png`):
    a source holding both must be refused by its caller. `ResultWriter.done_ids` and `read_results`
    return rendered ids: compare `render_id(source_id)` with them.
    """
    try:
        image_id.encode("utf-8")
        return image_id
    except UnicodeEncodeError:
        pass
    return "".join(
        (f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}")
        if 0xD800 <= ord(c) <= 0xDFFF
        else c
        for c in image_id
    )


def render_row(row: Row) -> Row:
    """Returns `row` as a result file writes it: text rendered (`render_id`), a non-finite quality as a failed row."""
    return _rendered(row)


def _rendered(row: Row) -> Row:
    """Returns `row` as written: text rendered (`render_id`), a non-finite quality as a failed row."""
    label = None if row.label is None else render_id(row.label)
    quality, error = _finite(row.quality, row.error)
    return Row(render_id(row.id), quality, label, render_id(error))


def _finite(quality: float | None, error: str) -> tuple[float | None, str]:
    """Returns (quality, error) with a NaN or infinite quality made a failure: it is never counted as scored."""
    if quality is None or math.isfinite(quality):
        return quality, error
    return None, error or f"non-finite score ({quality})"


# Characters str.splitlines ends a line at: many readers split on some of them, so a field holding one is quoted.
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# A cell a spreadsheet would take for a formula (OWASP's list), and the apostrophe that marks such a cell.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NEEDS_QUOTES = _LINE_BREAKS | {",", '"'}


def _csv_cell(text: str) -> str:
    if text.startswith(_FORMULA_START):
        text = "'" + text
    if _NEEDS_QUOTES.isdisjoint(text):
        return text
    return '"' + text.replace('"', '""') + '"'


def _csv_text(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


class ResultFormat:
    """One result format: how its file starts, how rows are written, and how they are read back.

    Subclasses define `name`, `help`, `header`, `write_rows` and `parse`; `FORMATS` holds one
    instance of each, so the scorer, the experiments and the evaluation share one definition.
    Rows reach `write_rows` from `ResultWriter` and `write_results` with their text already rendered
    (`render_id`).
    """

    name: str
    help: str
    suffix: str

    def header(self, with_label: bool) -> str:
        """Returns the text a new file starts with (may be empty)."""
        raise NotImplementedError

    def write_rows(self, file, rows: Sequence[Row], with_label: bool) -> None:
        """Appends rows to an open text file."""
        raise NotImplementedError

    def parse(self, text: str, where: str, with_label: bool | None = None) -> list[Row]:
        """Returns the rows of complete records of `text`; raises OutputError naming `where` and the line.

        with_label: the columns a resumed file must have (None: whatever its header says).
        """
        raise NotImplementedError

    def matches(self, text: str) -> bool:
        """Returns whether `text` looks like this format (for reading a file of unknown format)."""
        raise NotImplementedError

    def ids(self, text: str, where: str, with_label: bool | None = None) -> list[str]:
        """Returns the ids of `parse(text, ...)` (checked as strictly), without building its rows."""
        return [r.id for r in self.parse(text, where, with_label)]

    def body(self, text: str) -> str:
        """Returns `text` without its header (for concatenating parts)."""
        return text

    def complete(self, text: str) -> int:
        """Returns the length of the part of `text` made of complete records (a crash may have torn the last one)."""
        return text.rfind("\n") + 1

    def torn(self, tail: str) -> bool:
        """Returns whether `tail` (what follows the complete records) can be one record torn by a crash.

        Not when a lone carriage return ends a record in it: a file with old-Mac line ends, whose every
        record would otherwise count as one torn record and be cut off.
        """
        return "\r" not in tail.rstrip("\r")

    def check_id(self, image_id: str) -> None:
        """Raises OutputError when this format cannot hold the (rendered) id so that it reads back as written."""


class CsvFormat(ResultFormat):
    """`id,quality[,label],error`: quality empty when the row failed, the reason in `error`.

    Text cells (id, label, error) are quoted when they hold a comma, a double quote or any line break
    `str.splitlines` knows ('\\r', U+2028, form feed, NEL, ...), so a row is always one CSV record.
    A text cell starting with `=`, `+`, `-`, `@`, a tab or '\\r' (a spreadsheet formula) is written with
    an apostrophe before it, and one starting with an apostrophe gets one more: reading removes exactly
    one leading apostrophe, so every id reads back as written.
    """

    name, suffix = "csv", ".csv"
    help = "id,quality[,label],error"

    def header(self, with_label: bool) -> str:
        return ",".join(columns(with_label)) + "\n"

    def write_rows(self, file, rows: Sequence[Row], with_label: bool) -> None:
        lines = []
        for r in map(_rendered, rows):
            q = "" if r.quality is None else repr(float(r.quality))
            cells = [_csv_cell(r.id), q, _csv_cell(r.label or "")] if with_label else [_csv_cell(r.id), q]
            lines.append(",".join([*cells, _csv_cell(r.error)]) + "\n")
        file.write("".join(lines))

    def matches(self, text: str) -> bool:
        return text.lstrip("\ufeff").startswith("id,quality")

    def body(self, text: str) -> str:
        return text.split("\n", 1)[1] if "\n" in text else ""

    def torn(self, tail: str) -> bool:
        parts = tail.split('"')  # the even-numbered pieces lie outside quotes
        return all("\r" not in (p if k < len(parts) - 1 else p.rstrip("\r")) for k, p in enumerate(parts) if k % 2 == 0)

    def complete(self, text: str) -> int:
        # A record ends at a '\n' outside quotes: after an even number of '"' (a doubled '""' counts twice).
        quotes, end = text.count('"'), len(text)
        while (newline := text.rfind("\n", 0, end)) >= 0:
            quotes -= text.count('"', newline, end)  # now the quotes before this newline
            if quotes % 2 == 0:
                return newline + 1
            end = newline
        return 0

    def parse(self, text: str, where: str, with_label: bool | None = None) -> list[Row]:
        rows = []
        for cells, quality in self._records(text, where, with_label):
            label = _csv_text(cells[2]) if len(cells) == 4 else None
            quality, error = _finite(quality, _csv_text(cells[-1]))  # written by an older version
            rows.append(Row(_csv_text(cells[0]), quality, label, error))
        return rows

    def ids(self, text: str, where: str, with_label: bool | None = None) -> list[str]:
        return [_csv_text(cells[0]) for cells, _ in self._records(text, where, with_label)]

    def _records(self, text: str, where: str, with_label: bool | None):
        """Yields (cells, quality) of every record after the header, streamed (a table may hold millions)."""
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, min(len(text), sys.maxsize, 2**31 - 1)))  # an id may be as long as the file
        try:
            # A blank line (a file ended by hand, an editor's last line) holds no record.
            records = enumerate((c for c in csv.reader(io.StringIO(text.lstrip("\ufeff")), strict=True) if c), 1)
            try:
                _, head = next(records, (0, None))
                if head is None:
                    return
                self._check_head(head, where, with_label)
                for number, cells in records:
                    if len(cells) != len(head):
                        raise OutputError(
                            f"{where} record {number} has {len(cells)} cells, not {len(head)}; choose a new "
                            + "{out}.",
                            field="out",
                        )
                    cell = cells[1]
                    try:
                        quality = float(cell) if cell.strip() else None
                    except ValueError:
                        raise OutputError(
                            f"{where} record {number}: quality {cell[:60]!r} is not a number.", field="out"
                        ) from None
                    yield cells, quality
            except csv.Error as error:
                raise OutputError(
                    f"{where} is not a valid CSV ({error}); choose a new " + "{out}.", field="out"
                ) from None
        finally:
            csv.field_size_limit(limit)

    def _check_head(self, head: list[str], where: str, with_label: bool | None) -> None:
        want = columns(with_label) if with_label is not None else None
        if want is not None and head != want:
            raise OutputError(
                f"{where} has columns {head}, not {want}; it comes from another kind of run, so choose a new "
                + "{out}.",
                field="out",
            )
        if head not in (columns(False), columns(True)):
            raise OutputError(f"{where} has columns {head}, not {columns(True)}; it is not a score CSV.", field="out")


class ReferenceFormat(ResultFormat):
    """The authors' `<id> <score>` lines (also CR-FIQA's); `nan` for a failed row, which keeps no error.

    Nothing is quoted or escaped (the authors' readers take the text as it is): an id may hold spaces
    (the score follows the last one) and starts as it likes, but an id holding a line break is refused
    (`check_id`), since their readers split lines on '\\r' and others too.
    """

    name, suffix = "reference", ".txt"
    help = "the authors' '<id> <score>' lines"

    def header(self, with_label: bool) -> str:
        return ""

    def check_id(self, image_id: str) -> None:
        if not _LINE_BREAKS.isdisjoint(image_id):
            raise OutputError(
                f"the id {image_id!r} holds a line break, which the reference format cannot hold; use "
                + "{format} csv, which quotes it.",
                field="format",
            )
        if image_id.startswith("\ufeff"):  # at the file's start it reads as the mark an editor adds, and is dropped
            raise OutputError(
                f"the id {image_id!r} starts with a byte-order mark (U+FEFF), which the reference format cannot tell "
                "from one an editor adds; use " + "{format} csv, whose header comes first.",
                field="format",
            )

    def write_rows(self, file, rows: Sequence[Row], with_label: bool) -> None:
        rows = [_rendered(r) for r in rows]
        for r in rows:
            self.check_id(r.id)
        file.write("".join(f"{r.id} {'nan' if r.quality is None else format(r.quality, '.15f')}\n" for r in rows))

    def matches(self, text: str) -> bool:
        return not CSV.matches(text)

    def parse(self, text: str, where: str, with_label: bool | None = None) -> list[Row]:
        if CSV.matches(text):
            raise OutputError(f"{where} is a CSV, not a {self.name}-format file; choose a new " + "{out}.", field="out")
        rows = []
        # Lines end at '\n' only (files written before ids with line breaks were refused may hold other ones);
        # a '\r' before it is a Windows line end.
        for number, line in enumerate(text.lstrip("\ufeff").split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            # The score follows the LAST space: an id may end in spaces or tabs, and resuming must read it as written.
            ident, space, score = line.rstrip().rpartition(" ")
            parts = [ident, score] if space else line.rsplit(maxsplit=1)  # a tab-separated file of another tool
            try:
                value = float(parts[1])
            except (IndexError, ValueError):
                raise OutputError(
                    f"{where} line {number} is not '<id> <score>' ({line[:60]!r}); choose a new " + "{out}.",
                    field="out",
                ) from None
            rows.append(Row(parts[0], value if math.isfinite(value) else None))  # 'nan': a failed row
        return rows


CSV, REFERENCE = CsvFormat(), ReferenceFormat()
FORMATS: dict[str, ResultFormat] = {f.name: f for f in (CSV, REFERENCE)}


def _format(name: str) -> ResultFormat:
    if name not in FORMATS:
        raise OutputError("unknown {format} " + f"{name!r}; choose one of {', '.join(FORMATS)}.", field="format")
    return FORMATS[name]


def check_ids(ids: Sequence[str], fmt: str) -> list[str]:
    """Returns the rendered ids (`render_id`); raises OutputError for the first one format `fmt` cannot hold.

    For refusing a source before any work starts (a writer refuses such a row only when it comes).
    """
    form = _format(fmt)
    shown = [render_id(i) for i in ids]
    for image_id in shown:
        form.check_id(image_id)
    return shown


def _read_text(path: Path, follow: bool = True) -> str:
    """Returns the file's text; a UTF-8 character torn at its very end (a crash mid-write) is left out.

    follow: False refuses a link at `path` (OutputError), for a file about to be changed.
    """
    return _read(path, follow)[0]


def _read(path: Path, follow: bool = True) -> tuple[str, int]:
    """Returns `_read_text(path, follow)` and the number of bytes that text takes in the file.

    Only a regular file is read: a FIFO would be waited on forever, a device (/dev/zero) read without end.
    """
    try:
        fd = files.open_regular(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    except files.NotRegularFileError as error:
        raise OutputError(f"{path} is {error.kind}, not a result file.") from None
    except OSError as error:
        if error.errno == errno.ELOOP and not follow and os.path.islink(path):
            raise _link_error(path, "out") from None
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError as error:
        if error.end == len(data) and error.reason == "unexpected end of data":
            return data[: error.start].decode("utf-8"), error.start
        raise OutputError(
            f"{path} is not a text file written by this tool; choose a new " + "{out}.", field="out"
        ) from None


def _complete_text(path: Path, form: ResultFormat | None = None, follow: bool = True) -> str:
    """Returns the complete records of the file at `path` (`form` None: recognised from the content)."""
    text = _read_text(path, follow)
    form = form or (CSV if CSV.matches(text) else REFERENCE)
    return text[: _complete(form, text, str(path))]


def _complete(form: ResultFormat, text: str, where: str) -> int:
    """Returns `form.complete(text)`; OutputError when what follows is more than one torn record."""
    end = form.complete(text)
    if not form.torn(text[end:]):
        raise OutputError(
            f"{where} has records ending in a carriage return alone (old Mac line ends), which this tool never "
            "writes; convert its line ends to LF or CRLF, or choose a new " + "{out}.",
            field="out",
        )
    return end


def read_results(path: str | Path, fmt: str | None = None) -> list[Row]:
    """Returns the rows of a result file (`fmt` None: parquet or csv by their start, else reference).

    A torn last record (a crash mid-write) is ignored. Raises OutputError for a file that is not of the format.
    Ids (and labels, errors) are returned as written: rendered (`render_id`), CSV apostrophes removed.
    """
    path = Path(path)
    if fmt == "parquet" or (fmt is None and _starts_with(path, b"PAR1")):
        from vitnt_jax import parquet

        return parquet.read_rows(path)
    try:
        text = _read_text(path)
    except FileNotFoundError:
        raise OutputError(f"{path} does not exist; check the path.") from None
    form = _format(fmt) if fmt is not None else (CSV if CSV.matches(text) else REFERENCE)
    return form.parse(text[: _complete(form, text, str(path))], str(path))


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(files.open_regular(path), "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False  # the text reader says what is wrong with it


def _write_error(path: Path, error: OSError, again: str = "rerun with {resume}") -> OutputError:
    """Returns the one-sentence OutputError for a failed write to `path` (a full disk above all)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk is full ({error.strerror or 'no space left'}); free space, then {again}."
    else:
        why = f"{error.strerror or error}; fix that, then {again}."
    return OutputError(f"cannot write {path}: {why}", field="resume" if "{resume}" in again else None)


def write_results(
    path: str | Path,
    rows: Sequence[Row],
    *,
    fmt: str = "csv",
    with_label: bool = False,
    overwrite: bool = False,
    lock: bool = True,
) -> None:
    """Writes a whole result file at once (atomically: a temporary file renamed over `path`).

    Refuses an existing `path` unless `overwrite`. For tables computed whole (baselines, ablations).
    lock: hold `lock_output(path)` while writing. A failed write (a full disk) leaves `path` as it was
    and no temporary file.
    """
    path = Path(path)
    form = _format(fmt)
    held = lock_output(path) if lock else None
    try:
        if path.exists() and not overwrite:
            raise OutputError(
                f"{path} already exists; pass " + "{overwrite} to replace it, or choose another {out}.",
                field="out",
                also=("overwrite",),
            )
        rows = [_rendered(r) for r in rows]
        for r in rows:
            form.check_id(r.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        try:
            with _create(tmp, "w", newline="", encoding="utf-8") as f:
                f.write(form.header(with_label))
                form.write_rows(f, rows, with_label)
                _sync(f)
            os.replace(tmp, path)
        except OSError as error:
            _discard(tmp)
            raise _write_error(path, error, "run it again") from None
    finally:
        if held is not None:
            held.release()


def read_ids(path: Path, fmt: str, header: list[str]) -> list[str]:
    """Returns the (rendered) ids already written to `path`, after cutting a torn last record off the file.

    The file is checked to be one of ours, of the same format and columns, BEFORE anything in it
    is changed; a file with no complete record yet counts as empty. A torn record is cut by the
    format's own rules (for CSV, a crash inside a quoted id holding a line break included).
    """
    form = _format(fmt)
    text, size = _read(path, follow=False)
    end = _complete(form, text, str(path))
    ids = form.ids(text[:end], str(path), with_label=len(header) == 4)
    size -= len(text[end:].encode("utf-8"))  # only the torn tail is encoded again: a table may be gigabytes
    del text
    if size != path.stat().st_size:
        try:
            with _open(path, "r+b") as f:
                f.truncate(size)
        except OSError as error:
            raise _write_error(path, error) from None
    return ids


class ArraySink:
    """Appends fixed-shape float32 rows to PATH.partial; `finish` writes PATH as .npy.

    The partial file starts with an .npy header naming the row shape (and 0 rows), so a resume with rows of
    another shape (another model's embedding size) is refused; a partial file written before it had the
    header holds the rows only and resumes as before. what: the setting PATH came from, for messages.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], rows_done: int, resume: bool, what: str | None = None):
        self.path, self.row_shape, self.what = path, tuple(row_shape), what
        self.partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.row_bytes = int(np.prod(self.row_shape)) * 4
        self.file = None
        self.offset = 0  # where the rows start in the partial file (after its header)
        try:
            if resume and not self.partial.exists() and path.exists():
                self._unfinish(rows_done)
            if resume and self.partial.exists() and rows_done:  # with no rows to keep, it is made afresh
                with _open(self.partial, "r+b", what) as f:
                    self.offset = self._check_header(f)
                    have = (os.fstat(f.fileno()).st_size - self.offset) // self.row_bytes
                    if have < rows_done:
                        raise OutputError(
                            f"{self.partial} holds {have} rows but the table holds {rows_done}; the array file "
                            "belongs to another run: remove it or start again without resuming."
                        )
                    f.truncate(self.offset + rows_done * self.row_bytes)  # rows written after the table's last flush
            else:
                if rows_done:
                    raise OutputError(
                        f"neither {self.path} nor {self.partial} exists but the table holds {rows_done} rows, so their "
                        "arrays were not saved (arrays are saved from a run's start): start again without resuming, "
                        "or resume without saving them."
                    )
                self.partial.unlink(missing_ok=True)  # a link there goes, never its target
                with _open(self.partial, "wb", what) as f:
                    self.offset = self._write_header(f)
            self.file = _open(self.partial, "ab", what)
        except OSError as error:
            raise _write_error(self.partial, error) from None

    def _write_header(self, f) -> int:
        np.lib.format.write_array_header_1_0(f, _npy_header((0, *self.row_shape)))
        f.flush()
        return f.tell()

    def _check_header(self, f) -> int:
        """Returns where the rows start in the open partial file; OutputError for a header of another shape."""
        if f.read(6) != b"\x93NUMPY":
            return 0  # written before partial files had a header: rows only
        f.seek(0)
        try:
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        except Exception:  # numpy raises ValueError, SyntaxError or TokenError for a broken header
            raise OutputError(
                f"{self.partial} has a damaged header; remove it and start again without resuming."
            ) from None
        if dtype != np.float32 or fortran or tuple(shape[1:]) != self.row_shape:
            raise OutputError(
                f"{self.partial} holds {dtype} rows of shape {tuple(shape[1:])}, not float32 rows of shape "
                f"{self.row_shape} (another model or setting wrote it); start again without resuming, or choose "
                "another path."
            )
        return f.tell()

    def _unfinish(self, rows_done: int) -> None:
        try:
            array = _memmap(self.path)
        except Exception as error:  # a damaged header: ValueError, SyntaxError, TokenError, EOFError, ...
            raise OutputError(
                f"{self.path} is not a readable .npy file ({error}); remove it and start again without resuming."
            ) from None
        if array.dtype != np.float32 or array.ndim < 1 or array.shape[1:] != self.row_shape:
            raise OutputError(
                f"{self.path} holds {array.dtype} rows of shape {array.shape[1:]}, not float32 rows of shape "
                f"{self.row_shape}; choose a new path."
            )
        if array.shape[0] < rows_done:
            raise OutputError(
                f"{self.path} holds {array.shape[0]} rows but the table holds {rows_done}; the array file belongs "
                "to another run: remove it or start again without resuming."
            )
        # Made beside it and renamed: a half-made copy (a kill) must never pass for the rows written.
        tmp = self.path.with_name(self.path.name + ".tmp.npy")
        try:
            with _create(tmp, "wb", self.what) as f:
                self._write_header(f)
                _copy_rows(f, [array[:rows_done]])
            os.replace(tmp, self.partial)
        except BaseException:
            _discard(tmp)
            raise

    def append(self, rows: np.ndarray) -> None:
        try:
            self.file.write(np.ascontiguousarray(rows, np.float32).tobytes())
        except OSError as error:
            raise _write_error(self.partial, error) from None

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            raise _write_error(self.partial, error) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def finish(self) -> None:
        """Writes PATH (.npy) from the partial rows and removes the partial file.

        A failed write (a full disk) raises OutputError, leaves no temporary file and keeps the partial rows.
        """
        self.close()
        n = (self.partial.stat().st_size - self.offset) // self.row_bytes
        data = np.memmap(self.partial, np.float32, "r", self.offset, (n, *self.row_shape)) if n else None
        tmp = self.path.with_name(self.path.name + ".tmp.npy")
        try:
            _write_npy(tmp, (n, *self.row_shape), [data] if n else [], self.what)
            os.replace(tmp, self.path)
        except OSError as error:
            _discard(tmp)
            raise _write_error(self.path, error) from None
        except BaseException:
            _discard(tmp)
            raise
        finally:
            del data
        self.partial.unlink()


_CHUNK_BYTES = 1 << 24


def _copy_rows(file, arrays: Sequence[np.ndarray]) -> None:
    """Writes the float32 rows of each array to `file` in pieces of about 16 MiB (ordinary writes: a full
    disk is an OSError, never the SIGBUS a memory map would get)."""
    for array in arrays:
        step = max(1, _CHUNK_BYTES // max(1, array[0].nbytes if len(array) else 1))
        for start in range(0, len(array), step):
            file.write(np.ascontiguousarray(array[start : start + step], np.float32).tobytes())


def _discard(path: Path) -> None:
    """Removes the temporary at `path` if it is one (a file; a link or a folder there is not ours to remove)."""
    try:
        if path.is_file() and not path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _npy_header(shape: tuple[int, ...]) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}


def _write_npy(path: Path, shape: tuple[int, ...], arrays: Sequence[np.ndarray], what: str | None = None) -> None:
    """Writes a float32 .npy of `shape` as a new file at `path` (never through a link) from `arrays` stacked."""
    with _create(path, "wb", what) as f:
        np.lib.format.write_array_header_1_0(f, _npy_header(shape))
        _copy_rows(f, arrays)
        _sync(f)


def _sync(file) -> None:
    """Flushes `file` to the disk: a file about to be renamed onto its final name is whole there first."""
    file.flush()
    os.fsync(file.fileno())


def refuse_existing(path: Path) -> None:
    """Raises OutputError if a result file exists at `path` (to be continued or replaced only when asked)."""
    if path.exists():
        raise OutputError(
            f"{path} already exists; pass " + "{resume} to continue it, {overwrite} to replace it, or choose "
            "another {out}.",
            field="out",
            also=("resume", "overwrite"),
        )


# The settings the pipeline gives the array files as (the names of a lock's message).
_ARRAY_FIELDS = {"embedding": "save_embeddings", "patch_quality": "save_patch_quality"}


class ResultWriter:
    """Writes rows (and row-aligned arrays) for one output; see the module docstring.

    lock: True (default) takes `lock_output` on the table and on every array file BEFORE anything is read,
      truncated or replaced, and releases them in `close`, so a second writer (a --resume, or an --overwrite
      that would destroy this run's rows) is refused in one line; an OutputLock already held by the caller
      (e.g. for a whole multi-process run, merge included) is used as the table's lock and left held by
      `close` (array files are then locked here); False takes none.
    """

    def __init__(
        self,
        path: Path,
        *,
        fmt: str = "csv",
        with_label: bool = False,
        arrays: dict[str, tuple[Path, tuple[int, ...]]] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        lock: bool | OutputLock = True,
    ):
        self.path, self.fmt = path, fmt
        self.format = _format(fmt)
        self.header = columns(with_label)
        self.with_label = with_label
        self.locks: list[OutputLock] = []  # the locks this writer took (released by close)
        self.file = None
        self.sinks: dict[str, ArraySink] = {}
        try:
            if lock is not False:
                if isinstance(lock, OutputLock):
                    if not lock.held:
                        raise ValueError(f"the lock given for {path} is not held")
                else:
                    self.locks.append(lock_output(path, "out"))
                for name, (p, _) in (arrays or {}).items():
                    self.locks.append(lock_output(p, _ARRAY_FIELDS.get(name)))
            self._open(path, arrays or {}, resume, overwrite, with_label)
        except BaseException:
            self._release()
            raise

    def _open(self, path: Path, arrays, resume: bool, overwrite: bool, with_label: bool) -> None:
        if path.is_symlink():
            raise _link_error(path, "out")
        exists = path.exists()
        if not (resume or overwrite):
            refuse_existing(path)
        self.done_ids: list[str] = read_ids(path, self.fmt, self.header) if (exists and resume) else []
        if len(set(self.done_ids)) != len(self.done_ids):
            seen: set[str] = set()
            twice = next(i for i in self.done_ids if i in seen or seen.add(i))
            raise OutputError(
                f"{path} already holds the id {twice[:200]!r} twice; it was not written by one run of this tool, so "
                "resuming it could not tell which row counts: choose a new " + "{out}.",
                field="out",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file cut off before its header was complete holds nothing: start it afresh.
        fresh = not (exists and resume) or path.stat().st_size == 0
        try:
            self.file = _open(path, "w" if fresh else "a", newline="", encoding="utf-8")
            if fresh:
                self.file.write(self.format.header(with_label))
                self.file.flush()  # before the first batch (and its compilation) can be interrupted
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise  # a path that cannot be written at all: the caller names the setting to change
            raise _write_error(path, error) from None
        self.sinks = {
            name: ArraySink(p, shape, len(self.done_ids), not fresh, _ARRAY_FIELDS.get(name))
            for name, (p, shape) in arrays.items()
        }

    def write(self, rows: Sequence[Row], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Appends rows (and their array rows, written first) and flushes both to disk.

        Ids, labels and errors are written rendered (`render_id`). Raises OutputError, writing nothing, for
        an id the format cannot hold, and OutputError naming the file when a write fails (a full disk):
        what reached the disk is then cut back to the last complete row by the next --resume.
        """
        rows = [_rendered(r) for r in rows]
        for r in rows:
            self.format.check_id(r.id)
        for name, sink in self.sinks.items():
            sink.append(arrays[name])
            sink.flush()
        try:
            self.format.write_rows(self.file, rows, self.with_label)
            self.file.flush()
        except OSError as error:
            raise _write_error(self.path, error) from None

    def close(self, finished: bool) -> None:
        """Closes the files and releases the locks it took; when `finished`, the array files become .npy files.

        Not `finished` (the run stops on an error): a failure to flush what a failed write left buffered
        is not raised over that error; whatever reached the disk is cut back by the next --resume.
        """
        problem = None
        try:
            for closing, where in [(self.file, self.path), *((s, s.partial) for s in self.sinks.values())]:
                try:
                    if closing is not None:
                        closing.close()
                except OSError as error:
                    problem = problem or _write_error(where, error)
            if finished and problem is None:
                for sink in self.sinks.values():
                    sink.finish()
            if finished and problem is not None:
                raise problem
        finally:
            self._release()

    def _release(self) -> None:
        for held in reversed(self.locks):
            held.release()
        self.locks = []


def part_path(path: Path, index: int, count: int) -> Path:
    """Returns the path of process `index`'s part of `path` (multi-process runs)."""
    return path.with_name(f"{path.name}.part{index:05d}-of-{count:05d}")


def merge_parts(out: Path, count: int, fmt: str, arrays: Sequence[Path], *, append: bool = False) -> int:
    """Concatenates the parts of `count` processes into `out` (and each array file); returns the rows added.

    append: keep what `out` (and each array file) already holds and add the parts after it
    (a --resume of a finished multi-process run). Refuses, changing nothing, a missing part, parts whose
    table and arrays disagree, arrays of another shape, and an id that two parts (or a part and `out`)
    both hold. A part whose ids `out` already holds, every one, is the leftover of a merge killed while it
    removed the parts: it is not added again. Rows are copied byte for byte (each part's complete records,
    as its format parses them, so quoted and escaped ids stay as written). Every merged file is written
    whole beside its target first and only then renamed over it, the table last: a failed write (a full
    disk) changes nothing, removes its temporary files, keeps every part and raises OutputError; a merge
    killed at any point is finished by merging again. Takes no lock: a caller merging while others may
    run holds `lock_output(out)`.
    """
    form = _format(fmt)
    kept, have = "", []
    if append and out.exists():
        kept = _complete_text(out, form, follow=False)
        have = form.ids(kept, str(out))
    seen = dict.fromkeys(have, -1)  # id -> the part holding it (-1: out)
    heads, texts, counts, merged = [], [], [], []
    for i in range(count):
        # Read as written (no newline translation), rows counted as the format parses them: an id may hold '\n'.
        path = part_path(out, i, count)
        try:
            whole, size = _read(path, follow=False)
            if form.complete(whole) != len(whole) or size != path.stat().st_size:
                raise OutputError(
                    f"part {i} of {out} ({path}) ends in a torn record, so its process did not finish it: rerun all "
                    "processes with " + "{resume}.",
                    field="resume",
                )
        except FileNotFoundError:
            raise OutputError(
                f"part {i} of {out} ({path}) is missing; rerun all processes with " + "{resume}.", field="resume"
            ) from None
        ids = form.ids(whole, str(path))
        body = form.body(whole)
        heads.append(whole[: len(whole) - len(body)])
        counts.append(len(ids))
        again = [k for k in ids if seen.get(k) == -1]
        if ids and len(again) == len(ids) and len(set(ids)) == len(ids):
            merged.append(False)  # left by a merge that was killed after renaming: already in out
            texts.append("")
            continue
        for k in ids:
            if k in seen:
                where = f"{out}" if seen[k] == -1 else f"part {seen[k]}"
                raise OutputError(
                    f"part {i} of {out} holds the id {k[:200]!r} that {where} holds too; the parts do not come "
                    "from one run: remove them and rerun all processes with " + "{resume}.",
                    field="resume",
                )
            seen[k] = i
        merged.append(True)
        texts.append(body)
    shapes = {}
    for path in arrays:
        for i in (i for i in range(count) if merged[i]):
            part = _load_npy(part_path(path, i, count), f"part {i} of {path}")
            if part.shape[0] != counts[i]:
                raise OutputError(
                    f"part {i} of {path} holds {part.shape[0]} rows but its table {counts[i]}; rerun that process "
                    "resuming it."
                )
            if shapes.setdefault(path, part.shape[1:]) != part.shape[1:]:
                raise OutputError(
                    f"part {i} of {path} has rows of shape {part.shape[1:]}, not {shapes[path]} as part 0; the parts "
                    "do not come from one run: remove them and rerun all processes."
                )
    temps: list[tuple[Path, Path]] = []  # (temporary, target), renamed only once all are written
    try:
        tmp = out.with_name(out.name + ".merging")
        temps.append((tmp, out))
        with _create(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(kept if kept else heads[0])
            for text in texts:
                f.write(text)
            _sync(f)
        for path in arrays:
            parts = [_memmap(part_path(path, i, count)) for i in range(count) if merged[i]]
            if kept:
                if not path.exists():
                    raise OutputError(
                        f"{path} does not exist but {out} holds {len(have)} rows, so their arrays were not saved "
                        "(arrays are saved from a run's start): start again without resuming, or resume without "
                        "saving them."
                    )
                before = _load_npy(path, str(path))
                if before.shape[0] < len(have) or before.shape[1:] != shapes.setdefault(path, before.shape[1:]):
                    raise OutputError(
                        f"{path} holds {before.shape[0]} rows of shape {before.shape[1:]} but {out} {len(have)} and "
                        f"the parts rows of shape {shapes[path]}; it belongs to another run: choose a new " + "{out}.",
                        field="out",
                    )
                parts.insert(0, before[: len(have)])  # rows after those: a merge killed between its renames
            tmp_npy = path.with_name(path.name + ".merging.npy")
            temps.append((tmp_npy, path))
            _write_npy(tmp_npy, (sum(p.shape[0] for p in parts), *shapes[path]), parts)
            del parts
    except BaseException as error:
        for tmp, _ in temps:
            _discard(tmp)
        if isinstance(error, OSError):
            raise _write_error(temps[-1][1], error) from None
        raise
    for tmp, target in reversed(temps):  # the table last: once it names the rows, the arrays hold them
        os.replace(tmp, target)
    for i in range(count):
        for path in (out, *arrays):  # the table's part first: arrays left without it are replaced by a resume
            part_path(path, i, count).unlink(missing_ok=True)
    return sum(c for c, m in zip(counts, merged, strict=True) if m)


def _load_npy(path: Path, what: str) -> np.ndarray:
    """Returns the float32 .npy at `path` as a read-only memory map; OutputError naming `what` otherwise."""
    try:
        array = _memmap(path)
    except FileNotFoundError:
        raise OutputError(
            f"{what} ({path}) is missing; rerun all processes with " + "{resume}.", field="resume"
        ) from None
    except Exception as error:  # a damaged header: ValueError, SyntaxError, TokenError, EOFError, ...
        raise OutputError(f"{what} ({path}) is not a readable .npy file ({error}); rerun that process.") from None
    if array.dtype != np.float32 or array.ndim < 1:
        raise OutputError(f"{what} ({path}) holds {array.dtype} of shape {array.shape}, not float32 rows.")
    return array
