"""The Parquet source (row groups as pieces, both image layouts) and the Parquet result format."""

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitnt_jax import parquet
from vitnt_jax.data import ImageError, read_image
from vitnt_jax.errors import UserError
from vitnt_jax.output import Row
from vitnt_jax.sources import SourceError

from helpers import smooth_faces


def jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def blobs():
    return [jpeg(f) for f in smooth_faces(12, 32)]


def hf_images(values):
    """The Hugging Face datasets Image layout: struct<bytes: binary, path: string>."""
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([None if v is None else {"bytes": v[0], "path": v[1]} for v in values], kind)


def write(path, columns: dict, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def everything(pieces):
    """Returns [(id, label, array or error text)] of every row, piece by piece."""
    out = []
    for piece in pieces.pieces:
        src = piece.read()
        assert len(src) == piece.size
        for j in range(len(src)):
            try:
                image = src.load(j)
            except ImageError as error:
                image = str(error)
            out.append((src.ids[j], None if src.labels is None else src.labels[j], image))
    return out


def test_binary_column_with_id_and_label_columns_read_by_default(tmp_path, blobs):
    path = write(
        tmp_path / "t.parquet",
        {"image": pa.array(blobs[:5], pa.binary()), "id": [f"p{i}" for i in range(5)], "label": [3, 1, 4, 1, 5]},
    )
    pieces = parquet.open_parquet(path, piece_rows=100)
    assert pieces.with_label and len(pieces) == 1 and pieces.pieces[0].size == 5
    rows = everything(pieces)
    assert [r[0] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert [r[1] for r in rows] == ["3", "1", "4", "1", "5"]
    for (_, _, image), blob in zip(rows, blobs, strict=False):
        np.testing.assert_array_equal(image, read_image(blob))  # the same bytes decode to the same array


def test_hf_struct_column_and_file_row_ids(tmp_path, blobs):
    images = hf_images([(blobs[0], "a.jpg"), None, (None, "/elsewhere/b.jpg"), (b"not an image", None)])
    path = write(tmp_path / "hf.parquet", {"image": images, "label": pa.array(["x", None, "z", "w"])})
    pieces = parquet.open_parquet(path, piece_rows=3)
    rows = everything(pieces)
    assert [r[0] for r in rows] == ["hf.parquet:0", "hf.parquet:1", "hf.parquet:2", "hf.parquet:3"]
    assert [r[1] for r in rows] == ["x", "", "z", "w"]  # a null label is empty
    np.testing.assert_array_equal(rows[0][2], read_image(blobs[0]))
    assert rows[1][2] == "image is null"
    assert rows[2][2] == "image has no bytes (only a path, '/elsewhere/b.jpg'); paths are not read"
    assert isinstance(rows[3][2], str) and rows[3][2]  # undecodable: that row's error, not a crash


def test_binary_null_image_is_an_error_row(tmp_path, blobs):
    path = write(tmp_path / "n.parquet", {"image": pa.array([blobs[0], None, blobs[1]], pa.large_binary())})
    rows = everything(parquet.open_parquet(path, piece_rows=10))
    assert [r[0] for r in rows] == ["n.parquet:0", "n.parquet:1", "n.parquet:2"]
    assert rows[1][2] == "image is null" and not isinstance(rows[2][2], str)


def test_row_groups_and_files_make_pieces_in_order(tmp_path, blobs, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    # b: 7 rows in row groups of 2 (2,2,2,1); a: 5 rows in row groups of 3 (3,2). Written b first: sorted by name.
    write(folder / "train-b.parquet", {"image": blobs[5:12]}, row_group_size=2)
    write(folder / "train-a.parquet", {"image": blobs[:5]}, row_group_size=3)
    pieces = parquet.open_parquet(str(folder / "train-*.parquet"), piece_rows=4)
    assert [(p.index, p.name, p.size) for p in pieces.pieces] == [
        (0, "train-a.parquet row group 0 (rows 0..2)", 3),
        (1, "train-a.parquet row group 1 (rows 3..4)", 2),
        (2, "train-b.parquet row groups 0..1 (rows 0..3)", 4),
        (3, "train-b.parquet row groups 2..3 (rows 4..6)", 3),
    ]
    rows = everything(pieces)
    assert [r[0] for r in rows] == [f"train-a.parquet:{i}" for i in range(5)] + [
        f"train-b.parquet:{i}" for i in range(7)
    ]
    for (_, _, image), blob in zip(rows, blobs, strict=True):
        np.testing.assert_array_equal(image, read_image(blob))
    assert not pieces.with_label
    # A row group larger than piece_rows is a piece alone; the same source and piece_rows plan alike.
    assert [p.size for p in parquet.open_parquet(str(folder / "*.parquet"), piece_rows=1).pieces] == [3, 2, 2, 2, 2, 1]
    assert not caplog.records
    caplog.set_level("WARNING", "vitnt_jax")
    write(folder / "big.parquet", {"image": blobs[:9]})
    assert [p.size for p in parquet.open_parquet(str(folder / "big.parquet"), piece_rows=2).pieces] == [9]
    assert caplog.messages == [
        "1 parquet row groups are larger than a piece should be (the largest: big.parquet row group 0, 9 rows, "
        f"{pq.ParquetFile(folder / 'big.parquet').metadata.row_group(0).total_byte_size} bytes); a piece holds a "
        "whole row group in memory, so rewrite the table with smaller row groups (e.g. "
        "pyarrow.parquet.write_table(..., row_group_size=2))"
    ]
    again = parquet.open_parquet(str(folder / "train-*.parquet"), piece_rows=4)
    assert again.identity == pieces.identity and "2 files, 12 rows, 4 pieces" in pieces.identity
    assert parquet.open_parquet(str(folder / "train-*.parquet"), piece_rows=5).identity != pieces.identity


def test_a_piece_reads_only_its_row_groups(tmp_path, blobs, monkeypatch):
    path = write(tmp_path / "g.parquet", {"image": blobs[:6]}, row_group_size=2)
    pieces = parquet.open_parquet(path, piece_rows=2)
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append((kwargs.get("row_groups"), kwargs.get("columns")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert pieces.pieces[1].read().ids == ["g.parquet:2", "g.parquet:3"]
    assert asked == [([1], ["image"])]


def test_named_columns_and_refusals(tmp_path, blobs):
    path = write(tmp_path / "c.parquet", {"face": blobs[:2], "key": [10, 11], "person": ["a", "b"], "s": ["u", "v"]})
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(path, piece_rows=8)
    assert str(error.value) == (
        "parquet file c.parquet has no column 'image'; pass image_column one of its columns: 'face', 'key', "
        "'person', 's'."
    )
    assert error.value.field == "image_column"
    pieces = parquet.open_parquet(path, piece_rows=8, image_column="face", id_column="key", label_column="person")
    src = pieces.pieces[0].read()
    assert src.ids == ["10", "11"] and src.labels == ["a", "b"]
    with pytest.raises(SourceError, match="has no column 'nope'; pass label_column one of its columns"):
        parquet.open_parquet(path, piece_rows=8, image_column="face", label_column="nope")
    with pytest.raises(SourceError, match=r"column 's' of c.parquet holds string, not image bytes; pass image_column"):
        parquet.open_parquet(path, piece_rows=8, image_column="s")
    with pytest.raises(SourceError, match=r"^no file matches parquet .*nothing-\*.parquet; check the path or the glob"):
        parquet.open_parquet(str(tmp_path / "nothing-*.parquet"), piece_rows=8)
    (tmp_path / "fake.parquet").write_bytes(b"id,quality\nnot parquet at all\n")
    with pytest.raises(SourceError, match=r"^parquet file fake.parquet is not a readable Parquet file \(.*magic"):
        parquet.open_parquet(str(tmp_path / "fake.parquet"), piece_rows=8)
    with pytest.raises(SourceError, match=r"is a folder; pass a glob of its files, e.g. .*\*\.parquet\.$"):
        parquet.open_parquet(str(tmp_path), piece_rows=8)


def test_files_of_other_schemas_are_refused(tmp_path, blobs):
    write(tmp_path / "a.parquet", {"image": pa.array(blobs[:2], pa.binary()), "label": [1, 2]})
    write(tmp_path / "b.parquet", {"image": pa.array(blobs[2:4], pa.large_binary()), "label": [1, 2]})
    with pytest.raises(SourceError) as error:
        parquet.open_parquet(str(tmp_path / "*.parquet"), piece_rows=8)
    assert str(error.value) == (
        "parquet file b.parquet holds column 'image' as large_binary, a.parquet as binary; pass files of one table "
        "(one schema) only."
    )
    write(tmp_path / "b.parquet", {"image": pa.array(blobs[2:4], pa.binary())})
    with pytest.raises(SourceError, match="file b.parquet has no column 'label' but a.parquet has"):
        parquet.open_parquet(str(tmp_path / "*.parquet"), piece_rows=8)


def test_null_empty_and_repeated_ids_are_error_rows_with_unique_ids(tmp_path, blobs):
    ids = ["a", None, "a", "", "b", "a", "d.parquet:5"]
    path = write(tmp_path / "d.parquet", {"image": blobs[:7], "id": ids}, row_group_size=4)
    pieces = parquet.open_parquet(path, piece_rows=100)  # one piece of both row groups
    rows = everything(pieces)
    got = [r[0] for r in rows]
    assert got == ["a", "d.parquet:1", "d.parquet:2", "d.parquet:3", "b", "d.parquet:5#2", "d.parquet:5"]
    assert len(set(got)) == len(got)
    errors = [r[2] if isinstance(r[2], str) else "" for r in rows]
    assert errors == [
        "",
        "id is null in column 'id'; this row is named by its file and row",
        "id 'a' repeats the id of row 0 of d.parquet; choose an id column of unique ids, or none for FILE:ROW ids",
        "id is empty in column 'id'; this row is named by its file and row",
        "",
        "id 'a' repeats the id of row 0 of d.parquet; choose an id column of unique ids, or none for FILE:ROW ids",
        "",
    ]
    # No id column: FILE:ROW ids, every image scored.
    assert [r[0] for r in everything(parquet.open_parquet(path, piece_rows=100, id_column=""))] == [
        f"d.parquet:{i}" for i in range(7)
    ]
    # Pieces of one row group each: the repeat in the second piece is not seen (ids are unique within a piece).
    assert [r[0] for r in everything(parquet.open_parquet(path, piece_rows=4))][4:] == ["b", "a", "d.parquet:5"]


def test_label_and_id_types(tmp_path, blobs):
    path = write(
        tmp_path / "t.parquet",
        {
            "image": blobs[:3],
            "id": pa.array([b"x\xff", b"y", b"z"], pa.binary()),
            "label": pa.array([1.0, 2.5, None], pa.float64()),
        },
    )
    src = parquet.open_parquet(path, piece_rows=8).pieces[0].read()
    assert src.ids == ["x\udcff", "y", "z"] and src.labels == ["1", "2.5", ""]
    assert not parquet.open_parquet(path, piece_rows=8, label_column="").with_label
    path = write(tmp_path / "l.parquet", {"image": blobs[:2], "label": [[1], [2]]})
    with pytest.raises(SourceError, match=r"column 'label' of l.parquet holds list<.*: int64>; pass label_column"):
        parquet.open_parquet(path, piece_rows=8)


def test_file_url_reads_like_a_path(tmp_path, blobs):
    write(tmp_path / "u-0.parquet", {"image": blobs[:3]}, row_group_size=2)
    write(tmp_path / "u-1.parquet", {"image": blobs[3:5]})
    url = f"file://{tmp_path}/u-*.parquet"
    pieces = parquet.open_parquet(url, piece_rows=2)
    local = parquet.open_parquet(str(tmp_path / "u-*.parquet"), piece_rows=2)
    assert pieces.identity == local.identity
    rows = everything(pieces)
    assert [r[0] for r in rows] == ["u-0.parquet:0", "u-0.parquet:1", "u-0.parquet:2", "u-1.parquet:0", "u-1.parquet:1"]
    for (_, _, image), blob in zip(rows, blobs, strict=False):
        np.testing.assert_array_equal(image, read_image(blob))
    single = parquet.open_parquet(f"file://{tmp_path}/u-1.parquet", piece_rows=2)
    assert everything(single)[0][0] == "u-1.parquet:0"


ODD = ["plain", "a,b", 'say "hi"', "line\nbreak", "cr\rhere", "ünï☃", "=SUM(A1)", "'quoted", "", "x\u2028y"]


@pytest.mark.parametrize("with_label", [False, True])
def test_write_merge_read_round_trip(tmp_path, with_label):
    rows = [
        Row(odd or "empty-id", None if k % 3 == 1 else float(np.float32(0.1 * k)), ODD[-k - 1], "" if k % 3 else "x")
        for k, odd in enumerate(ODD)
    ]
    rows[4] = Row("bad\udcff", float("nan"), "l\udcfe", "")
    want = [
        Row(
            r.id.replace("\udcff", "\\xff"),
            None if r.quality is None or not math.isfinite(r.quality) else r.quality,
            (r.label or "").replace("\udcfe", "\\xfe") if with_label else None,
            r.error or ("non-finite score (nan)" if r.quality is not None and not math.isfinite(r.quality) else ""),
        )
        for r in rows
    ]
    chunks = []
    for k, part in enumerate((rows[:4], rows[4:5], [], rows[5:])):
        chunks.append(tmp_path / f"chunk-{k}.parquet")
        parquet.write_rows(chunks[-1], part, with_label)
    assert parquet.read_rows(chunks[0]) == want[:4]
    out = tmp_path / "out.parquet"
    assert parquet.merge(chunks, out, with_label) == len(rows)
    assert parquet.read_rows(out) == want
    table = pq.read_table(out)
    assert table.schema.names == (["id", "quality", "label", "error"] if with_label else ["id", "quality", "error"])
    assert table.schema.field("quality").type == pa.float64() and table.column("quality").null_count == 3
    assert pq.ParquetFile(out).num_row_groups == 3  # one per non-empty chunk
    again = tmp_path / "again.parquet"
    parquet.merge(iter(chunks), again, with_label)
    assert again.read_bytes() == out.read_bytes()  # the same chunks merge to the same bytes (every host alike)
    # File objects work too; a chunk of the other columns is refused in one sentence.
    buffer = io.BytesIO()
    parquet.write_rows(buffer, rows[:2], with_label)
    assert parquet.read_rows(io.BytesIO(buffer.getvalue())) == want[:2]
    parquet.write_rows(tmp_path / "other.parquet", rows[:2], not with_label)
    with pytest.raises(parquet.output.OutputError, match="other.parquet has columns .*not a result chunk of this run"):
        parquet.merge([chunks[0], tmp_path / "other.parquet"], tmp_path / "bad.parquet", with_label)
    assert not (tmp_path / "bad.parquet").exists()  # a failed merge leaves no file
    (tmp_path / "text.parquet").write_text("id,quality,error\n")
    with pytest.raises(parquet.output.OutputError, match=r"text.parquet is not a readable Parquet chunk \("):
        parquet.merge([chunks[0], tmp_path / "text.parquet"], tmp_path / "bad.parquet", with_label)
    # One sentence naming the chunk: storage's own (it does not exist) or the merge's (cannot read it).
    with pytest.raises(UserError, match=r"gone\.parquet.*(does not exist|No such file or directory)"):
        parquet.merge([tmp_path / "gone.parquet"], tmp_path / "bad.parquet", with_label)
    assert not (tmp_path / "bad.parquet").exists()


def test_read_rows_refuses_what_is_not_a_result_table(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), tmp_path / "x.parquet")
    with pytest.raises(parquet.output.OutputError, match=r"has columns \['id', 'score'\], not .*not a score table"):
        parquet.read_rows(tmp_path / "x.parquet")
    (tmp_path / "y.parquet").write_text("id,quality,error\n")
    with pytest.raises(parquet.output.OutputError, match="y.parquet is not a readable Parquet file"):
        parquet.read_rows(tmp_path / "y.parquet")
    with pytest.raises(parquet.output.OutputError, match="does not exist"):
        parquet.read_rows(tmp_path / "z.parquet")


def test_a_file_changed_after_planning_is_refused_when_its_piece_is_read(tmp_path, blobs):
    path = write(tmp_path / "c.parquet", {"image": blobs[:4]}, row_group_size=2)
    pieces = parquet.open_parquet(path, piece_rows=2)
    write(tmp_path / "c.parquet", {"image": blobs[:6]}, row_group_size=2)
    with pytest.raises(SourceError, match=r"^parquet file c.parquet holds \d+ bytes, not the \d+ it held when the run"):
        pieces.pieces[1].read()
    url = parquet.open_parquet(f"file://{tmp_path}/c.parquet", piece_rows=2)
    write(tmp_path / "c.parquet", {"image": blobs[:4]}, row_group_size=2)
    with pytest.raises(SourceError, match=r"^parquet file c.parquet holds \d+ bytes, not the \d+ it held when the run"):
        url.pieces[0].read()


def test_without_pyarrow_each_use_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(SourceError, match=r"^parquet needs pyarrow: pip install pyarrow\.$"):
        parquet.open_parquet(str(tmp_path / "x.parquet"), piece_rows=8)
    with pytest.raises(parquet.output.OutputError, match=r"^format parquet needs pyarrow: pip install pyarrow\.$"):
        parquet.write_rows(tmp_path / "x.parquet", [], False)


def test_the_same_images_score_alike_through_a_folder_and_a_parquet_table(tiny_checkpoint, tmp_path):
    from pipeline_helpers import assert_same_floats, faces_folder, read_csv, run

    folder = faces_folder(tmp_path / "faces", n=9)
    names = sorted(p.name for p in folder.iterdir())
    images = hf_images([((folder / n).read_bytes(), n) for n in names] + [None])
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": images, "id": [*names, "missing"]}), table, row_group_size=4)
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "f.csv"), "--batch-size", "4") == 0
    out = tmp_path / "p.parquet"
    argv = ["--parquet", str(table), "--out", str(out), "--format", "parquet", "--batch-size", "4"]
    assert run(tiny_checkpoint, *argv, "--chunk-rows", "4") == 0
    want = read_csv(tmp_path / "f.csv")[1:]
    got = parquet.read_rows(out)
    assert [r.id for r in got] == [*names, "missing"]
    assert [r.error for r in got] == [""] * len(names) + ["image is null"] and got[-1].quality is None
    assert_same_floats([r.quality for r in got[:-1]], [float(r[1]) for r in want])


def test_a_damaged_row_group_is_error_rows_and_a_failing_read_stops_the_piece(tmp_path, blobs, monkeypatch):
    path = write(tmp_path / "dmg.parquet", {"image": pa.array(blobs[:6], pa.binary()), "label": [1] * 6}, 2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    content = bytearray((tmp_path / "dmg.parquet").read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    content[start : start + 40] = b"\xff" * 40  # the page header of row group 1's image column
    (tmp_path / "dmg.parquet").write_bytes(bytes(content))
    pieces = parquet.open_parquet(path, piece_rows=2)
    rows = everything(pieces)
    assert [r[0] for r in rows] == [f"dmg.parquet:{i}" for i in range(6)]
    assert [r[1] for r in rows] == ["1", "1", "", "", "1", "1"]
    assert [isinstance(r[2], str) for r in rows] == [False, False, True, True, False, False]
    assert rows[2][2].startswith("dmg.parquet row group 1 cannot be decoded (") and rows[2][2] == rows[3][2]
    assert rows[2][2].endswith("); the file is damaged")

    class Failing(io.BytesIO):
        def read(self, *args):
            raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(parquet.storage, "open_read", lambda location: Failing(bytes(content)))
    with pytest.raises(SourceError) as error:
        pieces.pieces[0].read()  # not error rows: nothing is committed, and a resumed run reads it again
    assert str(error.value) == (
        "cannot read parquet file dmg.parquet row group 0 (connection reset by peer); check the file and access, "
        "then resume."
    )


@pytest.fixture()
def s3(monkeypatch):
    """An S3 server of moto on 127.0.0.1 (dummy credentials, no metadata probes); yields an s3fs filesystem."""
    fsspec = pytest.importorskip("fsspec")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "key": "testing", "secret": "testing"}
        monkeypatch.setitem(fsspec.config.conf, "s3", options)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir("bucket")
        yield fs
    finally:
        server.stop()


def test_tables_and_results_on_s3(s3, blobs, monkeypatch):
    for k in range(2):
        buffer = io.BytesIO()
        noise = [np.random.default_rng(i).bytes(200_000) for i in range(3)]  # an unused column, 200 kB a row
        columns = {"image": blobs[3 * k : 3 * k + 3], "other": noise, "label": [k] * 3}
        pq.write_table(pa.table(columns), buffer, row_group_size=2)
        s3.pipe(f"bucket/data/train-{k}.parquet", buffer.getvalue())
    pieces = parquet.open_parquet("s3://bucket/data/train-*.parquet", piece_rows=2)
    # A piece is one request for each run of its used columns' bytes and one for the footer: never the unused
    # 'other' column, never fsspec's read-ahead.
    meta = pq.ParquetFile(io.BytesIO(s3.cat("bucket/data/train-1.parquet"))).metadata
    size = s3.size("bucket/data/train-1.parquet")
    asked = []
    real = type(s3)._cat_file

    async def counting(self, path, start=None, end=None, **kwargs):
        asked.append((path, start, end))
        return await real(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(type(s3), "_cat_file", counting)
    pieces.pieces[2].read()
    monkeypatch.setattr(type(s3), "_cat_file", real)
    group = meta.row_group(0)

    def chunk(column):
        start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        return ("bucket/data/train-1.parquet", start, start + column.total_compressed_size)

    assert sorted(asked) == [
        chunk(group.column(0)),
        chunk(group.column(2)),
        ("bucket/data/train-1.parquet", size - 65536, size),
    ]
    assert [p.name for p in pieces.pieces] == [
        "train-0.parquet row group 0 (rows 0..1)",
        "train-0.parquet row group 1 (rows 2..2)",
        "train-1.parquet row group 0 (rows 0..1)",
        "train-1.parquet row group 1 (rows 2..2)",
    ]
    rows = everything(pieces)
    assert [(r[0], r[1]) for r in rows] == [(f"train-{i // 3}.parquet:{i % 3}", str(i // 3)) for i in range(6)]
    for (_, _, image), blob in zip(rows, blobs, strict=False):
        np.testing.assert_array_equal(image, read_image(blob))
    with pytest.raises(SourceError, match=r"^no file matches parquet s3://bucket/data/none-\*.parquet; check"):
        parquet.open_parquet("s3://bucket/data/none-*.parquet", piece_rows=2)
    results = [Row("a,b", 0.5, "1", ""), Row("b", None, "", "bad")]
    parquet.write_rows("s3://bucket/out/0.parquet", results, True)
    parquet.merge(["s3://bucket/out/0.parquet", "s3://bucket/out/0.parquet"], "s3://bucket/out/all.parquet", True)
    assert parquet.read_rows("s3://bucket/out/all.parquet") == results * 2


def test_ranges_serve_what_was_fetched_and_fetch_the_rest():
    content = bytes(range(256)) * 4
    asked = []

    def fetch(start, end):
        asked.append((start, end))
        return content[start:end]

    f = parquet._Ranges(fetch, len(content), [[0, 10], [900, 1024]], [content[0:10], content[900:1024]])
    assert f.read(4) == content[:4] and f.seek(-24, 2) == 1000 and f.read() == content[1000:]
    assert asked == []
    f.seek(5)
    assert f.read(10) == content[5:15] and asked == [(5, 15)]  # crosses the end of a range: fetched whole
    buffer = bytearray(3)
    assert f.readinto(buffer) == 3 and bytes(buffer) == content[15:18]
    short = parquet._Ranges(lambda start, end: b"x", 100, [], [])
    with pytest.raises(OSError, match="read 1 bytes at 0, not 5: the file changed"):
        short.read(5)
