"""Hostile RecordIO files and WebDataset shards: crafted headers, huge claims, amplification, odd names.

Each test is a regression test of a defect found by attacking the readers (a traceback, a hang, memory that
grows with what a small file claims, ids that collide once written). Every file is made here, tiny.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from recordio_writer import frame_part, payload, with_magic, write_rec  # noqa: E402

from vitnt_jax import recordio, wds  # noqa: E402
from vitnt_jax.data import ImageError, read_image  # noqa: E402
from vitnt_jax.output import render_id  # noqa: E402
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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_index_that_is_a_fifo_is_refused_in_one_sentence_without_waiting(tmp_path):
    write_rec(tmp_path / "a.rec", [(0, jpeg(0))])
    os.remove(tmp_path / "a.idx")
    os.mkfifo(tmp_path / "a.idx")
    with pytest.raises(SourceError) as refused:
        recordio.open_rec(str(tmp_path / "a.rec"), piece_rows=2)
    # storage's own sentence, not wrapped in another one ("cannot be read (...; pass a file.); check the path")
    assert str(refused.value) == f"rec {tmp_path / 'a.idx'} is a named pipe (FIFO), not a regular file; pass a file."


def test_a_storage_ignoring_the_range_asked_for_is_a_failing_read_not_error_rows(tmp_path, monkeypatch):
    # A server that ignores Range answers with the whole object: parsed as if it began at the piece's first
    # record, every row would have been "bad RecordIO magic" (rows made up from a storage fault).
    write_rec(tmp_path / "a.rec", [(k, jpeg(k)) for k in range(4)])
    pieces = recordio.open_rec(str(tmp_path / "a.rec"), piece_rows=2)
    whole = (tmp_path / "a.rec").read_bytes()

    class Ignoring:  # a remote file as storage.open_read gives one: its file system's cat_file is what is asked
        fs, path = None, "a.rec"

        def cat_file(self, path, start=None, end=None):
            return whole

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    remote = Ignoring()
    remote.fs = remote
    monkeypatch.setattr(recordio.storage, "open_read", lambda location: remote)
    with pytest.raises(
        SourceError, match=r"could not be read \(the storage answered a request for \d+ bytes from byte"
    ):
        pieces.pieces[1].read()


def test_a_file_of_shuffled_keys_is_read_one_request_a_run_of_records(tmp_path, monkeypatch):
    # im2rec on a shuffled list writes records in list order, keys out of order: a piece's records lie apart.
    # They were read frame by frame (a request for each 8-byte frame header, another for its bytes: 2 a record,
    # more for multi-part ones); now one request for each run of records next to each other.
    keys = [0, 1, 4, 5, 2, 3, 6, 7]  # in file order: piece 0 (keys 0-3) is slots 0-1 and 4-5
    images = {k: with_magic(jpeg(k), 1 + k % 3) for k in keys}
    write_rec(tmp_path / "s.rec", [(k, images[k]) for k in keys], keys=keys)
    slot = recordio.RecordFile(str(tmp_path / "s.rec")).index.in_file_order().tolist()
    asked = []
    real = recordio._read_range
    monkeypatch.setattr(recordio, "_read_range", lambda f, start, n: asked.append(start) or real(f, start, n))
    pieces = recordio.open_rec(str(tmp_path / "s.rec"), piece_rows=4)
    sources = [piece.read() for piece in pieces.pieces]
    # record 0 at open (is it a header?), then two runs a piece
    assert asked == [slot[0], slot[0], slot[4], slot[2], slot[6]]
    assert [i for source in sources for i in source.ids] == [str(k) for k in range(8)]
    for k in range(8):
        np.testing.assert_array_equal(sources[k // 4].load(k % 4), read_image(images[k]))
    assert [label for source in sources for label in source.labels] == [str(k) for k in range(8)]


# ---------------------------------------------------------------------------------------------------------------
# WebDataset shards


def header(name: str, size: int, type: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type
    return info.tobuf(tarfile.GNU_FORMAT)  # GNU: base-256 sizes past ustar's 8 GiB


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024


def counting_reads(monkeypatch) -> list[int]:
    """Counts the reads of every shard opened from now on (what tarfile asks of the storage)."""
    calls: list[int] = []
    real = wds.storage.open_read

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            calls.append(n)
            return self.f.read(n)

        def close(self):
            self.f.close()

    monkeypatch.setattr(wds.storage, "open_read", lambda path: Counted(real(path)))
    return calls


@pytest.mark.parametrize("field", ["jpg", "txt"])
def test_a_member_claiming_2_to_the_40_bytes_past_the_end_breaks_the_shard_at_once(tmp_path, monkeypatch, field):
    # tarfile skipped the claimed bytes 64 KiB at a time past the end of the file: 16 million empty reads
    # (83 s); a base-256 size of 2^80 would never end.
    (tmp_path / "s.tar").write_bytes(member("a.jpg", jpeg(0)) + header(f"b.{field}", 1 << 40) + b"x" * 5000)
    calls = counting_reads(monkeypatch)
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert len(calls) < 100
    assert got[0] == ("a", "", (16, 16, 3))
    assert got[1] == ("b", "", f"the shard breaks inside this sample, at byte 1536 (member 'b.{field}')")
    assert got[2][0] == str(tmp_path / "s.tar") + ".broken" and "(it is cut short inside a member)" in got[2][2]


def zeros_bz2(prefix: bytes, n_mib: int, suffix: bytes) -> bytes:
    compressor = bz2.BZ2Compressor(9)
    out = [compressor.compress(prefix)]
    out += [compressor.compress(b"\0" * (1 << 20)) for _ in range(n_mib)]
    return b"".join(out) + compressor.compress(suffix) + compressor.flush()


def test_a_bzip2_bomb_is_read_in_bounded_memory_and_breaks_the_shard(tmp_path, monkeypatch):
    # tarfile decompresses each 64 KiB read whole: 2 KB of bzip2 holding 256 MiB of zeros took 805 MB and 440 s.
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1 << 20)  # the expansion guard starts past this (64 MiB)
    data = zeros_bz2(member("a.jpg", jpeg(0)) + header("b.txt", 16 << 20), 16, member("c.jpg", jpeg(1)) + END)
    assert len(data) < 2000
    (tmp_path / "s.tar.bz2").write_bytes(data)
    tracemalloc.start()
    got = rows(wds.read_shard(str(tmp_path / "s.tar.bz2")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 << 20  # 16 MiB of zeros decompressed at once before
    assert [r[0] for r in got] == ["a", "b", str(tmp_path / "s.tar.bz2") + ".broken"]
    assert "its bzip2 data expands more than 100 times" in got[2][2] and "a compression bomb" in got[2][2]


def test_compressed_zeros_after_the_end_marker_end_the_shard_without_losing_its_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1 << 20)
    (tmp_path / "s.tar.bz2").write_bytes(zeros_bz2(member("a.jpg", jpeg(0)) + END, 16, b""))
    piece = wds.read_shard(str(tmp_path / "s.tar.bz2"))
    assert rows(piece) == [("a", "", (16, 16, 3))]
    assert any("the zeros after its end marker are not read to their end" in p for p in piece.problems)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_a_shard_of_several_concatenated_compressed_streams_is_read_whole(tmp_path, compress):
    # bgzip (gzip) and pbzip2 write several streams; tarfile reads the first only, so the shard was broken
    # after the first stream's samples.
    plain = b"".join(member(f"{k}.jpg", jpeg(k)) for k in range(40)) + END
    cut = len(plain) // 2
    (tmp_path / "s.tar.x").write_bytes(compress(plain[:cut]) + compress(plain[cut:]))
    (tmp_path / "s.tar").write_bytes(plain)
    got = rows(wds.read_shard(str(tmp_path / "s.tar.x")))
    assert got == rows(wds.read_shard(str(tmp_path / "s.tar"))) and len(got) == 40


def test_a_damaged_compressed_stream_is_a_broken_row_naming_it(tmp_path):
    data = bytearray(gzip.compress(b"".join(member(f"{k}.jpg", jpeg(k)) for k in range(40)) + END))
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "s.tar.gz").write_bytes(bytes(data))
    got = rows(wds.read_shard(str(tmp_path / "s.tar.gz")))
    assert got[-1][0].endswith("s.tar.gz.broken") and len(got) < 41
    assert all(r[2] == (16, 16, 3) for r in got[:-2])
    (tmp_path / "cut.tar.bz2").write_bytes(bz2.compress(bytes(data))[:100])  # not one whole bzip2 block
    (only,) = rows(wds.read_shard(str(tmp_path / "cut.tar.bz2")))
    assert "its bzip2 data is cut short before anything in it can be decompressed" in only[2]


def test_a_gnu_sparse_member_breaks_the_shard_instead_of_filling_memory(tmp_path):
    # Each 512-byte extension block became ~2.6 KB of tuples: 20 MB of them (40 KB as .tar.gz) took 150 MB.
    head = bytearray(header("s.jpg", 0, tarfile.GNUTYPE_SPARSE))
    head[482] = 1  # isextended
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head[:512])
    block = bytearray(512)
    for i in range(21):
        block[24 * i : 24 * i + 24] = b"%011o\0%011o\0" % (i + 1, 1)
    block[504] = 1
    (tmp_path / "s.tar.gz").write_bytes(
        gzip.compress(member("a.jpg", jpeg(0)) + bytes(head[:512]) + bytes(block) * 4000)
    )
    tracemalloc.start()
    got = rows(wds.read_shard(str(tmp_path / "s.tar.gz")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    assert got[-1][0].endswith(".broken") and "member 's.jpg' is a sparse file" in got[-1][2]


def test_keys_written_alike_in_a_result_file_are_repeats(tmp_path):
    # A name byte that is not UTF-8 is written `\xff`: the key 'x_\udcff' and the literal key 'x_\\xff' gave two
    # rows with one id in the result file.
    jpg = jpeg(0)
    (tmp_path / "s.tar").write_bytes(member("x_\udcff.jpg", jpg) + member("x_\\xff.jpg", jpg) + END)
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    got = rows(piece)
    assert [render_id(i) for i in piece.ids] == ["x_\\xff", "x_\\xff.repeat-2"]
    assert got[0][2] == (16, 16, 3)
    assert got[1][2] == "key 'x_\\\\xff' is written 'x_\\\\xff' in a result file, as the key of its sample 1 is"


def test_a_member_name_past_path_max_is_skipped_and_named_not_held(tmp_path):
    # Keys are held while a shard is scored: 1 MiB pax names (1 KB each once gzipped) grew memory without bound.
    jpg, data = jpeg(0), b""
    for name in ("k" * (wds.MAX_NAME + 1) + ".jpg", "ok.jpg"):
        info = tarfile.TarInfo(name)
        info.size = len(jpg)
        data += info.tobuf(tarfile.PAX_FORMAT) + jpg + b"\0" * (-len(jpg) % 512)
    (tmp_path / "s.tar").write_bytes(data + END)
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    assert rows(piece) == [("ok", "", (16, 16, 3))]
    (problem,) = piece.problems
    assert (
        problem.startswith("member 'kkk")
        and f"has a name of {wds.MAX_NAME + 5} characters, above 4096; skipped" in problem
    )


def test_a_plain_tar_whose_first_name_starts_like_a_bzip2_stream_is_read_as_a_tar(tmp_path):
    (tmp_path / "s.tar").write_bytes(member("BZh9.jpg", jpeg(0)) + member("x.jpg", jpeg(1)) + END)
    assert rows(wds.read_shard(str(tmp_path / "s.tar"))) == [("BZh9", "", (16, 16, 3)), ("x", "", (16, 16, 3))]
