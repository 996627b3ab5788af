"""A small writer of MXNet/insightface RecordIO files (`.rec` + `.idx`) from the format facts, for tests.

MXNet does not install beside this project's numpy, so tests write their own files:

    write_rec(path, [(label, jpeg_bytes), ...])                         # plain im2rec: keys 0..N-1
    write_rec(path, [(identity, jpeg_bytes), ...], header="insightface")  # record 0 = [N+1, N+1+ids], then
                                                                         # images 1..N, identity ranges after

A record's payload is the IRHeader `<IfQQ` (flag, label, id, id2), the flag float32 labels when the
label is a sequence, then the image bytes. Framing follows dmlc-core: the payload is cut wherever the
magic word sits at a 4-aligned position (the word dropped; cflag 1 first, 2 middle, 3 last part);
`with_magic(jpeg, parts)` puts such words inside a JPEG comment so that the record is written in
`parts` parts while the image decodes the same. `frame(...)`, `payload(...)` and `extra=` write raw,
even damaged, records.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IRHEADER = struct.Struct("<IfQQ")


def payload(label: float | Sequence[float], image: bytes = b"", *, id: int = 0, id2: int = 0) -> bytes:
    """Returns a record's payload: IRHeader, then the float32 labels when `label` is a sequence, then `image`."""
    if isinstance(label, (int, float)):
        return IRHEADER.pack(0, float(label), id, id2) + bytes(image)
    labels = [float(x) for x in label]
    return IRHEADER.pack(len(labels), 0.0, id, id2) + struct.pack(f"<{len(labels)}f", *labels) + bytes(image)


def frame_part(cflag: int, data: bytes, *, length: int | None = None, magic: int = MAGIC) -> bytes:
    """Returns one frame: magic, lrecord = (cflag << 29) | length (default len(data)), data, zero padding to 4."""
    length = len(data) if length is None else length
    pad = -len(data) % 4
    return struct.pack("<II", magic, (cflag << 29) | length) + bytes(data) + b"\0" * pad


def frame(data: bytes) -> bytes:
    """Returns a record's frames as dmlc-core writes them: one part, or parts cut at each 4-aligned magic word."""
    data = bytes(data)
    cuts, at = [], data.find(MAGIC_BYTES)
    while at >= 0:
        if at % 4 == 0 and at + 4 <= len(data):
            cuts.append(at)
            at = data.find(MAGIC_BYTES, at + 4)
        else:
            at = data.find(MAGIC_BYTES, at + 1)
    if not cuts:
        return frame_part(0, data)
    out, start = [], 0
    for k, cut in enumerate(cuts):
        out.append(frame_part(1 if k == 0 else 2, data[start:cut]))
        start = cut + 4
    out.append(frame_part(3, data[start:]))
    return b"".join(out)


def with_magic(jpeg: bytes, parts: int, *, at: int = 24) -> bytes:
    """Returns `jpeg` with a comment segment holding parts - 1 magic words, each 4-aligned in a payload whose
    image starts at byte `at` (24: after a plain IRHeader), so that `frame` writes it in `parts` parts.
    The comment changes no pixel: the image decodes the same."""
    if parts < 2:
        return jpeg
    assert jpeg[:2] == b"\xff\xd8"
    # SOI (2 bytes) + COM marker and length (4 bytes), then the comment body: pad it so each word is aligned.
    lead = -(at + 6) % 4
    body = b"x" * lead + b"".join(MAGIC_BYTES + b"abcd" for _ in range(parts - 1))
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def identity_ranges(labels: Sequence[float], first_key: int = 1) -> list[tuple[int, int]]:
    """Returns [first, end) key ranges of consecutive equal labels (the insightface identity records)."""
    ranges: list[tuple[int, int]] = []
    for k, label in enumerate(labels):
        key = first_key + k
        if ranges and labels[k - 1] == label:
            ranges[-1] = (ranges[-1][0], key + 1)
        else:
            ranges.append((key, key + 1))
    return ranges


def write_rec(
    path_rec: str | os.PathLike,
    records: Iterable[tuple[float | Sequence[float], bytes]],
    *,
    header: None | str | tuple[float, float] = None,
    keys: Sequence[int] | None = None,
    extra: Iterable[tuple[int, bytes]] = (),
    path_idx: str | os.PathLike | None = None,
    index: bool = True,
) -> list[tuple[int, int]]:
    """Writes a `.rec` and its `.idx`; returns the (key, offset) of every record written, in file order.

    records: (label, image bytes); a sequence label is written as flag float32 labels.
    header: None (plain im2rec: keys 0..N-1, or `keys`); "insightface" (record 0 = labels [N+1, N+1+R],
    images keys 1..N, then R identity-range records [first, end) of consecutive equal labels); or (a, b):
    record 0 with those labels, images keys 1..N (or `keys`), no identity records (add them with `extra`).
    extra: (key, raw frames bytes) appended after the images as they are (damaged ones too).
    path_idx: default the .rec path with suffix .idx. index=False writes no .idx.
    """
    path_rec = os.fspath(path_rec)
    if path_idx is None:
        stem, _ = os.path.splitext(path_rec)
        path_idx = stem + ".idx"
    written: list[tuple[int, int]] = []
    labels_seen: list[float] = []
    with open(path_rec, "wb") as f:
        at = 0

        def put(key: int, frames: bytes) -> None:
            nonlocal at
            written.append((key, at))
            f.write(frames)
            at += len(frames)

        if header is not None and header != "insightface":
            put(0, frame(payload(tuple(header))))
        elif header == "insightface":
            records = list(records)
            labels_seen = [r[0] for r in records]
            ranges = identity_ranges(labels_seen)
            n = len(records)
            put(0, frame(payload((n + 1, n + 1 + len(ranges)))))
        first = 0 if header is None else 1
        for k, (label, image) in enumerate(records):
            key = keys[k] if keys is not None else first + k
            put(key, frame(payload(label, image, id=key)))
        if header == "insightface":
            for r, (a, b) in enumerate(ranges):
                put(n + 1 + r, frame(payload((a, b))))
        for key, frames in extra:
            put(key, frames)
    if index:
        with open(path_idx, "w", newline="\n") as f:
            f.write("".join(f"{key}\t{offset}\n" for key, offset in written))
    return written
