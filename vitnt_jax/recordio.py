"""insightface / MXNet RecordIO (`train.rec` with `train.idx` beside it), read without MXNet.

Format (dmlc-core's recordio, the one MXNet and insightface write):

- `.idx`: text lines `key<TAB>offset` (decimal), the byte offset of the record of each key in the `.rec`.
  It is the `.rec` path with its suffix replaced by `.idx` (`train.rec` -> `train.idx`; a path without a
  suffix gets `.idx` appended).
- `.rec`: records one after the other, each a frame `uint32 magic 0xced7230a`, `uint32 lrecord` =
  `(cflag << 29) | length`, then `length` bytes padded with zeros to a multiple of 4 (little-endian).
  cflag 0 is a whole record; a record whose bytes hold the magic word at a 4-aligned position is
  written as several frames, cflag 1 (first), 2 (middle), 3 (last), the magic word dropped at each
  cut: the reader joins the parts with the magic word between them.
- A record's payload: the IRHeader `struct 'IfQQ'` (flag, label, id, id2; 24 bytes), then, when
  flag > 0, `flag` float32 labels (they replace the scalar label), then the image bytes.

Layouts. insightface training sets: record 0 is a header-only record with flag > 0 and labels
[a, b]: the images are keys 1 .. a-1, records a .. b-1 are identity-range headers (no rows).
A plain im2rec file (no key 0, or a key 0 that is not a header-only record with labels): every
indexed key is an image, in key order.

Rows. id = the key as a decimal string; label = the header's label, an integer when integral
("3", not "3.0"), else repr of the float32 value as a Python float; a record with flag > 0 gets its
labels joined by ";". A damaged record is that key's error row (ImageError naming the byte offset);
an image key the index lacks (insightface layout) is an error row too; the label of an error row is "".

`open_rec` returns `vitnt_jax.sources.Pieces`: piece k holds `piece_rows` consecutive image keys and
reads their bytes with one ranged read where their records lie together in the file.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vitnt_jax import storage
from vitnt_jax.data import ImageError, read_image
from vitnt_jax.sources import Piece, Pieces, Source, SourceError, shown

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME = struct.Struct("<II")  # magic, lrecord
IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
LENGTH_MASK = (1 << 29) - 1

# The .idx is read in blocks of this many bytes; a valid line is at most 18 + 1 + 18 + 2 bytes.
INDEX_BLOCK = 1 << 20
_MAX_DIGITS = 18
_MAX_LINE = 2 * _MAX_DIGITS + 3
# A piece whose records span more than this is read record by record (only the bytes each record claims).
MAX_RANGE = 1 << 30
# The most float32 labels a record's header may carry (landmark sets have ~10..200); more is an error row.
MAX_LABELS = 1024
# float32 holds every integer up to 2^24 exactly: an insightface header above it is only approximate.
_FLOAT32_EXACT = 1 << 24
# A record in more frames than this is an error row: dmlc-core cuts one only at a 4-aligned magic word inside it
# (a random image holds one with odds of 1 in 2^30 a KB); 8-byte empty frames would otherwise cost ~300 bytes of
# memory and ~60 us each.
MAX_PARTS = 4096
# A record claiming more bytes than this is an error row, its bytes not read (a face image is kilobytes); the
# same limit as an image object on storage (vitnt_jax.data.MAX_OBJECT_BYTES).
MAX_RECORD_BYTES = 256 << 20


def _fail(message: str, *, also: tuple[str, ...] = ()) -> SourceError:
    return SourceError("{rec} " + message, field="rec", also=also)


def index_path(location: str | os.PathLike) -> str:
    """Returns the `.idx` beside a `.rec`: its last suffix replaced by `.idx` (appended when it has none)."""
    location = os.fspath(location)
    cut = location.rfind("/") + 1
    folder, name = location[:cut], location[cut:]
    stem = name[: name.rfind(".")] if name.rfind(".") > 0 else name
    return folder + stem + ".idx"


@dataclass(frozen=True)
class IRHeader:
    """A record's header: flag (number of float32 labels, 0: the scalar label holds), label, id, id2."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def label_text(label: float | tuple[float, ...]) -> str:
    """Returns a label as the label column writes it: "3" for an integral value, repr otherwise; ";" between several."""
    if isinstance(label, tuple):
        return ";".join(label_text(x) for x in label)
    value = float(label)
    return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)


@dataclass
class Index:
    """A parsed `.idx`: keys (sorted, int64), offsets (int64, of each key), file_order (the distinct
    offsets sorted, or None when offsets already grow with the keys), sha256 and size of the text."""

    keys: np.ndarray
    offsets: np.ndarray
    file_order: np.ndarray | None
    sha256: str
    size: int

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (where, present): each key's position in `self.keys` and whether it is indexed."""
        where = np.searchsorted(self.keys, keys)
        clipped = np.minimum(where, len(self.keys) - 1)
        return clipped, (where < len(self.keys)) & (self.keys[clipped] == keys)

    def in_file_order(self) -> np.ndarray:
        """Returns the distinct record offsets, sorted."""
        return self.offsets if self.file_order is None else self.file_order


def _bad_line(block: bytes, first_line: int, path: str) -> SourceError:
    """Returns the refusal naming the first malformed line of `block` (line numbers from `first_line`)."""
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    for number, line in enumerate(lines, first_line):
        text = line[:-1] if line.endswith(b"\r") else line
        key, tab, offset = text.partition(b"\t")
        good = (
            tab
            and 0 < len(key) <= _MAX_DIGITS
            and 0 < len(offset) <= _MAX_DIGITS
            and key.isdigit()
            and offset.isdigit()
            and key.isascii()
            and offset.isascii()
        )
        if not good:
            return _fail(
                f"index {path} line {number} is not 'KEY<TAB>OFFSET' (two decimal numbers): "
                f"{shown(line.decode('latin-1'), 80)}; write the index again (MXNet's im2rec or insightface's tools)."
            )
    return _fail(f"index {path} holds a malformed line after line {first_line}; write the index again.")


def _parse_block(block: bytes, first_line: int, path: str) -> np.ndarray:
    """Returns the (2n,) int64 key, offset pairs of `block` (whole lines, each ending in '\\n'); refuses a bad line."""
    a = np.frombuffer(block, np.uint8)
    newline = np.flatnonzero(a == 10)
    tab = np.flatnonzero(a == 9)
    n = len(newline)
    if len(tab) != n:
        raise _bad_line(block, first_line, path)
    start = np.empty(n, np.int64)
    start[0] = 0
    start[1:] = newline[:-1] + 1
    end = newline - (a[newline - 1] == 13) if n else newline  # a '\r' before the '\n' is allowed
    ok = (tab > start) & (tab - start <= _MAX_DIGITS) & (end > tab + 1) & (end - tab - 1 <= _MAX_DIGITS)
    # Every byte but the tab, the newline and an optional '\r' before it is a decimal digit.
    others = np.count_nonzero((a - np.uint8(48)) > 9)
    if not ok.all() or others != 2 * n + int(np.count_nonzero(end != newline)):
        raise _bad_line(block, first_line, path)
    try:  # validated above: digits, tab and newline only
        values = np.fromstring(block, dtype=np.int64, sep=" ")
    except (AttributeError, TypeError, ValueError, DeprecationWarning):  # a numpy without text fromstring
        values = np.array(block.split()).astype(np.int64)
    if len(values) != 2 * n:
        raise _bad_line(block, first_line, path)
    return values


def read_index(path: str) -> Index:
    """Parses a `.idx` block by block into int64 arrays (16 bytes a record); refuses a malformed index.

    Refused, in one sentence each: a malformed line (named by its number: two decimal numbers of at
    most 18 digits, a tab between, '\n' or '\r\n' after), a duplicate key, an empty index. An offset
    past the end of the `.rec` is not refused here: that record's row is an error (the file is cut short).
    """
    size = storage.size(path)
    capacity = size // 4 + 1  # a line is at least 4 bytes ("0\t0\n"); pages are touched only as lines fill them
    keys = np.empty(capacity, np.int64)
    offsets = np.empty(capacity, np.int64)
    digest = hashlib.sha256()
    count, line, carry = 0, 1, b""
    with storage.open_read(path) as f:
        while True:
            data = f.read(INDEX_BLOCK)
            digest.update(data)
            if not data:
                if carry:
                    data, carry = carry + b"\n", b""
                else:
                    break
            else:
                data = carry + data
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
                if len(carry) > _MAX_LINE:
                    raise _bad_line(carry, line + data.count(b"\n"), path)
                if not data:
                    continue
            values = _parse_block(data, line, path)
            n = len(values) // 2
            if count + n > capacity:  # the file grew while it was read
                raise _fail(f"index {path} changed while it was read; rerun when nothing writes it.")
            keys[count : count + n] = values[0::2]
            offsets[count : count + n] = values[1::2]
            count += n
            line += n
    if count == 0:
        raise _fail(f"index {path} is empty; write the index of the .rec again (one 'KEY<TAB>OFFSET' line a record).")
    keys.resize((count,), refcheck=False)  # in place: the untouched tail is given back, nothing copied
    offsets.resize((count,), refcheck=False)
    if count > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        del order
        same = np.flatnonzero(keys[1:] == keys[:-1])
        if len(same):
            raise _fail(f"index {path} lists key {int(keys[same[0]])} twice; remove the duplicate line.")
    file_order = None
    if count > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
        file_order = np.unique(offsets)
    return Index(keys, offsets, file_order, digest.hexdigest(), size)


class _Bytes:
    """Reads file bytes for a record parser: from the runs read whole ([start, stop) each) or from the open file."""

    def __init__(self, location: str, runs: list[tuple[int, int, bytes]] = (), file=None):
        self.location, self.file = location, file
        self.starts = [start for start, _, _ in runs]
        self.stops = [stop for _, stop, _ in runs]
        self.views = [memoryview(data) for _, _, data in runs]

    def get(self, pos: int, n: int):
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.stops[i]:
            start = pos - self.starts[i]
            if start + n > len(self.views[i]):  # the run came back shorter than the file was
                raise _changed(self.location)
            return self.views[i][start : start + n]
        if self.file is None:
            raise _changed(self.location)
        data = _read_range(self.file, pos, n)
        if len(data) != n:
            raise _changed(self.location)
        return data


def _reason(error: BaseException) -> str:
    """Returns an error's text to put inside a sentence (no full stop of its own)."""
    return (str(error) or type(error).__name__).rstrip(".")


def _changed(location: str) -> SourceError:
    return _fail(
        f"{location} changed while it was read (it is shorter than when it was opened); rerun on a file nothing "
        "writes, with {resume}.",
        also=("resume",),
    )


def _read_range(f, start: int, n: int) -> bytes:
    """Returns up to `n` bytes of the open file `f` from `start`: on object storage ONE request for exactly them.

    A file opened by fsspec reads ahead (s3fs: 50 MiB past every read that misses its cache), which
    would double a piece's traffic and memory: its filesystem's ranged `cat_file` asks for the bytes
    wanted and no more.
    """
    fs, path = getattr(f, "fs", None), getattr(f, "path", None)
    if n <= 0:
        return b""
    if fs is not None and isinstance(path, str) and callable(getattr(fs, "cat_file", None)):
        data = fs.cat_file(path, start=start, end=start + n)
        if len(data) > n:  # a server that ignores the range sends the whole object: its bytes are not these
            raise OSError(f"the storage answered a request for {n} bytes from byte {start} with {len(data)} bytes")
        return data
    f.seek(start)
    return storage.read_exactly(f, n)


def _payload(source: _Bytes, offset: int, end: int, size: int):
    """Returns the payload of the record at `offset` (its parts joined); raises ImageError for a damaged one.

    end: where the bytes this record may use end (the next record's offset in file order, or the file end).
    """
    if offset >= size:
        raise ImageError(f"record at byte {offset} lies past the end of the .rec ({size} bytes): the file is cut short")
    pos, parts, claimed = offset, [], 0
    while True:
        if pos + 8 > end:
            if not parts and end >= size:
                raise ImageError(f"truncated record at byte {offset}: the file ends at byte {size}")
            if not parts:
                raise ImageError(
                    f"record at byte {offset} has {end - offset} bytes before the next record at byte {end}"
                )
            raise ImageError(f"truncated record at byte {offset}: its last part is missing (cut at byte {pos})")
        magic, lrecord = FRAME.unpack(source.get(pos, 8))
        if magic != MAGIC:
            raise ImageError(f"bad RecordIO magic 0x{magic:08x} at byte {pos}")
        cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
        if cflag > 3:
            raise ImageError(f"bad RecordIO part flag {cflag} at byte {pos} (0 to 3)")
        if not parts and cflag in (2, 3):
            raise ImageError(f"continuation out of order at byte {pos}: a record starts with part flag {cflag}")
        if parts and cflag in (0, 1):
            raise ImageError(
                f"continuation out of order at byte {pos}: part flag {cflag} before the last part of the record "
                f"at byte {offset}"
            )
        if pos + 8 + length > end:
            if end >= size:
                raise ImageError(
                    f"truncated record at byte {pos}: it claims {length} bytes, the file ends at byte {size}"
                )
            raise ImageError(f"record at byte {pos} claims {length} bytes, past the next record at byte {end}")
        claimed += length
        if claimed > MAX_RECORD_BYTES:
            raise ImageError(
                f"record at byte {offset} claims more than {MAX_RECORD_BYTES} bytes, above the limit; not read"
            )
        if len(parts) == MAX_PARTS:
            raise ImageError(f"record at byte {offset} is cut into more than {MAX_PARTS} parts; not read")
        parts.append(source.get(pos + 8, length))
        pos += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            break
    return parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)


def split_payload(payload, offset: int = 0) -> tuple[IRHeader, memoryview]:
    """Returns (header, image bytes) of a record's payload; raises ImageError when the header does not fit."""
    payload = memoryview(payload)
    if len(payload) < IRHEADER.size:
        raise ImageError(f"record at byte {offset} holds {len(payload)} bytes, shorter than the 24-byte IRHeader")
    flag, label, rid, rid2 = IRHEADER.unpack_from(payload)
    image = payload[IRHEADER.size :]
    if flag > 0:
        if 4 * flag > len(image):
            raise ImageError(
                f"record at byte {offset}: its IRHeader flag {flag} asks for {flag} float32 labels, past the end of "
                f"its {len(payload)} bytes"
            )
        if flag > MAX_LABELS:
            raise ImageError(
                f"record at byte {offset}: its IRHeader flag {flag} asks for more labels than the {MAX_LABELS} a "
                "label column takes"
            )
        label = tuple(float(x) for x in np.frombuffer(image, "<f4", flag))
        image = image[4 * flag :]
    return IRHeader(flag, label, rid, rid2), image


class RecordFile:
    """A `.rec` and its `.idx`, read by key. Opening parses the index (16 bytes a record) and reads no record."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.index_location = index_path(self.location)
        if self.location.endswith(".idx"):
            raise _fail(f"{self.location} is the index; pass the .rec file (its .idx is found beside it).")
        try:
            if not storage.exists(self.location):
                raise _fail(f"{self.location} does not exist; pass the .rec file of the RecordIO set.")
            if not storage.is_url(self.location) and not os.path.isfile(self.location):
                raise _fail(f"{self.location} is not a file; pass the .rec file of the RecordIO set.")
            if not storage.exists(self.index_location):
                raise _fail(
                    f"{self.location} has no index beside it ({self.index_location} does not exist); put the .idx "
                    "written with the .rec there (same name, suffix .idx)."
                )
            self.size = storage.size(self.location)
            self.index = read_index(self.index_location)
        except storage.StorageError as error:  # one sentence already, naming the file and the fix
            raise _fail(str(error)) from error
        except (OSError, ValueError, ImportError) as error:
            raise _fail(
                f"{self.location} cannot be read ({_reason(error)}); check the path and its permissions."
            ) from error
        first = int(self.index.in_file_order()[0])
        if first >= self.size:  # nothing it lists is in the file: not a cut-short file, another file's index
            raise _fail(
                f"{self.location} holds {self.size} bytes but its index {self.index_location} puts every record past "
                f"them (the first at byte {first}); the .idx belongs to another .rec."
            )

    def extents(self, offsets: np.ndarray) -> np.ndarray:
        """Returns where the bytes of the records at `offsets` end: the next record's offset, or the file end."""
        order = self.index.in_file_order()
        after = np.searchsorted(order, offsets, side="right")
        nxt = np.where(after < len(order), order[np.minimum(after, len(order) - 1)], self.size)
        return np.minimum(nxt, self.size)

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """Returns (header, image bytes) of `key`; KeyError when it is not indexed, ImageError when damaged."""
        where, present = self.index.positions(np.array([key], np.int64))
        if not present[0]:
            raise KeyError(key)
        offset = int(self.index.offsets[where[0]])
        end = int(self.extents(np.array([offset]))[0])
        with storage.open_read(self.location) as f:
            payload = _payload(_Bytes(self.location, file=f), offset, end, self.size)
            header, image = split_payload(payload, offset)
            return header, bytes(image)

    def read_keys(self, keys: np.ndarray) -> list[tuple[IRHeader, memoryview] | ImageError]:
        """Returns each key's (header, image bytes), or the ImageError saying why it cannot be read.

        The records are read with one ranged read a run of records next to each other in the file (no other
        indexed record between them: one read for a piece of a file MXNet writes), up to MAX_RANGE bytes a
        piece, the rest frame by frame; never more bytes than the file holds.
        """
        keys = np.asarray(keys, np.int64)
        where, present = self.index.positions(keys)
        offsets = self.index.offsets[where]
        ends = self.extents(offsets)
        inside = present & (offsets < self.size)
        results: list = [None] * len(keys)
        for j in np.flatnonzero(~present):
            results[j] = ImageError(f"key {int(keys[j])} is not in the index {self.index_location}")
        if inside.any():
            order = self.index.in_file_order()
            slots = np.unique(np.searchsorted(order, offsets[inside]))
            # Runs of records next to each other in the file (one run: every file MXNet writes; shuffled keys:
            # one run a record), each read with one ranged read while the piece's total stays within MAX_RANGE.
            bounds = [(int(run[0]), int(run[-1])) for run in np.split(slots, np.flatnonzero(np.diff(slots) != 1) + 1)]
            try:
                with storage.open_read(self.location) as f:
                    runs, budget = [], MAX_RANGE
                    for first, last in bounds:
                        start = int(order[first])
                        stop = int(self.extents(order[last : last + 1])[0])
                        if stop - start <= budget:
                            runs.append((start, stop, _read_range(f, start, stop - start)))
                            budget -= stop - start
                    source = _Bytes(self.location, runs, file=f)
                    self._parse(keys, present, offsets, ends, source, results)
            except OSError as error:  # the storage failed (a network error): no row is made up, the run stops
                raise _fail(
                    f"{self.location} could not be read ({_reason(error)}); check the storage and rerun with "
                    + "{resume}.",
                    also=("resume",),
                ) from error
        else:
            self._parse(keys, present, offsets, ends, None, results)
        return results

    def _parse(self, keys, present, offsets, ends, source, results) -> None:
        # Keys an index points at one record share its result: it is read and joined once, not once a key.
        done: dict[int, tuple[IRHeader, memoryview] | ImageError] = {}
        for j in range(len(keys)):
            if not present[j]:
                continue
            offset = int(offsets[j])
            if offset not in done:
                try:
                    payload = _payload(source, offset, int(ends[j]), self.size)
                    done[offset] = split_payload(payload, offset)
                except ImageError as error:
                    done[offset] = error
            results[j] = done[offset]


def _layout(records: RecordFile) -> tuple[str, int, int, list[str]]:
    """Returns ('insightface', a, b, notes) when record 0 is a header-only record with labels [a, b], else
    ('plain', 0, 0, []); notes: what the log should say about the header."""
    index = records.index
    _, present = index.positions(np.array([0], np.int64))
    if not present[0]:
        return "plain", 0, 0, []
    (found,) = records.read_keys(np.array([0], np.int64))
    if isinstance(found, ImageError):
        raise _fail(
            f"{records.location}: its record 0 (the header that says which layout it has) is damaged ({found}); "
            "repair or download the file again."
        )
    header, image = found
    if len(image) or header.flag == 0:
        return "plain", 0, 0, []
    values = header.label
    if (
        len(values) < 2
        or not all(math.isfinite(v) and v.is_integer() for v in values[:2])
        or not 1 <= values[0] <= values[1]
    ):
        raise _fail(
            f"{records.location}: its record 0 is a header whose labels {label_text(values)} are no key range [a, b) "
            "(insightface layout: images 1..a-1, identities a..b-1); repair the file or write it again."
        )
    a, b = int(values[0]), int(values[1])
    window, notes = _rounding(a), []
    if a - 1 - window > len(index):  # before any key near a is looked at (a float32 header reaches 3e38)
        raise _fail(
            f"{records.location}: its header names {a - 1} images but the index {records.index_location} lists "
            f"{len(index)} records; the .idx belongs to another .rec or is cut short."
        )
    if window:
        exact = _first_identity(records, a, window)
        if exact is None:
            notes.append(
                f"the header's image count {a - 1} is above 2^24, which its float32 label holds only approximately, "
                f"and no identity record within {window} keys of it says where the images end; keys near it may be "
                "miscounted"
            )
        else:
            a = exact
    if a - 1 > len(index):
        raise _fail(
            f"{records.location}: its header names {a - 1} images but the index {records.index_location} lists "
            f"{len(index)} records; the .idx belongs to another .rec or is cut short."
        )
    return "insightface", a, b, notes


def _rounding(a: int) -> int:
    """Returns how far the float32 label `a` of an insightface header may be from the true count (0: exact)."""
    return int(np.spacing(np.float32(a))) if a > _FLOAT32_EXACT else 0


def _first_identity(records: RecordFile, a: int, window: int) -> int | None:
    """Returns the key near `a` (within `window`) whose record is the first identity-range header ([1, end)), or None.

    Above 2^24 the header's float32 label is rounded (WebFace42M: to a multiple of 4); the identity
    records that follow the images say exactly where they start.
    """
    keys = np.arange(max(2, a - window), a + window + 1, dtype=np.int64)
    for key, found in zip(keys.tolist(), records.read_keys(keys), strict=True):
        if isinstance(found, ImageError):
            continue
        header, image = found
        if not len(image) and header.flag >= 2 and header.label[0] == 1.0:
            return key
    return None


def open_rec(location: str | os.PathLike, *, piece_rows: int) -> Pieces:
    """Returns an insightface/MXNet RecordIO set (`FILE.rec`, its `.idx` beside it) as Pieces of `piece_rows` images.

    Opening reads the index and record 0 only. Piece k holds image keys k*piece_rows .. in key order
    (insightface layout: from key 1); its read() reads their records (one ranged read where they lie
    together) and returns a Source: ids (the keys), labels, load(j) -> the decoded image.
    """
    if not isinstance(piece_rows, int) or piece_rows < 1:
        raise ValueError(f"piece_rows must be a positive integer, got {piece_rows!r}")
    records = RecordFile(location)
    index = records.index
    layout, a, b, problems = _layout(records)
    if layout == "insightface":
        count = a - 1
        in_images = int(np.searchsorted(index.keys, a) - np.searchsorted(index.keys, 1))
        if in_images < count:
            problems.append(
                f"{count - in_images} of the image keys 1..{a - 1} are not in the index {records.index_location}; "
                "their rows are errors"
            )
        outside = int(len(index) - np.searchsorted(index.keys, min(b, np.iinfo(np.int64).max)))
        if outside:
            problems.append(f"{outside} indexed keys from {b} on lie past the header's range 0..{b - 1}; not scored")

        def keys_of(k: int) -> np.ndarray:
            return np.arange(1 + k * piece_rows, min(a, 1 + (k + 1) * piece_rows), dtype=np.int64)

    else:
        count = len(index)

        def keys_of(k: int) -> np.ndarray:
            return index.keys[k * piece_rows : (k + 1) * piece_rows]

    shared = 0 if index.file_order is None else len(index) - len(index.file_order)
    if shared:
        problems.append(
            f"the index {records.index_location} points {shared} keys at a record another key points at too; each "
            "key gets its row, with that record's image (write the index again if that is wrong)"
        )
    past = int(np.count_nonzero(index.offsets >= records.size))
    if past:
        problems.append(
            f"{past} indexed records start past the end of {records.location} ({records.size} bytes): the file is cut "
            "short; their rows are errors (download it again)"
        )
    name = os.path.basename(records.location.rstrip("/")) or records.location

    def reader(k: int) -> Callable[[], Source]:
        def read() -> Source:
            keys = keys_of(k)
            found = records.read_keys(keys)
            ids = [str(int(x)) for x in keys]
            labels = ["" if isinstance(x, ImageError) else label_text(x[0].label) for x in found]

            def load(j: int) -> np.ndarray:
                item = found[j]
                if isinstance(item, ImageError):
                    raise ImageError(str(item))
                if len(item[1]) == 0:
                    raise ImageError(f"key {ids[j]} holds no image bytes (a header-only record)")
                return read_image(item[1])

            return Source(f"{name} keys {ids[0]}..{ids[-1]}" if ids else name, ids, labels, load)

        return read

    pieces = []
    for k in range(-(-count // piece_rows)):
        first = 1 + k * piece_rows if layout == "insightface" else int(index.keys[k * piece_rows])
        if layout == "insightface":
            last = min(a, 1 + (k + 1) * piece_rows) - 1
        else:
            last = int(index.keys[min((k + 1) * piece_rows, count) - 1])
        pieces.append(Piece(k, f"{name} keys {first}..{last}", min(piece_rows, count - k * piece_rows), reader(k)))
    title = "insightface layout" if layout == "insightface" else "plain im2rec layout"
    identity = (
        f"recordio {layout} layout, {count} images"
        + (f" (header {a}, {b})" if layout == "insightface" else "")
        + f", .rec {records.size} bytes, .idx {index.size} bytes sha256 {index.sha256}, pieces of {piece_rows}"
    )
    return Pieces(f"rec {records.location} ({title}, {count} images)", True, pieces, identity, problems=problems)
