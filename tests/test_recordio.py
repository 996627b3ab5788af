"""RecordIO (`.rec` + `.idx`): both layouts, multi-part records, labels, damaged records and files, refused indexes.

Every file is written here by tests/recordio_writer.py from the format facts (MXNet does not install beside
this project's numpy).
"""

import io
import os
import struct
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from recordio_writer import MAGIC, frame, frame_part, payload, with_magic, write_rec  # noqa: E402

from vitnt_jax import recordio  # noqa: E402
from vitnt_jax.data import ImageError, read_image  # noqa: E402
from vitnt_jax.sources import SourceError  # noqa: E402

pytest_plugins = ["storage_fixtures"]  # the S3 server on 127.0.0.1: storage_env, s3_bucket


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def rows(pieces):
    """Returns every row of every piece: (id, label, decoded array or the error text)."""
    out = []
    for piece in pieces.pieces:
        source = piece.read()
        assert len(source.ids) == piece.size
        for j, image_id in enumerate(source.ids):
            try:
                value = source.load(j)
            except ImageError as error:
                value = str(error)
            out.append((image_id, source.labels[j], value))
    return out


def frames_of(path):
    """Returns the (offset, cflag, length) of every frame of a .rec, walking it from the start."""
    data, at, out = open(path, "rb").read(), 0, []
    while at < len(data):
        magic, lrecord = struct.unpack_from("<II", data, at)
        assert magic == MAGIC
        out.append((at, lrecord >> 29, lrecord & ((1 << 29) - 1)))
        at += 8 + ((lrecord & ((1 << 29) - 1)) + 3) // 4 * 4
    return out


def test_plain_layout_every_key_is_an_image_with_its_label(tmp_path):
    images = [jpeg(k) for k in range(5)] + [png(9)]
    labels = [3, 0.1, -2.0, (0.5, 2.0), 7.25, 1e6]
    write_rec(tmp_path / "p.rec", list(zip(labels, images, strict=True)))
    pieces = recordio.open_rec(str(tmp_path / "p.rec"), piece_rows=4)
    assert pieces.name == f"rec {tmp_path / 'p.rec'} (plain im2rec layout, 6 images)"
    assert pieces.with_label and pieces.problems == []
    assert [(p.index, p.name, p.size) for p in pieces.pieces] == [(0, "p.rec keys 0..3", 4), (1, "p.rec keys 4..5", 2)]
    got = rows(pieces)
    assert [r[0] for r in got] == ["0", "1", "2", "3", "4", "5"]
    assert [r[1] for r in got] == ["3", repr(float(np.float32(0.1))), "-2", "0.5;2", "7.25", "1000000"]
    for (_, _, array), data in zip(got, images, strict=True):
        np.testing.assert_array_equal(array, read_image(data))  # the same bytes decode alike


def test_plain_layout_keys_in_key_order_whatever_the_file_order(tmp_path):
    images = [jpeg(k) for k in range(6)]
    keys = [40, 7, 12, 3, 100, 8]
    write_rec(tmp_path / "k.rec", [(k, im) for k, im in zip(keys, images, strict=True)], keys=keys)
    pieces = recordio.open_rec(str(tmp_path / "k.rec"), piece_rows=2)
    got = rows(pieces)
    assert [r[0] for r in got] == ["3", "7", "8", "12", "40", "100"]
    assert [r[1] for r in got] == ["3", "7", "8", "12", "40", "100"]
    by_key = dict(zip(keys, images, strict=True))
    for image_id, _, array in got:
        np.testing.assert_array_equal(array, read_image(by_key[int(image_id)]))
    # Pieces whose records are scattered in the file are read record by record, with the same result.
    assert recordio.open_rec(str(tmp_path / "k.rec"), piece_rows=3).identity.endswith("pieces of 3")


def test_insightface_layout_images_only_identity_records_give_no_rows(tmp_path):
    images = [jpeg(k) for k in range(7)]
    identities = [0, 0, 1, 1, 1, 2, 5]
    write_rec(tmp_path / "train.rec", list(zip(identities, images, strict=True)), header="insightface")
    assert len(recordio.RecordFile(str(tmp_path / "train.rec")).index) == 1 + 7 + 4  # header, images, 4 identities
    pieces = recordio.open_rec(str(tmp_path / "train.rec"), piece_rows=3)
    assert pieces.name == f"rec {tmp_path / 'train.rec'} (insightface layout, 7 images)"
    assert [p.size for p in pieces.pieces] == [3, 3, 1]
    assert [p.name for p in pieces.pieces] == ["train.rec keys 1..3", "train.rec keys 4..6", "train.rec keys 7..7"]
    got = rows(pieces)
    assert [r[0] for r in got] == [str(k) for k in range(1, 8)]
    assert [r[1] for r in got] == [str(x) for x in identities]
    for (_, _, array), data in zip(got, images, strict=True):
        np.testing.assert_array_equal(array, read_image(data))
    assert "insightface layout, 7 images (header 8, 12)" in pieces.identity


def test_identity_is_the_same_for_every_opener_and_names_the_plan(tmp_path):
    write_rec(tmp_path / "a.rec", [(k, jpeg(k)) for k in range(5)], header="insightface")
    one = recordio.open_rec(str(tmp_path / "a.rec"), piece_rows=2)
    assert one.identity == recordio.open_rec("file://" + str(tmp_path / "a.rec"), piece_rows=2).identity
    assert one.identity != recordio.open_rec(str(tmp_path / "a.rec"), piece_rows=3).identity
    with open(tmp_path / "a.idx", "a") as f:
        f.write("99\t0\n")
    assert one.identity != recordio.open_rec(str(tmp_path / "a.rec"), piece_rows=2).identity


def test_multi_part_records_are_joined_with_the_magic_word_between_parts(tmp_path):
    images = [jpeg(k) for k in range(4)]
    split = with_magic(images[1], 3)  # two magic words inside a JPEG comment: three parts
    labelled = with_magic(images[2], 4, at=24 + 8)  # after two float32 labels: four parts
    write_rec(tmp_path / "m.rec", [(1, images[0]), (2, split), ((4, 5), labelled), (6, images[3])])
    flags = [cflag for _, cflag, _ in frames_of(tmp_path / "m.rec")]
    assert flags == [0, 1, 2, 3, 1, 2, 2, 3, 0]
    got = rows(recordio.open_rec(str(tmp_path / "m.rec"), piece_rows=10))
    assert [r[1] for r in got] == ["1", "2", "4;5", "6"]
    for (_, _, array), data in zip(got, images, strict=True):
        np.testing.assert_array_equal(array, read_image(data))
    header, image = recordio.RecordFile(str(tmp_path / "m.rec")).read(1)
    assert (header.flag, header.label, header.id, image) == (0, 2.0, 1, split)


def test_header_only_records_among_images_are_error_rows(tmp_path):
    extra = [(3, frame(payload(5.0)))]  # a plain file whose key 3 holds a header and no image
    write_rec(tmp_path / "h.rec", [(0, jpeg(0)), (1, jpeg(1)), (2, jpeg(2))], extra=extra)
    got = rows(recordio.open_rec(str(tmp_path / "h.rec"), piece_rows=2))
    assert [r[0] for r in got] == ["0", "1", "2", "3"]
    assert got[3][1:] == ("5", "key 3 holds no image bytes (a header-only record)")
    # insightface: an identity-range record inside the image keys is that key's error row
    write_rec(tmp_path / "i.rec", [(0, jpeg(0)), ((1, 2), b""), (1, jpeg(2))], header=(4, 4))
    got = rows(recordio.open_rec(str(tmp_path / "i.rec"), piece_rows=8))
    assert [r[:2] for r in got] == [("1", "0"), ("2", "1;2"), ("3", "1")]
    assert got[1][2] == "key 2 holds no image bytes (a header-only record)"


def test_an_image_key_the_index_lacks_is_that_keys_error_row(tmp_path):
    write_rec(tmp_path / "g.rec", [(0, jpeg(0)), (1, jpeg(1)), (2, jpeg(2))], header=(5, 5), keys=[1, 2, 4])
    pieces = recordio.open_rec(str(tmp_path / "g.rec"), piece_rows=2)
    got = rows(pieces)
    assert [r[0] for r in got] == ["1", "2", "3", "4"]
    assert got[2][1:] == ("", f"key 3 is not in the index {tmp_path / 'g.idx'}")
    assert [isinstance(r[2], np.ndarray) for r in got] == [True, True, False, True]
    assert pieces.problems == [
        f"1 of the image keys 1..4 are not in the index {tmp_path / 'g.idx'}; their rows are errors"
    ]


def test_a_truncated_record_and_a_truncated_file_keep_every_row(tmp_path):
    images = [jpeg(k) for k in range(6)]
    written = write_rec(tmp_path / "t.rec", [(k, im) for k, im in enumerate(images)], header="insightface")
    whole = open(tmp_path / "t.rec", "rb").read()
    offsets = dict(written)
    cut = offsets[4] + 100  # inside key 4's image: key 4 is cut, keys 5 and 6 start past the end
    with open(tmp_path / "t.rec", "wb") as f:
        f.write(whole[:cut])
    pieces = recordio.open_rec(str(tmp_path / "t.rec"), piece_rows=4)
    got = rows(pieces)
    assert [r[0] for r in got] == ["1", "2", "3", "4", "5", "6"]
    assert [isinstance(r[2], np.ndarray) for r in got] == [True, True, True, False, False, False]
    claims = 24 + len(images[3])
    assert got[3][2] == f"truncated record at byte {offsets[4]}: it claims {claims} bytes, the file ends at byte {cut}"
    assert (
        got[4][2] == f"record at byte {offsets[5]} lies past the end of the .rec ({cut} bytes): the file is cut short"
    )
    assert [r[1] for r in got] == ["0", "1", "2", "", "", ""]
    # 2 images and the 6 identity-range records start past the end
    assert pieces.problems[-1].startswith(f"8 indexed records start past the end of {tmp_path / 't.rec'} ({cut} bytes)")
    # Cut inside a frame's 8 bytes
    with open(tmp_path / "t.rec", "wb") as f:
        f.write(whole[: offsets[6] + 5])
    got = rows(recordio.open_rec(str(tmp_path / "t.rec"), piece_rows=4))
    assert got[5][2] == f"truncated record at byte {offsets[6]}: the file ends at byte {offsets[6] + 5}"
    assert [isinstance(r[2], np.ndarray) for r in got] == [True] * 5 + [False]


def test_damaged_records_are_their_own_error_rows_naming_the_byte(tmp_path):
    images = [jpeg(k) for k in range(3)]
    good = frame(payload(9, images[2], id=9))
    extra = [
        (10, frame_part(0, payload(1, images[0]), magic=0xDEADBEEF)),  # bad magic
        (11, frame_part(2, payload(1, images[0]))),  # starts with a middle part
        (12, frame_part(1, payload(1, images[0])[:40]) + frame_part(0, b"1234")),  # a new record before the last part
        (13, frame_part(1, payload(1, images[0])[:40])),  # its last part is missing (the next record follows)
        (14, frame_part(0, b"0123456789")),  # shorter than the IRHeader
        (15, frame_part(0, struct.pack("<IfQQ", 1000, 0, 0, 0) + b"ab")),  # flag labels past the payload
        (16, frame_part(0, payload(1, images[0]), length=100000)),  # claims past the next record
        (17, frame_part(0, payload(2, b"not an image at all"))),
        (18, good),
        (19, frame_part(0, payload(tuple(range(1025)), images[0]))),  # more labels than a label column takes
    ]
    written = dict(write_rec(tmp_path / "d.rec", [(k, im) for k, im in enumerate(images[:2])], extra=extra))
    got = {r[0]: r for r in rows(recordio.open_rec(str(tmp_path / "d.rec"), piece_rows=4))}
    assert list(got) == ["0", "1", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19"]
    at = {k: written[int(k)] for k in got}
    assert got["10"][2] == f"bad RecordIO magic 0xdeadbeef at byte {at['10']}"
    assert got["11"][2] == f"continuation out of order at byte {at['11']}: a record starts with part flag 2"
    assert got["12"][2] == (
        f"continuation out of order at byte {at['12'] + 48}: part flag 0 before the last part of the record "
        f"at byte {at['12']}"
    )
    assert got["13"][2] == f"truncated record at byte {at['13']}: its last part is missing (cut at byte {at['14']})"
    assert got["14"][2] == f"record at byte {at['14']} holds 10 bytes, shorter than the 24-byte IRHeader"
    assert got["15"][2] == (
        f"record at byte {at['15']}: its IRHeader flag 1000 asks for 1000 float32 labels, past the end of its 26 bytes"
    )
    assert got["16"][2] == f"record at byte {at['16']} claims 100000 bytes, past the next record at byte {at['17']}"
    assert got["17"][2].startswith("not a")
    assert got["19"][2] == (
        f"record at byte {at['19']}: its IRHeader flag 1025 asks for more labels than the 1024 a label column takes"
    )
    assert [got[k][1] for k in ("10", "16", "17", "18")] == ["", "", "2", "9"]
    np.testing.assert_array_equal(got["18"][2], read_image(images[2]))
    np.testing.assert_array_equal(got["1"][2], read_image(images[1]))


def test_a_hostile_length_at_the_end_never_allocates_what_the_file_lacks(tmp_path):
    extra = [(2, struct.pack("<II", MAGIC, (1 << 29) - 1) + payload(1, b"\xff\xd8"))]
    write_rec(tmp_path / "x.rec", [(0, jpeg(0)), (1, jpeg(1))], extra=extra)
    size = os.path.getsize(tmp_path / "x.rec")
    pieces = recordio.open_rec(str(tmp_path / "x.rec"), piece_rows=8)
    tracemalloc.start()
    source = pieces.pieces[0].read()
    with pytest.raises(ImageError, match=f"claims {(1 << 29) - 1} bytes, the file ends at byte {size}"):
        source.load(2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    assert source.load(1).shape == (16, 16, 3)


def test_a_contiguous_piece_is_one_ranged_read(tmp_path, monkeypatch):
    offsets = dict(write_rec(tmp_path / "r.rec", [(k, jpeg(k)) for k in range(9)], header="insightface"))
    pieces = recordio.open_rec(str(tmp_path / "r.rec"), piece_rows=4)
    reads = []

    class Counting(io.BufferedReader):
        def read(self, n=-1):
            data = super().read(n)
            reads.append((self.tell() - len(data), len(data)))
            return data

    monkeypatch.setattr(recordio.storage, "open_read", lambda path: Counting(io.FileIO(path)))
    source = pieces.pieces[1].read()
    assert reads == [(offsets[5], offsets[9] - offsets[5])]  # keys 5..8, up to where key 9 starts
    assert source.ids == ["5", "6", "7", "8"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("0\t0\n1 40\n", "line 2 is not 'KEY<TAB>OFFSET' (two decimal numbers): '1 40'"),
        ("0\t0\n1\t40\n2\t4x\n", "line 3 is not 'KEY<TAB>OFFSET' (two decimal numbers): '2\\t4x'"),
        ("0\t0\n1\t\n", "line 2 is not"),
        ("0\t0\t0\n", "line 1 is not"),
        ("0\t0\n\n", "line 2 is not"),
        ("0\t-5\n", "line 1 is not"),
        ("0\t0\n" + "9" * 5000, "line 2 is not"),
        ("0\t0\n1\t1234567890123456789\n", "line 2 is not"),
    ],
)
def test_a_malformed_index_line_is_refused_in_one_sentence(tmp_path, text, why):
    write_rec(tmp_path / "b.rec", [(0, jpeg(0)), (1, jpeg(1))], index=False)
    (tmp_path / "b.idx").write_text(text)
    with pytest.raises(SourceError) as error:
        recordio.open_rec(str(tmp_path / "b.rec"), piece_rows=2)
    message = error.value.render({"rec": "--rec"})
    assert message.startswith(f"--rec index {tmp_path / 'b.idx'} {why}") and "\n" not in message


def test_a_long_index_is_parsed_block_by_block_and_its_bad_line_named(tmp_path, monkeypatch):
    monkeypatch.setattr(recordio, "INDEX_BLOCK", 64)
    lines = [f"{k}\t{8 * k}\n" for k in range(500)]
    (tmp_path / "l.idx").write_text("".join(lines) + "500\t4000")  # the last line without a newline
    index = recordio.read_index(str(tmp_path / "l.idx"))
    np.testing.assert_array_equal(index.keys, np.arange(501))
    np.testing.assert_array_equal(index.offsets, 8 * np.arange(501))
    assert index.file_order is None and index.keys.dtype == np.int64
    lines[321] = "321\t2568x\n"
    (tmp_path / "l.idx").write_text("".join(lines))
    with pytest.raises(SourceError, match="line 322 is not"):
        recordio.read_index(str(tmp_path / "l.idx"))

    def removed(*args, **kwargs):
        raise AttributeError("fromstring")

    monkeypatch.setattr(recordio.np, "fromstring", removed)  # a numpy without it parses alike
    lines[321] = "321\t2568\n"
    (tmp_path / "l.idx").write_text("".join(lines))
    np.testing.assert_array_equal(recordio.read_index(str(tmp_path / "l.idx")).offsets, 8 * np.arange(500))
    (tmp_path / "l.idx").write_bytes(b"0\t0\r\n1\t8\r\n")  # written in text mode on Windows
    np.testing.assert_array_equal(recordio.read_index(str(tmp_path / "l.idx")).offsets, [0, 8])


def test_duplicate_keys_an_empty_index_and_missing_files_are_refused(tmp_path):
    write_rec(tmp_path / "b.rec", [(0, jpeg(0)), (1, jpeg(1))])
    (tmp_path / "b.idx").write_text("0\t0\n1\t100\n0\t200\n")

    def refusal() -> str:
        with pytest.raises(SourceError) as error:
            recordio.open_rec(str(tmp_path / "b.rec"), piece_rows=2)
        assert "\n" not in str(error.value) and error.value.field == "rec"
        return str(error.value)

    assert refusal() == f"rec index {tmp_path / 'b.idx'} lists key 0 twice; remove the duplicate line."
    (tmp_path / "b.idx").write_text("")
    assert refusal().startswith(f"rec index {tmp_path / 'b.idx'} is empty;")
    (tmp_path / "b.idx").write_text("0\t1000000\n")
    assert "puts every record past them" in refusal()
    os.unlink(tmp_path / "b.idx")
    assert refusal() == (
        f"rec {tmp_path / 'b.rec'} has no index beside it ({tmp_path / 'b.idx'} does not exist); put the .idx "
        "written with the .rec there (same name, suffix .idx)."
    )
    with pytest.raises(SourceError, match="does not exist; pass the .rec file"):
        recordio.open_rec(str(tmp_path / "none.rec"), piece_rows=2)
    os.mkdir(tmp_path / "folder.rec")
    with pytest.raises(SourceError, match="folder.rec is not a file; pass the .rec file"):
        recordio.open_rec(str(tmp_path / "folder.rec"), piece_rows=2)
    with pytest.raises(SourceError, match="is the index; pass the .rec file"):
        recordio.open_rec(str(tmp_path / "b.idx"), piece_rows=2)
    assert recordio.index_path("s3://bucket/sets/train.rec") == "s3://bucket/sets/train.idx"
    assert recordio.index_path("/data/v1.2/train") == "/data/v1.2/train.idx"


def test_a_damaged_or_impossible_header_is_refused(tmp_path):
    write_rec(tmp_path / "h.rec", [(0, jpeg(0))], header=(0.5, 3))
    with pytest.raises(SourceError, match=r"its record 0 is a header whose labels 0.5;3 are no key range"):
        recordio.open_rec(str(tmp_path / "h.rec"), piece_rows=2)
    write_rec(tmp_path / "h.rec", [(0, jpeg(0))], header=(1000, 1000))
    with pytest.raises(SourceError, match="its header names 999 images but the index .* lists 2 records"):
        recordio.open_rec(str(tmp_path / "h.rec"), piece_rows=2)
    write_rec(tmp_path / "h.rec", [(0, jpeg(0))], header="insightface")
    data = bytearray(open(tmp_path / "h.rec", "rb").read())
    data[0] ^= 0xFF
    (tmp_path / "h.rec").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"its record 0 \(the header that says which layout it has\) is damaged"):
        recordio.open_rec(str(tmp_path / "h.rec"), piece_rows=2)


def test_read_through_a_file_url(tmp_path):
    images = [jpeg(k) for k in range(5)]
    write_rec(tmp_path / "u.rec", [(k % 2, im) for k, im in enumerate(images)], header="insightface")
    url = "file://" + str(tmp_path / "u.rec")
    pieces = recordio.open_rec(url, piece_rows=2)
    assert pieces.name == f"rec {url} (insightface layout, 5 images)"
    got = rows(pieces)
    assert [r[:2] for r in got] == [("1", "0"), ("2", "1"), ("3", "0"), ("4", "1"), ("5", "0")]
    for (_, _, array), data in zip(got, images, strict=True):
        np.testing.assert_array_equal(array, read_image(data))


def test_a_rounded_float32_image_count_is_corrected_by_the_first_identity_record(tmp_path, monkeypatch):
    # Above 2^24 the header's float32 count is rounded (to a multiple of 4 near WebFace42M's 42.5M images);
    # here the header says 8 images for 6, and the check is made as it would be up there.
    monkeypatch.setattr(recordio, "_rounding", lambda a: 2)
    identities = [(7, frame(payload((1, 3)))), (8, frame(payload((3, 7))))]
    write_rec(tmp_path / "f.rec", [(k // 2, jpeg(k)) for k in range(6)], header=(9, 9), extra=identities)
    pieces = recordio.open_rec(str(tmp_path / "f.rec"), piece_rows=4)
    assert pieces.name.endswith("(insightface layout, 6 images)") and pieces.problems == []
    assert [r[:2] for r in rows(pieces)] == [(str(k), str((k - 1) // 2)) for k in range(1, 7)]
    write_rec(tmp_path / "f.rec", [(k // 2, jpeg(k)) for k in range(6)], header=(8, 8))  # no identity record
    pieces = recordio.open_rec(str(tmp_path / "f.rec"), piece_rows=4)
    assert pieces.name.endswith("(insightface layout, 7 images)")
    assert pieces.problems[0].startswith("the header's image count 7 is above 2^24")
    assert [r[0] for r in rows(pieces)] == [str(k) for k in range(1, 8)]


def test_the_registered_source_opens_the_same_pieces(tmp_path):
    from vitnt_jax.sources import SourceSpec

    write_rec(tmp_path / "s.rec", [(k, jpeg(k)) for k in range(5)], header="insightface")
    spec = SourceSpec("rec", str(tmp_path / "s.rec"))
    assert spec.chunked
    pieces = spec.open_pieces(2)
    direct = recordio.open_rec(str(tmp_path / "s.rec"), piece_rows=2)
    assert (pieces.name, pieces.identity, [p.size for p in pieces.pieces]) == (
        direct.name,
        direct.identity,
        [2, 2, 1],
    )
    assert (pieces.color, pieces.align) == ("rgb", "none")
    assert [r[:2] for r in rows(pieces)] == [r[:2] for r in rows(direct)]


def test_a_file_cut_after_the_plan_is_refused_not_turned_into_error_rows(tmp_path):
    # The plan (error rows for records past the end included) is fixed when the file is opened: a file
    # that shrinks afterwards would change a piece's rows, so reading that piece stops the run instead.
    write_rec(tmp_path / "c.rec", [(k, jpeg(k)) for k in range(4)], header="insightface")
    pieces = recordio.open_rec(str(tmp_path / "c.rec"), piece_rows=2)
    os.truncate(tmp_path / "c.rec", os.path.getsize(tmp_path / "c.rec") - 200)
    assert pieces.pieces[0].read().ids == ["1", "2"]
    with pytest.raises(SourceError, match="changed while it was read"):
        pieces.pieces[1].read()


def test_a_storage_failure_while_a_piece_is_read_stops_the_run_in_one_sentence(tmp_path, monkeypatch):
    write_rec(tmp_path / "n.rec", [(k, jpeg(k)) for k in range(3)])
    pieces = recordio.open_rec(str(tmp_path / "n.rec"), piece_rows=2)

    def failing(path):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(recordio.storage, "open_read", failing)
    with pytest.raises(SourceError) as error:
        pieces.pieces[0].read()
    assert error.value.render({"rec": "--rec", "resume": "--resume"}) == (
        f"--rec {tmp_path / 'n.rec'} could not be read ([Errno 104] Connection reset by peer); check the storage and "
        "rerun with --resume."
    )


def test_a_piece_spanning_too_many_bytes_is_read_record_by_record_alike(tmp_path, monkeypatch):
    images = [jpeg(k) for k in range(5)]
    extra = [(9, frame_part(0, payload(1, images[0]), magic=0xDEADBEEF))]
    write_rec(tmp_path / "w.rec", [(k, im) for k, im in enumerate(images)], extra=extra)
    ranged = rows(recordio.open_rec(str(tmp_path / "w.rec"), piece_rows=3))
    monkeypatch.setattr(recordio, "MAX_RANGE", 100)
    apart = rows(recordio.open_rec(str(tmp_path / "w.rec"), piece_rows=3))
    assert [r[:2] for r in apart] == [r[:2] for r in ranged] and len(apart) == 6
    for a, b in zip(apart, ranged, strict=True):
        np.testing.assert_array_equal(a[2], b[2])
    assert apart[5][2].startswith("bad RecordIO magic 0xdeadbeef")
    # Two index offsets 4 bytes apart: the first record has no room for its frame
    (tmp_path / "w.idx").write_text("0\t0\n1\t4\n")
    (one,) = recordio.RecordFile(str(tmp_path / "w.rec")).read_keys(np.array([0]))
    assert str(one) == "record at byte 0 has 4 bytes before the next record at byte 4"


def test_read_through_s3_on_a_loopback_server(tmp_path, monkeypatch, s3_bucket):
    # The S3 server of tests/storage_fixtures.py on 127.0.0.1 (dummy credentials, network guard on): the same rows.
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    images = [jpeg(k) for k in range(5)]
    write_rec(tmp_path / "s.rec", [(k // 2, im) for k, im in enumerate(images)], header="insightface")
    fs.put(str(tmp_path / "s.rec"), f"{s3_bucket}/sets/s.rec")
    fs.put(str(tmp_path / "s.idx"), f"{s3_bucket}/sets/s.idx")
    asked = []
    real = type(fs)._cat_file

    async def counting(self, path, start=None, end=None, **kwargs):
        asked.append((start, end))
        return await real(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(type(fs), "_cat_file", counting)
    remote = recordio.open_rec(f"{s3_bucket}/sets/s.rec", piece_rows=2)
    local = recordio.open_rec(str(tmp_path / "s.rec"), piece_rows=2)
    assert remote.identity == local.identity
    got, want = rows(remote), rows(local)
    offsets = recordio.RecordFile(str(tmp_path / "s.rec")).index.offsets.tolist()
    # record 0 at open, then one request a piece for exactly its records' bytes (keys 1-2, 3-4, 5)
    assert asked == [(0, offsets[1]), (offsets[1], offsets[3]), (offsets[3], offsets[5]), (offsets[5], offsets[6])]
    assert [r[:2] for r in got] == [r[:2] for r in want] == [(str(k + 1), str(k // 2)) for k in range(5)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a[2], b[2])
    fs.rm(f"{s3_bucket}/sets/s.idx")
    with pytest.raises(SourceError, match=r"has no index beside it \(s3://t-\w+/sets/s.idx does not exist\)"):
        recordio.open_rec(f"{s3_bucket}/sets/s.rec", piece_rows=2)
