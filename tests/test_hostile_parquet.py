"""Hostile and unlucky Parquet inputs: crafted footers and pages, odd ids, odd globs, files that change."""

import io
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitnt_jax import chunked, output, parquet, storage
from vitnt_jax.data import ImageError, read_image
from vitnt_jax.output import OutputError, Row
from vitnt_jax.sources import SourceError

from helpers import smooth_faces

pytest_plugins = ["storage_fixtures"]  # the S3 server on 127.0.0.1: storage_env, s3_bucket

# ------------------------------------------------------------------------------------------------------------
# A Thrift compact-protocol writer: enough of the Parquet format to write footers and pages pyarrow would not.

I32, I64, BIN, LIST, STRUCT = 5, 6, 8, 9, 12


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def thrift(fields) -> bytes:
    """A struct: fields (id, type, value) in increasing id order."""
    out, last = bytearray(), 0
    for fid, kind, value in fields:
        out += bytes([(fid - last) << 4 | kind])
        out += encode(kind, value)
        last = fid
    return bytes(out) + b"\0"


def encode(kind: int, value) -> bytes:
    if kind in (I32, I64):
        return varint((value << 1) ^ (value >> 63))
    if kind == BIN:
        value = value.encode() if isinstance(value, str) else value
        return varint(len(value)) + value
    if kind == LIST:
        item, items = value
        head = bytes([len(items) << 4 | item]) if len(items) < 15 else bytes([0xF0 | item]) + varint(len(items))
        return head + b"".join(encode(item, i) for i in items)
    return thrift(value)


def page(values: int, body: bytes, stored: bytes | None = None, size: int | None = None) -> bytes:
    """A data page (v1, PLAIN values, RLE levels) of `body`, stored as `stored` (compressed) when given."""
    stored = body if stored is None else stored
    header = [(1, I32, values), (2, I32, 0), (3, I32, 3), (4, I32, 3)]
    size = len(body) if size is None else size
    return thrift([(1, I32, 0), (2, I32, size), (3, I32, len(stored)), (5, STRUCT, header)]) + stored


def levels(n: int, present: bool) -> bytes:
    """Definition levels of n rows (one run-length run, bit width 1) with their 4-byte length."""
    run = varint(n << 1) + (b"\1" if present else b"\0")
    return struct.pack("<I", len(run)) + run


def plain(values) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def crafted(
    path, rows: int, pages: bytes, *, codec=0, claimed=None, group_bytes=None, offset=4, compressed=None
) -> str:
    """Writes a file of one optional binary column 'image' and one row group whose footer says what is passed."""
    claimed = len(pages) if claimed is None else claimed
    meta = [
        (1, I32, 6),
        (2, LIST, (I32, [0, 3])),
        (3, LIST, (BIN, ["image"])),
        (4, I32, codec),
        (5, I64, rows),
        (6, I64, claimed),
        (7, I64, len(pages) if compressed is None else compressed),
        (9, I64, offset),
    ]
    group = [
        (1, LIST, (STRUCT, [[(2, I64, offset), (3, STRUCT, meta)]])),
        (2, I64, claimed if group_bytes is None else group_bytes),
        (3, I64, rows),
    ]
    schema = [[(4, BIN, "schema"), (5, I32, 1)], [(1, I32, 6), (3, I32, 1), (4, BIN, "image")]]
    footer = thrift([(1, I32, 1), (2, LIST, (STRUCT, schema)), (3, I64, rows), (4, LIST, (STRUCT, [group]))])
    with open(path, "wb") as f:
        f.write(b"PAR1" + pages + footer + struct.pack("<I", len(footer)) + b"PAR1")
    return str(path)


def jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def blobs():
    return [jpeg(f) for f in smooth_faces(6, 32)]


def rows_of(pieces):
    out = []
    for piece in pieces.pieces:
        src = piece.read()
        for j in range(len(src)):
            try:
                got = src.load(j)
            except ImageError as error:
                got = str(error)
            out.append((src.ids[j], got))
    return out


# ------------------------------------------------------------------------------------------------------------
# Footers


def test_the_crafted_writer_writes_what_pyarrow_reads(tmp_path):
    values = [b"abc", b"", b"de"]
    path = crafted(tmp_path / "ok.parquet", 3, page(3, levels(3, True) + plain(values)))
    assert pq.read_table(path).column("image").to_pylist() == values
    rows = rows_of(parquet.open_parquet(path, piece_rows=8))
    assert [r[0] for r in rows] == ["ok.parquet:0", "ok.parquet:1", "ok.parquet:2"]
    assert all(isinstance(r[1], str) for r in rows)  # not images: error rows


@pytest.mark.parametrize(
    "content, why",
    [
        (b"PAR1", "it holds 4 bytes, too few for a Parquet file"),
        (b"PAR1PAR1", "it holds 8 bytes, too few for a Parquet file"),
        (b"PAR1" + b"x" * 20 + struct.pack("<I", 10**9) + b"PAR1", "its footer claims 1000000000 bytes, more than"),
        (b"PAR1" + b"x" * 20 + struct.pack("<I", 2**32 - 1) + b"PAR1", "its footer claims 4294967295 bytes, more"),
        (b"PAR1" + b"x" * 20 + struct.pack("<I", 8) + b"PAR0", "Parquet magic bytes not found at its end"),
        (b"PARE" + b"x" * 20 + struct.pack("<I", 8) + b"PARE", "it is an encrypted Parquet file (its footer is"),
    ],
)
def test_ends_that_are_no_parquet_footer_are_refused_before_pyarrow_reads(tmp_path, content, why):
    (tmp_path / "x.parquet").write_bytes(content)
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(str(tmp_path / "x.parquet"), piece_rows=8)
    assert str(error.value).startswith(f"parquet file x.parquet is not a readable Parquet file ({why}")
    assert str(error.value).endswith("; pass Parquet files only.")


def test_a_footer_above_the_limit_is_refused_unread(tmp_path, blobs, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": blobs}), path)
    length = struct.unpack("<I", path.read_bytes()[-8:-4])[0]
    monkeypatch.setattr(parquet, "MAX_FOOTER", length - 1)
    with pytest.raises(SourceError, match=rf"its footer claims {length} bytes, above the {length - 1} bytes this"):
        parquet.open_parquet(str(path), piece_rows=8)
    monkeypatch.setattr(parquet, "MAX_FOOTER", length)
    assert len(parquet.open_parquet(str(path), piece_rows=8)) == 1


def test_a_footer_longer_than_the_read_tail_is_read_whole(tmp_path, blobs):
    path = tmp_path / "t.parquet"
    table = pa.table({"image": blobs, "id": [f"i{k}" for k in range(6)]})
    pq.write_table(table.replace_schema_metadata({"note": "n" * 200_000}), path, row_group_size=2)
    assert struct.unpack("<I", path.read_bytes()[-8:-4])[0] > parquet._TAIL  # begins before the end first read
    rows = rows_of(parquet.open_parquet(str(path), piece_rows=2))
    assert [r[0] for r in rows] == [f"i{k}" for k in range(6)]
    np.testing.assert_array_equal(rows[5][1], read_image(blobs[5]))


def test_millions_of_rows_claimed_in_a_few_bytes_are_refused(tmp_path):
    # One run-length run of definition levels makes ten million null rows: a 118-byte file.
    n = 10_000_000
    path = crafted(tmp_path / "nulls.parquet", n, page(n, levels(n, False)))
    assert os.path.getsize(path) < 200 and pq.ParquetFile(path).metadata.num_rows == n
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(path, piece_rows=4096)
    assert str(error.value) == (
        f"parquet file nulls.parquet row group 0 holds {n} rows (its footer says), above the "
        f"{parquet.MAX_GROUP_ROWS} rows one piece may hold; rewrite the table with smaller row groups (e.g. "
        "pyarrow.parquet.write_table(..., row_group_size=4096))."
    )


def test_pieces_of_more_rows_than_the_limit_may_be_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet, "MAX_GROUP_ROWS", 100)
    path = crafted(tmp_path / "nulls.parquet", 300, page(300, levels(300, False)))
    with pytest.raises(SourceError, match="holds 300 rows .* above the 100 rows one piece may hold"):
        parquet.open_parquet(path, piece_rows=50)
    rows = rows_of(parquet.open_parquet(path, piece_rows=300))
    assert len(rows) == 300 and {r[1] for r in rows} == {"image is null"}


def test_claimed_uncompressed_bytes_above_the_limit_are_refused(tmp_path, monkeypatch):
    body = levels(1, True) + plain([b"\0" * 100_000])
    stored = pa.compress(body, codec="zstd", asbytes=True)
    path = crafted(tmp_path / "z.parquet", 1, page(1, body, stored), codec=6, claimed=len(body))
    monkeypatch.setattr(parquet, "MAX_GROUP_BYTES", 50_000)
    with pytest.raises(SourceError, match=r"row group 0 holds 100\d\d\d bytes of the columns read .* above the 50000"):
        parquet.open_parquet(path, piece_rows=8)


def test_a_page_inflating_past_what_its_footer_claims_is_a_damaged_row_group(tmp_path, monkeypatch):
    # 4 MB of zeros compressed to a few hundred bytes, under a footer that claims 100 bytes uncompressed.
    body = levels(1, True) + plain([b"\0" * (4 << 20)])
    stored = pa.compress(body, codec="zstd", asbytes=True)
    path = crafted(tmp_path / "bomb.parquet", 1, page(1, body, stored), codec=6, claimed=100)
    assert os.path.getsize(path) < 1000
    monkeypatch.setattr(parquet, "GROUP_BYTES_FLOOR", 1 << 20)
    rows = rows_of(parquet.open_parquet(path, piece_rows=8))
    assert rows == [
        (
            "bomb.parquet:0",
            "bomb.parquet row group 0 cannot be decoded (its columns decode to more than "
            f"{parquet.GROUP_BYTES_SLACK * 100 + (1 << 20)} bytes; its footer says 100); the file is damaged",
        )
    ]


def test_a_codec_pyarrow_cannot_decompress_is_refused_at_open_not_made_error_rows(tmp_path):
    body = levels(1, True) + plain([b"abc"])
    path = crafted(tmp_path / "lzo.parquet", 1, page(1, body), codec=3)  # LZO: no pyarrow reads it
    with pytest.raises(OSError):
        pq.read_table(path)
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(path, piece_rows=8)
    assert str(error.value) == (
        "parquet file lzo.parquet compresses column 'image' with LZO, which this pyarrow cannot decompress; rewrite "
        "the table with zstd or snappy (pyarrow.parquet.write_table(..., compression='zstd'))."
    )


def test_a_footer_placing_a_column_outside_the_file_is_refused(tmp_path):
    body = levels(1, True) + plain([b"abc"])
    for offset, compressed in ((10**6, None), (0, None), (4, 10**9), (4, -5)):
        path = crafted(tmp_path / "far.parquet", 1, page(1, body), offset=offset, compressed=compressed)
        with pytest.raises(
            SourceError, match=r"^parquet file far.parquet is not a readable Parquet file \(its footer "
        ):
            parquet.open_parquet(path, piece_rows=8)


# ------------------------------------------------------------------------------------------------------------
# Files that change, globs that match odd things


def test_a_file_replaced_by_another_of_the_same_size_is_refused_when_read(tmp_path, blobs):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": blobs, "id": [f"a{k}" for k in range(6)]}), path, row_group_size=3)
    pieces = parquet.open_parquet(str(path), piece_rows=3)
    size = path.stat().st_size
    pq.write_table(pa.table({"image": blobs, "id": [f"b{k}" for k in range(6)]}), path, row_group_size=3)
    assert path.stat().st_size == size  # the same size: only the content tells them apart
    with pytest.raises(SourceError) as error:
        pieces.pieces[1].read()
    assert str(error.value) == (
        "parquet file t.parquet has another footer than the one it held when the run was planned; a run reads "
        "files that do not change (rerun on the new files with a new output)."
    )
    assert parquet.open_parquet(str(path), piece_rows=3).identity != pieces.identity


def test_a_file_cut_short_while_its_piece_is_read_is_refused_not_made_error_rows(tmp_path, blobs, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": blobs}), path)
    pieces = parquet.open_parquet(str(path), piece_rows=8)
    content = path.read_bytes()

    class Shrinking(io.BytesIO):
        """The whole file for the first read (the footer's check), then cut to 100 bytes (another writer)."""

        reads = 0

        def read(self, n=-1):
            self.reads += 1
            if self.reads == 2:
                self.truncate(100)
            return super().read(n)

    monkeypatch.setattr(parquet.storage, "open_read", lambda location: Shrinking(content))
    with pytest.raises(SourceError, match=r"^parquet file t.parquet holds 100 bytes, not the \d+ it held when the run"):
        pieces.pieces[0].read()


def test_running_out_of_memory_stops_the_piece_instead_of_making_error_rows(tmp_path, blobs, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": blobs}), path)
    pieces = parquet.open_parquet(str(path), piece_rows=8)

    def exhausted(self, *args, **kwargs):
        raise pa.ArrowMemoryError("malloc of size 4294967296 failed")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", exhausted)
    with pytest.raises(SourceError) as error:
        pieces.pieces[0].read()
    assert str(error.value).startswith("not enough memory to read parquet file t.parquet row group 0 (")
    assert str(error.value).endswith(
        "rewrite the table with smaller row groups or run on a host with more memory, then resume."
    )


def test_a_file_deleted_after_the_plan_stops_its_piece_in_one_sentence(tmp_path, blobs):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": blobs}), path)
    pieces = parquet.open_parquet(str(path), piece_rows=8)
    path.unlink()
    with pytest.raises(SourceError, match=r"^cannot read parquet file t.parquet row group 0 \(.*does not exist.*\);"):
        pieces.pieces[0].read()


def test_a_glob_lists_through_storage_and_skips_folders_fifos_and_broken_links(tmp_path, blobs, monkeypatch):
    pq.write_table(pa.table({"image": blobs[:2]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").mkdir()
    os.mkfifo(tmp_path / "c.parquet")
    os.symlink(tmp_path / "nowhere", tmp_path / "d.parquet")
    os.symlink(tmp_path / "a.parquet", tmp_path / "e.parquet")  # a link to a file is that file
    asked = []
    real = storage.glob
    monkeypatch.setattr(storage, "glob", lambda pattern: asked.append(pattern) or real(pattern))
    pieces = parquet.open_parquet(str(tmp_path / "*.parquet"), piece_rows=8)
    assert asked == [str(tmp_path / "*.parquet")]
    assert [p.name for p in pieces.pieces] == ["a.parquet row group 0 (rows 0..1)", "e.parquet row group 0 (rows 0..1)"]
    for name in ("c.parquet", "d.parquet"):
        with pytest.raises(SourceError, match=rf"{name} is not a regular file \(a FIFO, a device or a link to nothing"):
            parquet.open_parquet(str(tmp_path / name), piece_rows=8)


def test_on_s3_a_file_costs_one_head_and_one_ranged_get_to_open_and_a_same_size_rewrite_is_refused(
    s3_bucket, blobs, monkeypatch
):
    import aiobotocore.client
    import fsspec

    from storage_fixtures import clear_instance_caches  # after pytest loaded it as a plugin

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    for k in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": blobs[3 * k : 3 * k + 3], "id": [f"a{k}{j}" for j in range(3)]}), buffer)
        fs.pipe(f"{s3_bucket}/t/p-{k}.parquet", buffer.getvalue())
    calls = []
    real = aiobotocore.client.AioBaseClient._make_api_call

    async def spy(self, operation, params):
        calls.append((operation, params.get("Key"), params.get("Range")))
        return await real(self, operation, params)

    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", spy)
    pieces = parquet.open_parquet(f"{s3_bucket}/t/p-*.parquet", piece_rows=8)
    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", real)
    sizes = [fs.size(f"{s3_bucket}/t/p-{k}.parquet") for k in range(2)]
    assert sorted(c for c in calls if c[0] != "ListObjectsV2") == sorted(
        [("HeadObject", f"t/p-{k}.parquet", None) for k in range(2)]
        + [("GetObject", f"t/p-{k}.parquet", f"bytes=0-{sizes[k] - 1}") for k in range(2)]  # small: all of it
    )
    assert [c[0] for c in calls].count("ListObjectsV2") == 1
    assert [r[0] for r in rows_of(pieces)] == ["a00", "a01", "a02", "a10", "a11", "a12"]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": blobs[3:6], "id": ["b10", "b11", "b12"]}), buffer)
    assert len(buffer.getvalue()) == sizes[1]
    fs.pipe(f"{s3_bucket}/t/p-1.parquet", buffer.getvalue())
    with pytest.raises(SourceError, match=r"^parquet file p-1.parquet has another footer than the one it held when"):
        pieces.pieces[1].read()

    async def failing(self, path, start=None, end=None, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(type(fs), "_cat_file", failing)
    clear_instance_caches()  # a cached file system bound its cat_file to the real one
    with pytest.raises(SourceError) as error:  # a failing read at open is not called a damaged file
        parquet.open_parquet(f"{s3_bucket}/t/p-0.parquet", piece_rows=8)
    assert str(error.value) == (
        "cannot read parquet file p-0.parquet (connection reset by peer); check that it exists and is readable."
    )

    async def whole(self, path, start=None, end=None, **kwargs):  # a server that ignores the range asked for
        return b"PAR1" * 1000

    monkeypatch.setattr(type(fs), "_cat_file", whole)
    clear_instance_caches()
    with pytest.raises(
        SourceError, match=r"^cannot read parquet file p-0.parquet \(read 4000 bytes at 0, not \d+: the"
    ):
        parquet.open_parquet(f"{s3_bucket}/t/p-0.parquet", piece_rows=8)


# ------------------------------------------------------------------------------------------------------------
# Columns and ids


def test_a_dictionary_encoded_image_column_is_read(tmp_path, blobs):
    images = pa.array([blobs[0], blobs[1], blobs[0], None], pa.binary()).dictionary_encode()
    pq.write_table(pa.table({"image": images}), tmp_path / "d.parquet")
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "d.parquet").schema_arrow.field("image").type)
    rows = rows_of(parquet.open_parquet(str(tmp_path / "d.parquet"), piece_rows=8))
    np.testing.assert_array_equal(rows[0][1], read_image(blobs[0]))
    np.testing.assert_array_equal(rows[1][1], read_image(blobs[1]))
    np.testing.assert_array_equal(rows[2][1], read_image(blobs[0]))
    assert rows[3][1] == "image is null"


def test_column_names_with_dots_are_fetched_by_their_own_chunks(tmp_path, blobs):
    path = tmp_path / "dots.parquet"
    pq.write_table(pa.table({"a.b": blobs[:2], "a": [b"x" * 1000] * 2, "image.jpg": blobs[2:4]}), path)
    f = parquet._footer(str(path), "dots.parquet")
    spans, used = parquet._spans(f, ["a.b", "image.jpg"])
    chunks = [f.meta.row_group(0).column(i) for i in (0, 2)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    assert spans == (tuple((s, s + c.total_compressed_size) for s, c in zip(starts, chunks, strict=True)),)
    assert used == (sum(c.total_uncompressed_size for c in chunks),)
    rows = rows_of(parquet.open_parquet(str(path), piece_rows=8, image_column="a.b"))
    np.testing.assert_array_equal(rows[1][1], read_image(blobs[1]))


def test_id_and_label_columns_of_types_that_are_no_text_say_how_to_do_without(tmp_path, blobs):
    import datetime

    when = pa.array([datetime.datetime(2020, 1, 1)])
    pq.write_table(pa.table({"image": blobs[:1], "id": pa.nulls(1), "label": when}), tmp_path / "t.parquet")
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(str(tmp_path / "t.parquet"), piece_rows=8)
    assert str(error.value) == (
        "column 'id' of t.parquet holds null; pass id_column naming a column of text or integers, or '' for FILE:ROW "
        "ids."
    )
    with pytest.raises(SourceError, match=r"holds timestamp\[us\]; pass label_column naming .* or '' for no label\.$"):
        parquet.open_parquet(str(tmp_path / "t.parquet"), piece_rows=8, id_column="")
    rows = rows_of(parquet.open_parquet(str(tmp_path / "t.parquet"), piece_rows=8, id_column="", label_column=""))
    assert rows[0][0] == "t.parquet:0"
    ids = [1.5, float("nan"), float("inf"), -0.0, 2.0]
    pq.write_table(pa.table({"image": blobs[:5], "id": ids}), tmp_path / "f.parquet")
    src = parquet.open_parquet(str(tmp_path / "f.parquet"), piece_rows=8).pieces[0].read()
    assert src.ids == ["1.5", "nan", "inf", "0", "2"]


def test_columns_of_one_name_and_an_empty_image_column_are_refused(tmp_path, blobs):
    twice = pa.Table.from_arrays([pa.array(blobs[:1]), pa.array(blobs[1:2])], names=["image", "image"])
    pq.write_table(twice, tmp_path / "a.parquet")
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(str(tmp_path / "a.parquet"), piece_rows=8)
    assert str(error.value) == (
        "parquet file a.parquet has 2 columns named 'image'; pass files whose columns have distinct names."
    )
    pq.write_table(pa.table({"image": blobs[:1], "id": ["x"]}), tmp_path / "a.parquet")
    two = pa.Table.from_arrays([pa.array(blobs[:1]), pa.array(["y"]), pa.array(["z"])], names=["image", "id", "id"])
    pq.write_table(two, tmp_path / "b.parquet")
    with pytest.raises(SourceError, match=r"^parquet file b.parquet has 2 columns named 'id'; pass files whose"):
        parquet.open_parquet(str(tmp_path / "*.parquet"), piece_rows=8)
    with pytest.raises(SourceError, match=r"^parquet file a.parquet has no column ''; pass image_column one of its"):
        parquet.open_parquet(str(tmp_path / "a.parquet"), piece_rows=8, image_column="")


def test_ids_that_are_written_alike_are_one_id(tmp_path, blobs):
    # b'\xff' is written as the four characters \xff: the literal text \xff repeats it in the result.
    ids = pa.array([b"\xff", b"\\xff", b"ok"], pa.binary())
    pq.write_table(pa.table({"image": blobs[:3], "id": ids}), tmp_path / "r.parquet")
    rows = rows_of(parquet.open_parquet(str(tmp_path / "r.parquet"), piece_rows=8))
    assert [output.render_id(r[0]) for r in rows] == ["\\xff", "r.parquet:1", "ok"]
    assert rows[1][1] == (
        "id '\\\\xff' repeats the id of row 0 of r.parquet; choose an id column of unique ids, or none for FILE:ROW ids"
    )


def test_an_overlong_id_and_an_oversized_image_are_error_rows(tmp_path, blobs, monkeypatch):
    pq.write_table(
        pa.table({"image": [blobs[0], blobs[1] + b"\0" * 5000], "id": ["x" * 5000, "y"]}), tmp_path / "l.parquet"
    )
    monkeypatch.setattr(parquet.data, "MAX_OBJECT_BYTES", len(blobs[1]) + 100)
    rows = rows_of(parquet.open_parquet(str(tmp_path / "l.parquet"), piece_rows=8))
    assert rows[0] == (
        "l.parquet:0",
        f"id of 5000 characters in column 'id', above {parquet.MAX_ID_CHARS}; this row is named by its file and row",
    )
    assert rows[1] == (
        "y",
        f"image of {len(blobs[1]) + 5000} bytes, above the {len(blobs[1]) + 100} byte limit, not read",
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet", "reference"])
def test_ids_with_separators_line_breaks_formulas_and_bad_bytes_read_back_as_written(tmp_path, blobs, fmt):
    ids = [b"a,b", b'say "hi"', b"=1+1", b"line\nbreak", b"tab\there", b"\xff\xfe", "café".encode(), b"-3", b"x y"]
    pq.write_table(pa.table({"image": [blobs[0]] * len(ids), "id": pa.array(ids, pa.binary())}), tmp_path / "i.parquet")
    src = parquet.open_parquet(str(tmp_path / "i.parquet"), piece_rows=64).pieces[0].read()
    rows = [Row(i, 0.5, None, "") for i in src.ids]
    if fmt == "reference":  # a line break cannot be held there: one sentence, before anything is written
        with pytest.raises(OutputError, match="holds a line break, which the reference format cannot hold"):
            chunked.table_bytes(rows, fmt, False)
        rows = [r for r in rows if "\n" not in r.id]  # spaces and tabs it holds
    (tmp_path / f"out.{fmt}").write_bytes(chunked.table_bytes(rows, fmt, False))
    back = output.read_results(tmp_path / f"out.{fmt}", fmt)
    assert [r.id for r in back] == [output.render_id(r.id) for r in rows]
    assert "\\xff\\xfe" in [r.id for r in back]


# ------------------------------------------------------------------------------------------------------------
# Result files


def test_read_rows_refuses_result_files_of_other_types_and_null_ids(tmp_path):
    def table(**columns):
        base = {"id": pa.array(["a"]), "quality": pa.array([0.5]), "error": pa.array([""])}
        pq.write_table(pa.table({**base, **columns}), tmp_path / "r.parquet")
        return tmp_path / "r.parquet"

    with pytest.raises(OutputError, match=r"holds column 'id' as int64, not text; it is not a score table\.$"):
        parquet.read_rows(table(id=pa.array([1])))
    with pytest.raises(OutputError, match=r"holds column 'quality' as string, not floats; it is not a score table"):
        parquet.read_rows(table(quality=pa.array(["0.5"])))
    with pytest.raises(OutputError, match=r"has a row with a null id \(row 0\); it is not a score table\.$"):
        parquet.read_rows(table(id=pa.array([None], pa.string())))
    assert parquet.read_rows(table(quality=pa.array([0.25], pa.float32()))) == [Row("a", 0.25, None, "")]
    assert output.read_results(table(), None) == [Row("a", 0.5, None, "")]


def test_non_finite_scores_are_failed_rows_in_a_parquet_chunk(tmp_path):
    rows = [Row("a", float("nan"), None, ""), Row("b", float("inf"), None, ""), Row("c", 0.5, None, "")]
    (tmp_path / "c.parquet").write_bytes(chunked.table_bytes(rows, "parquet", False))
    back = parquet.read_rows(tmp_path / "c.parquet")
    assert [(r.id, r.quality) for r in back] == [("a", None), ("b", None), ("c", 0.5)]
    assert back[0].error.startswith("non-finite score") and back[1].error.startswith("non-finite score")


def test_a_merge_refuses_a_chunk_of_other_columns_or_not_parquet(tmp_path):
    parquet.write_rows(tmp_path / "0.parquet", [Row("a", 0.5, "1", "")], True)
    parquet.write_rows(tmp_path / "1.parquet", [Row("b", 0.5, None, "")], False)
    (tmp_path / "2.parquet").write_bytes(b"id,quality,error\n")
    with pytest.raises(OutputError, match=r"1.parquet has columns \['id', 'quality', 'error'\]"):
        parquet.merge([tmp_path / "0.parquet", tmp_path / "1.parquet"], tmp_path / "all.parquet", True)
    with pytest.raises(OutputError, match=r"2.parquet is not a readable Parquet chunk"):
        parquet.merge([tmp_path / "0.parquet", tmp_path / "2.parquet"], tmp_path / "all.parquet", True)
    assert not (tmp_path / "all.parquet").exists()  # nothing half-written appears


def test_a_run_scores_the_good_files_and_marks_a_bomb_damaged_and_refuses_a_row_bomb(
    tiny_checkpoint, tmp_path, blobs, monkeypatch, capsys
):
    from pipeline_helpers import run

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"image": blobs[:3]}), data / "a.parquet")
    body = levels(1, True) + plain([b"\0" * (4 << 20)])
    crafted(data / "b.parquet", 1, page(1, body, pa.compress(body, codec="zstd", asbytes=True)), codec=6, claimed=100)
    monkeypatch.setattr(parquet, "GROUP_BYTES_FLOOR", 1 << 20)
    out = tmp_path / "o.csv"
    assert run(tiny_checkpoint, "--parquet", str(data / "*.parquet"), "--out", str(out), "--batch-size", "2") == 0
    got = output.read_results(out)
    assert [r.id for r in got] == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "b.parquet:0"]
    assert [r.quality is None for r in got] == [False, False, False, True]
    assert got[3].error.startswith("b.parquet row group 0 cannot be decoded (its columns decode to more than")
    n = 10_000_000
    crafted(data / "c.parquet", n, page(n, levels(n, False)))
    capsys.readouterr()
    assert run(tiny_checkpoint, "--parquet", str(data / "c.parquet"), "--out", str(tmp_path / "c.csv")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.parquet row group 0 holds 10000000 rows (its footer says)" in err[0], err
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.parametrize("compression", ["none", "snappy", "gzip", "brotli", "zstd", "lz4"])
def test_the_footer_checks_refuse_no_table_pyarrow_writes(tmp_path, blobs, compression):
    # The checks at open (footer, column ranges, codecs, sizes) against page v1/v2, page indexes, dictionaries and
    # both image layouts: every row reads back as written.
    images = [*blobs, blobs[0]]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    layouts = {
        "binary": {"image": images, "id": [f"x{i}" for i in range(7)], "label": [i % 3 for i in range(7)]},
        "hf": {"image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)], kind)},
    }
    for columns in layouts.values():
        for version, index, dictionary in [(v, i, d) for v in ("1.0", "2.0") for i in (0, 1) for d in (0, 1)]:
            path = tmp_path / "t.parquet"
            pq.write_table(
                pa.table(columns),
                path,
                compression=compression,
                data_page_version=version,
                write_page_index=bool(index),
                use_dictionary=bool(dictionary),
                row_group_size=3,
                data_page_size=1024,
            )
            rows = rows_of(parquet.open_parquet(str(path), piece_rows=3))
            assert len(rows) == 7
            for (_, image), blob in zip(rows, images, strict=True):
                np.testing.assert_array_equal(image, read_image(blob))
