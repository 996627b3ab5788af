"""Hostile RecordIO files and WebDataset shards: crafted headers, huge claims, amplification, odd names.

Each test is a regression test of a defect found by attacking the readers (a traceback, a hang, memory that
grows with what a small file claims, ids that collide once written). Every file is made here, tiny.
"""

from __future__ import annotations

import io
import os
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from recordio_writer import frame_part, payload, with_magic, write_rec  # noqa: E402

from vitnt_jax import recordio  # noqa: E402
from vitnt_jax.data import ImageError  # noqa: E402
from vitnt_jax.sources import SourceError  # noqa: E402


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def rows(source) -> list[tuple[str, str, str | tuple]]:
    """Returns (id, label, decoded shape or the error text) of every row of a piece's Source."""
    out = []
    for j in range(len(source.ids)):
        try:
            what: str | tuple = source.load(j).shape
        except ImageError as error:
            what = str(error)
        out.append((source.ids[j], source.labels[j], what))
    return out


def all_rows(pieces) -> list[tuple[str, str, str | tuple]]:
    return [row for piece in pieces.pieces for row in rows(piece.read())]


# ---------------------------------------------------------------------------------------------------------------
# RecordIO


@pytest.mark.parametrize("a, b", [(3e38, 3e38), (2.0**40, 2.0**40 + 2**20)])
def test_an_insightface_header_of_a_float32_giant_is_refused_in_one_sentence(tmp_path, a, b):
    # Its image count is above 2^24, so the reader looked for the exact count among keys within the float32
    # rounding of a: 2e31 keys for 3e38, which numpy refused with a ValueError traceback.
    write_rec(tmp_path / "h.rec", [(0, jpeg(0))], header=(a, b))
    with pytest.raises(SourceError, match=r"its header names \d+ images but the index .*h\.idx lists 2 records"):
        recordio.open_rec(str(tmp_path / "h.rec"), piece_rows=2)


def test_a_part_flag_above_3_is_named_as_such(tmp_path):
    # cflag is 3 bits; 4..7 are no part flag. It was read as a first part, then called "its last part is missing".
    extra = [(1, frame_part(5, payload(1, jpeg(1)))), (2, frame_part(0, payload(2, jpeg(2))))]
    write_rec(tmp_path / "c.rec", [(0, jpeg(0))], extra=extra)
    got = all_rows(recordio.open_rec(str(tmp_path / "c.rec"), piece_rows=5))
    assert [r[:2] for r in got] == [("0", "0"), ("1", ""), ("2", "2")]
    assert got[1][2].startswith("bad RecordIO part flag 5 at byte ")
    assert got[0][2] == got[2][2] == (16, 16, 3)


def test_a_chain_of_empty_frames_is_an_error_row_read_in_bounded_memory(tmp_path):
    # 20,000 empty middle parts (8 bytes each): they were joined, ~300 bytes of memory and ~60 us each.
    chain = frame_part(1, payload(1)) + frame_part(2, b"") * 20_000 + frame_part(3, jpeg(1))
    written = write_rec(tmp_path / "z.rec", [(0, jpeg(0))], extra=[(1, chain), (2, frame_part(0, payload(2, jpeg(2))))])
    pieces = recordio.open_rec(str(tmp_path / "z.rec"), piece_rows=5)
    tracemalloc.start()
    source = pieces.pieces[0].read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    got = rows(source)
    assert (
        got[1][:2] == ("1", "")
        and got[1][2] == f"record at byte {written[1][1]} is cut into more than 4096 parts; not read"
    )
    assert got[0][2] == got[2][2] == (16, 16, 3)
    assert peak < 2 << 20  # at most MAX_PARTS parts held (5.7 MB traced before: every part)


def test_a_record_claiming_more_than_the_record_limit_is_an_error_row_unread(tmp_path, monkeypatch):
    images = [jpeg(k) for k in range(3)]
    write_rec(tmp_path / "r.rec", [(k, im) for k, im in enumerate(images)])
    monkeypatch.setattr(recordio, "MAX_RECORD_BYTES", len(payload(0, images[1])) - 1)
    monkeypatch.setattr(recordio, "MAX_RANGE", 10)  # record by record: nothing of the large one is read
    got = all_rows(recordio.open_rec(str(tmp_path / "r.rec"), piece_rows=3))
    limit = recordio.MAX_RECORD_BYTES
    assert [r[2] for r in got if isinstance(r[2], str)] == [
        f"record at byte {o} claims more than {limit} bytes, above the limit; not read"
        for o, im in zip(recordio.RecordFile(str(tmp_path / "r.rec")).index.offsets.tolist(), images, strict=True)
        if len(payload(0, im)) > limit
    ]


def test_keys_pointing_at_one_record_are_read_once_and_logged(tmp_path):
    # 2000 keys at one 50-part record: each key's row has that image; the record was read and joined once a key
    # (2000 copies); now once, and the plan says the index shares records.
    write_rec(tmp_path / "s.rec", [(7, with_magic(jpeg(3, 64), 50))])
    (tmp_path / "s.idx").write_text("".join(f"{k}\t0\n" for k in range(2000)))
    pieces = recordio.open_rec(str(tmp_path / "s.rec"), piece_rows=2000)
    assert any("points 1999 keys at a record another key points at too" in p for p in pieces.problems)
    tracemalloc.start()
    source = pieces.pieces[0].read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # 10.8 MB traced before: 2000 joined copies of the record
    assert source.ids == [str(k) for k in range(2000)] and set(source.labels) == {"7"}
    np.testing.assert_array_equal(source.load(0), source.load(1999))
