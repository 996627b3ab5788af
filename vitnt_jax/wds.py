"""WebDataset tar shards as a chunked source: one piece per shard, read as one sequential stream.

A pattern names the shards in brace notation (`train-{000000..000999}.tar`, `{a,b}`), as local
paths or fsspec URLs. A sample is a run of consecutive members sharing a key (the member path up
to the first dot of its base name: `abc/0001.jpg` and `abc/0001.cls` are sample `abc/0001` with
fields `jpg` and `cls`), as the WebDataset convention has it. Its image is its first jpg, jpeg,
png or webp member; its label the text of its `cls` member (stripped), '' without one.

What cannot be scored keeps a row that says why (its loader raises ImageError): a sample without
an image member, an unreadable or oversized image, a key seen earlier in the same shard (its id
gets `.repeat-N`), and a shard that breaks part-way (the samples before keep their rows, the
sample in progress is an error row, and one more row `<shard>.broken` says where it broke). Such
ids cannot clash with a key: a key's last path component holds no dot. Members WebDataset skips
(folders, links and other non-regular members, names without a key, `__meta__` names) are
skipped here too, never followed; the ones that look like data are named in the piece's problems.
"""

from __future__ import annotations

import bz2
import contextlib
import gc
import hashlib
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Callable

import numpy as np

from vitnt_jax import storage
from vitnt_jax.data import ImageError, read_image
from vitnt_jax.errors import UserError
from vitnt_jax.output import render_id
from vitnt_jax.sources import Piece, Pieces, Source, SourceError, shown

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # compared with the lower-cased field name
LABEL_FIELD = "cls"
MAX_SHARDS = 1_000_000  # a pattern naming more is refused (every process holds the shard list)
MAX_PATTERN = 65_536  # characters
MAX_NESTING = 100  # brace depth
MAX_MEMBER_BYTES = 64 << 20  # a larger image member is an error row, skipped unread
MAX_LABEL_BYTES = 4096
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers (tarfile would read them whole into memory)
MAX_SHARD_MEMBERS = 1_000_000  # a shard past this is cut there (a broken row says so)
MAX_SHARD_HELD = 4 << 30  # image bytes one shard holds in memory while it is scored
MAX_PROBLEMS = 20  # skipped members named per shard; the rest are counted
# A member name longer than this (Linux's PATH_MAX: no file system holds it) is skipped: every key of a shard is
# held while it is scored, and a 1 MiB pax name a member (1 KB of gzip) would make a million-member shard 1 TB.
MAX_NAME = 4096
# tarfile's stream buffer copies its remainder on every header read: a larger block is slower, not faster.
_READ_BLOCK = 64 << 10
# A compressed shard expanding more than this many times its compressed size, once past MAX_MEMBER_BYTES, is a
# compression bomb: it breaks there (1.5 KB of bzip2 holds 2 GiB of zeros; shards of images expand ~1-2 times).
MAX_EXPANSION = 100
MAX_XZ_MEMORY = 256 << 20  # what an xz stream's header may ask the decoder to allocate (xz -9 asks 65 MiB)
# Reads that found the stream's end before tarfile gives up: a member claiming 2^40 bytes past it would make
# tarfile skip them 64 KiB at a time (83 s for 2^40; a GNU base-256 size of 2^80 is forever).
_END_READS = 16
# How each compressed stream starts (gzip: magic and deflate; bzip2: magic, level, first block's magic): a tar
# starts with its first member's name, which may well begin with "BZh".
_COMPRESSED = {
    "gzip": re.compile(b"\x1f\x8b\x08"),
    "bzip2": re.compile(b"BZh[1-9]1AY&SY"),
    "xz": re.compile(b"\xfd7zXZ\x00"),
}
_MAGIC_BYTES = 10


def _broken_id(shard: str) -> str:
    return f"{shard}.broken"


def _repeat_id(key: str, n: int) -> str:
    return f"{key}.repeat-{n}"


# ---------------------------------------------------------------------------------------------------------------
# Patterns


class _PatternError(ValueError):
    pass


def _count(pattern: str, cap: int, depth: int = 0) -> int:
    """Returns how many names braceexpand makes of `pattern` (at most cap + 1), without making them.

    Mirrors braceexpand's grammar (escape=True): it materialises each brace group, so a pattern is counted
    before it is expanded (`{0..999999999999}` would fill memory).
    """
    from braceexpand import alphabet, char_range_re, int_range_re

    if depth > MAX_NESTING:
        raise _PatternError(f"nests braces more than {MAX_NESTING} deep")
    total, pos, start, level = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if level == 0:
                start = pos
            level += 1
        elif c == "}":
            level -= 1
            if level < 0:  # braceexpand takes '}{' as text; a pattern holding it is a typo
                raise _PatternError("has unbalanced braces")
            if level == 0:
                expr = pattern[start + 1 : pos]
                if match := int_range_re.match(expr):
                    a, b, step = int(match[1]), int(match[2]), int(match[3] or 1) or 1
                    n = abs(b - a) // step + 1
                elif match := char_range_re.match(expr):
                    a, b, step = alphabet.index(match[1]), alphabet.index(match[2]), int(match[3] or 1) or 1
                    n = len(alphabet[a : b + 1 : step] if a < b else alphabet[a : (b or -len(alphabet)) - 1 : -step])
                else:
                    parts = _top_level_parts(expr)
                    if parts is None:  # not a sequence: the braces stay, the inside is a pattern
                        n = _count(expr, cap, depth + 1)
                    else:
                        n = sum(_count(part, cap, depth + 1) for part in parts)
                total = min(total * n, cap + 1)
                start = pos + 1
        pos += 1
    if level != 0:
        raise _PatternError("has unbalanced braces")
    return total


def _top_level_parts(expr: str) -> list[str] | None:
    """Returns the comma-separated parts of a brace sequence, None when it is no sequence (as braceexpand)."""
    parts, pos, start, level = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            level += 1
        elif c == "}":
            level -= 1
        elif c == "," and level == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if level != 0 or not parts:
        return None
    parts.append(expr[start:])
    return parts


def expand(pattern: str) -> list[str]:
    """Returns the shard locations `pattern` names, in order; SourceError for a malformed or too large pattern."""
    from braceexpand import UnbalancedBracesError, braceexpand

    def refuse(why: str) -> SourceError:
        return SourceError("{wds} " + f"{shown(pattern)} {why}.", field="wds")

    if not isinstance(pattern, str) or not pattern.strip():
        raise refuse("is empty; pass the shards as a path or URL such as 'train-{000000..000999}.tar'")
    if len(pattern) > MAX_PATTERN:
        raise refuse(f"is {len(pattern)} characters long, above the {MAX_PATTERN} allowed; name fewer shards")
    try:
        n = _count(pattern, MAX_SHARDS)
    except _PatternError as error:
        raise refuse(f"{error}; write each brace group as {{a,b,c}} or {{000..999}}") from None
    if n > MAX_SHARDS:
        raise refuse(f"names more than {MAX_SHARDS:,} shards; split the run into several patterns")
    try:
        names = list(braceexpand(pattern))
    except (UnbalancedBracesError, RecursionError):
        raise refuse("has unbalanced braces; write each brace group as {a,b,c} or {000..999}") from None
    if len(names) > MAX_SHARDS:  # the count above is exact; kept as a guard should braceexpand change
        raise refuse(f"names more than {MAX_SHARDS:,} shards; split the run into several patterns")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise refuse("names an empty shard path; fix the pattern")
        if name in seen:
            raise refuse(f"names the shard {shown(name)} twice; fix the pattern so each shard is named once")
        seen.add(name)
    return names


def _split(location: str) -> tuple[str, str]:
    if storage.is_url(location):
        folder, _, name = location.rpartition("/")
        return folder, name
    folder, name = os.path.split(location)
    return folder or ".", name


def _missing(names: list[str]) -> list[str]:
    """Returns the shards that do not exist, listing each distinct folder once (not one request per shard)."""
    listed: dict[str, set[str]] = {}
    missing = []
    for name in names:
        folder, base = _split(name)
        if folder not in listed:
            try:
                listed[folder] = set(storage.listdir(folder))
            except UserError:
                raise
            except Exception as error:
                raise SourceError(
                    "{wds} " + f"cannot list the folder {shown(folder)} ({type(error).__name__}: {error}); "
                    "check that it exists and can be read.",
                    field="wds",
                ) from None
        if base not in listed[folder]:
            missing.append(name)
    return missing


def open_wds(pattern: str, *, piece_rows: int = 0, **_: object) -> Pieces:
    """Returns the WebDataset shards `pattern` names as Pieces, one per shard in pattern order.

    Opening expands the pattern and lists each folder once to refuse missing shards; it reads no shard.
    piece_rows is not used: a shard is read, scored and committed whole (its sample count is known only
    once it is read). Every row has a label column ('' for a sample without a `cls` member).
    """
    with _collector_paused():
        names = expand(pattern)
    missing = _missing(names)
    if missing:
        first = ", ".join(shown(m, 120) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = " (globs such as * are not expanded: use braces)" if any(c in pattern for c in "*?[") else ""
        raise SourceError(
            "{wds} "
            + f"{shown(pattern)} names {len(missing)} of {len(names)} shards that do not exist: {first}{more}{hint}; "
            "fix the pattern or supply the shards.",
            field="wds",
        )
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
    with _collector_paused():
        pieces = [Piece(k, f"shard {name}", None, _reader(name)) for k, name in enumerate(names)]
    return Pieces(pattern, True, pieces, f"{len(names)} WebDataset shards, sha256 {digest.hexdigest()}")


@contextlib.contextmanager
def _collector_paused():
    # A million shard names and pieces hold no reference cycles; the cyclic collector walking them again and
    # again as they are made takes 4x the time of making them (measured: 14 s against 3.3 s for 1M shards).
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _reader(shard: str) -> Callable[[], Source]:
    return lambda: read_shard(shard)


# ---------------------------------------------------------------------------------------------------------------
# Shards


def split_key(name: str) -> tuple[str, str] | None:
    """Returns (key, field) of a member path as WebDataset groups it, None for a name that is no sample's.

    key: the path up to the first dot of its base name; field: the rest after that dot, lower-cased.
    """
    folder, slash, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    if not dot or not stem:
        return None
    return folder + slash + stem, rest.lower()


def _is_meta(name: str) -> bool:
    # WebDataset skips names like __index__ or __meta__/... (shard metadata, no samples).
    head = name.split("/", 1)[0]
    return len(head) >= 4 and head.startswith("__") and head.endswith("__")


class _Sample:
    __slots__ = ("key", "fields", "image", "label", "reason")

    def __init__(self, key: str):
        self.key = key
        self.fields: list[str] = []
        self.image: bytes | None = None
        self.label = ""
        self.reason: str | None = None


class _Tracked:
    """A file wrapper that remembers a failure of the storage read itself (not of the tar inside)."""

    def __init__(self, f):
        self.f, self.failure, self.position = f, None, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.f.read(n)
        except Exception as error:
            self.failure = error
            raise
        self.position += len(data)
        return data


class _Refused(Exception):
    """A shard read no further for a reason of its own (the message says it in plain words)."""


class _Inflated:
    """A shard's tar stream for tarfile ('r|'): its bytes, or their gzip/bzip2/xz decompression in bounded steps.

    tarfile's own stream decompresses every 64 KiB read whole (1.5 KB of bzip2 became 2 GiB in memory at once);
    here no read returns, or holds, more than asked. Several concatenated streams (pigz, pbzip2, xz -T) are read
    on. _Refused for damaged compressed data or a compression bomb; tarfile's ReadError('unexpected end of data')
    when tarfile keeps reading past the end (a member claiming more bytes than the shard holds).
    """

    def __init__(self, raw: _Tracked):
        self.raw, self.out, self.ends = raw, 0, 0
        self.pending = raw.read(_READ_BLOCK)
        self.kind = next((k for k, magic in _COMPRESSED.items() if magic.match(self.pending)), None)
        self.unzip = self._decompressor() if self.kind else None

    def _decompressor(self):
        if self.kind == "gzip":
            return zlib.decompressobj(wbits=31)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MAX_XZ_MEMORY)

    def _more(self) -> bool:
        data = self.raw.read(_READ_BLOCK)
        self.pending += data
        return bool(data)

    def _step(self, n: int) -> bytes | None:
        """Returns up to n decompressed bytes (maybe none yet), None at the end of the compressed data."""
        d = self.unzip
        if d is None:
            return None
        if d.eof:  # a stream ended: another one may follow; anything else after it is ignored (as tarfile does)
            while len(self.pending) < _MAGIC_BYTES and self._more():
                pass
            if not _COMPRESSED[self.kind].match(self.pending):
                self.unzip = None
                return None
            d = self.unzip = self._decompressor()
        needs = d.needs_input if hasattr(d, "needs_input") else not d.unconsumed_tail
        last = needs and not self.pending and not self._more()  # no input left: what the decompressor still holds
        data = self.pending if needs or self.kind == "gzip" else b""
        try:
            out = d.decompress(data, n)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as error:
            raise _Refused(f"its {self.kind} data is damaged ({error})") from None
        if last and not out:
            if not self.out:  # not even a first block: tarfile would call the file empty
                raise _Refused(f"its {self.kind} data is cut short before anything in it can be decompressed")
            return None  # cut short inside a compressed stream: tarfile says where
        if self.kind == "gzip":
            self.pending = d.unconsumed_tail or d.unused_data
        elif data:
            self.pending = d.unused_data if d.eof else b""
        elif d.eof:
            self.pending = d.unused_data + self.pending
        return out

    def read(self, n: int = -1) -> bytes:
        n = _READ_BLOCK if n is None or n < 0 else n
        if self.kind is None:
            data, self.pending = (self.pending[:n], self.pending[n:]) if self.pending else (self.raw.read(n), b"")
        else:
            while (data := self._step(n)) is not None and not data:
                pass
            data = data or b""
        if not data:
            self.ends += 1
            if self.ends > _END_READS:
                raise tarfile.ReadError("unexpected end of data")
            return data
        self.out += len(data)
        if self.kind and self.out > MAX_MEMBER_BYTES and self.out > MAX_EXPANSION * max(self.raw.position, 1):
            raise _Refused(
                f"its {self.kind} data expands more than {MAX_EXPANSION} times ({self.out} bytes from "
                f"{self.raw.position}): a compression bomb, or a shard to store uncompressed"
            )
        return data


def _fields(sample: _Sample) -> str:
    text = ", ".join("." + f for f in sample.fields[:10]) + (", ..." if len(sample.fields) > 10 else "")
    return text if len(text) <= 200 else text[:200] + "..."


def read_shard(shard: str) -> Source:
    """Returns one shard's samples as a small Source (ids = keys, labels, load(j) decodes its image).

    The tar is read once, front to back (tarfile stream mode; gzip/bz2/xz compressed shards too, several
    concatenated streams included, decompressed 64 KiB at a time); only image and cls members are held. A
    compression bomb, a sparse member or a member claiming more bytes than the shard holds breaks the shard
    there. SourceError when the shard cannot be opened or the storage read fails (rerun).
    """
    ids: list[str] = []
    labels: list[str] = []
    payload: list[bytes | str] = []  # encoded image, or the reason the row is an error
    first_at: dict[str, tuple[int, str]] = {}  # key as written -> (sample number of its first appearance, key)
    repeats: dict[str, int] = {}
    problems: list[str] = []
    untold = [0]
    held = [0]

    def note(problem: str) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(f"{problem} (shard {shown(shard, 120)})")
        else:
            untold[0] += 1

    def finish(sample: _Sample, reason: str | None = None) -> None:
        reason = reason or sample.reason
        image_id = sample.key
        # Keys are compared as a result file writes them: a name byte that is not UTF-8 (0xff) is written `\xff`,
        # like the four characters `\xff` of another name.
        written = render_id(sample.key)
        if written in first_at:
            repeats[written] = repeats.get(written, 1) + 1
            image_id = _repeat_id(sample.key, repeats[written])
            first, key = first_at[written][0] + 1, shown(sample.key, 80)
            if first_at[written][1] == sample.key:
                reason = f"key {key} is repeated in this shard (first at its sample {first})"
            else:
                reason = (
                    f"key {key} is written {shown(written, 80)} in a result file, as the key of its sample {first} is"
                )
        else:
            first_at[written] = (len(ids), sample.key)
        if reason is None and sample.image is None:
            reason = f"no {'/'.join(IMAGE_FIELDS)} member; it holds: {_fields(sample)}"
        ids.append(image_id)
        labels.append(sample.label)
        payload.append(reason if reason is not None else sample.image)

    stop: list[BaseException] = []

    class Header(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            info = super().frombuf(buf, encoding, errors)
            if (
                info.type
                in (
                    tarfile.XHDTYPE,
                    tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE,
                    tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK,
                )
                and info.size > MAX_HEADER_BYTES
            ):
                raise tarfile.HeaderError(f"an extended header of {info.size} bytes (at most {MAX_HEADER_BYTES})")
            return info

        # A sparse member's map is read whole: old GNU extension blocks, 512 bytes each, became ~2.6 KB of
        # tuples each, and a pax 1.0 map a run of digits read whole (a small .tar.gz could fill memory).
        # No WebDataset writer makes sparse members: the shard breaks there.
        def _proc_sparse(self, tar):
            raise _Refused(f"member {shown(self.name, 80)} is a sparse file, which no WebDataset shard holds")

        def _proc_gnusparse_10(self, next, pax_headers, tar):
            raise _Refused(f"member {shown(next.name, 80)} is a sparse file, which no WebDataset shard holds")

        @classmethod
        def fromtarfile(cls, tar):
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as error:  # tarfile ends the archive quietly on most of these
                if not stop:
                    stop.append(error)
                raise

    try:
        raw = storage.open_read(shard)
    except UserError:
        raise
    except Exception as error:
        raise SourceError(
            "{wds} " + f"cannot read the shard {shown(shard)} ({type(error).__name__}: {error}); "
            "check that it exists and can be read, then rerun with --resume.",
            field="wds",
        ) from None
    tracked = _Tracked(raw)
    current: _Sample | None = None
    broke: str | None = None
    tar = None
    last: tarfile.TarInfo | None = None
    where = ""
    members = 0
    stream: _Inflated | None = None
    try:
        stream = _Inflated(tracked)
        tar = tarfile.open(
            fileobj=stream,
            mode="r|",
            bufsize=_READ_BLOCK,
            tarinfo=Header,
            encoding="utf-8",
            errors="surrogateescape",
        )
        for info in tar:
            tar.members = []  # stream mode would keep every header
            members += 1
            last = info
            if members > MAX_SHARD_MEMBERS:
                broke = f"it holds more than {MAX_SHARD_MEMBERS} members; split it into smaller shards"
                break
            name = info.name
            if len(name) > MAX_NAME:
                note(f"member {shown(name, 80)} has a name of {len(name)} characters, above {MAX_NAME}; skipped")
                continue
            if _is_meta(name):
                continue
            split = split_key(name)
            if info.isdir():
                continue
            if split is None:
                if info.isreg():
                    note(
                        f"member {shown(name, 120)} has no key (no name before the first dot of its base name); skipped"
                    )
                continue
            if not info.isreg():
                note(f"member {shown(name, 120)} is not a regular file (a link or device); skipped, never followed")
                continue
            key, field = split
            if current is None or key != current.key:
                if current is not None:
                    finish(current)
                current = _Sample(key)
            if field in current.fields:
                current.reason = current.reason or f"it holds .{field} twice"
            current.fields.append(field)
            if field in IMAGE_FIELDS and current.image is None and current.reason is None:
                if info.size > MAX_MEMBER_BYTES:
                    current.reason = f"its .{field} member is {info.size} bytes, above the {MAX_MEMBER_BYTES} limit"
                elif held[0] + info.size > MAX_SHARD_HELD:
                    current.reason = f"not read: the shard's images pass {MAX_SHARD_HELD} bytes; split it"
                else:
                    current.image = tar.extractfile(info).read()
                    held[0] += len(current.image)
            elif field == LABEL_FIELD and current.label == "":  # a second cls made the sample an error above
                if info.size > MAX_LABEL_BYTES:
                    current.reason = f"its .cls member is {info.size} bytes, above the {MAX_LABEL_BYTES} limit"
                else:
                    try:
                        current.label = tar.extractfile(info).read().decode("utf-8").strip()
                    except UnicodeDecodeError:
                        current.reason = "its .cls member is not UTF-8 text"
        else:
            if stop and not isinstance(stop[0], tarfile.EOFHeaderError):
                broke = _why(stop[0], True)
            elif stop and _data_after_end(tar, note):
                broke = "a zero block where a member header should be, with more data after it (a damaged header?)"
    except MemoryError:
        raise
    except Exception as error:
        if tracked.failure is None:
            broke = _why(error, False)
        if isinstance(error, _Refused) and stream is not None:
            where = f"byte {stream.out}"  # of the decompressed tar: tarfile's offset may already be past it
        if str(error) == "unexpected end of data" and last is not None:
            where = f"byte {last.offset} (member {shown(last.name, 80)})"
    finally:
        for f in (tar, raw):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
    if tracked.failure is not None:  # the storage, not the shard: nothing of it is committed, a rerun reads it again
        raise SourceError(
            "{wds} " + f"reading the shard {shown(shard)} failed at byte {tracked.position} "
            f"({type(tracked.failure).__name__}: {tracked.failure}); rerun with --resume.",
            field="wds",
        )
    if broke is None:
        if current is not None:
            finish(current)
    else:
        at = where or (f"byte {tar.offset}" if tar is not None and tar.offset else "its start")
        done = len(ids)
        if current is not None:
            finish(current, f"the shard breaks inside this sample, at {at}")
        after = f"after {done} complete sample{'' if done == 1 else 's'}" if done else "before any complete sample"
        ids.append(_broken_id(shard))
        labels.append("")
        payload.append(f"the shard breaks at {at}, {after} ({broke}); the rest of it is not read")
    if untold[0]:
        problems.append(f"{untold[0]} more skipped members in shard {shown(shard, 120)}")

    def load(j: int) -> np.ndarray:
        item = payload[j]
        if isinstance(item, str):
            raise ImageError(item)
        return read_image(item)

    return Source(shard, ids, labels, load, problems=problems)


_PLAIN = {
    "empty file": "the file is empty or holds no tar",
    "empty header": "it is cut short inside a member header",
    "truncated header": "it is cut short inside a member header",
    "unexpected end of data": "it is cut short inside a member",
    "end of file header": "it ends early",
}


def _data_after_end(tar: tarfile.TarFile, note: Callable[[str], None]) -> bool:
    """Returns whether anything but zeros follows the end block tarfile stopped at (it stops at any zero block).

    A tar ends with zero blocks padded with zeros; a zeroed header inside it would end the archive quietly and
    lose every sample after it. Reads the padding (kilobytes) or, for such a shard, up to the first data after it;
    compressed zeros that expand like a bomb are not read to their end (the shard ends there, noted).
    """
    try:
        while chunk := tar.fileobj.read(_READ_BLOCK):
            if chunk.strip(b"\0"):
                return True
    except _Refused as error:
        note(f"the zeros after its end marker are not read to their end ({error})")
    return False


def _why(error: BaseException, quiet: bool) -> str:
    """Returns why a shard broke, in plain words. quiet: tarfile ended the archive on this header error itself."""
    text = str(error) or type(error).__name__
    if isinstance(error, _Refused):
        pass
    elif quiet and isinstance(error, tarfile.EmptyHeaderError):
        text = "it ends without the tar end marker (cut short?)"
    elif text in _PLAIN:
        text = _PLAIN[text]
    elif isinstance(error, tarfile.HeaderError) or text in ("bad checksum", "invalid header"):
        text = f"a damaged member header ({text})"
    else:
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 200 else text[:200] + "..."
