"""The same JPEG bytes give the same score through every source: folder, list, RecordIO, WebDataset, Parquet."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image
from pipeline_helpers import read_csv, run
from recordio_writer import write_rec

from helpers import smooth_faces

N = 13


@pytest.fixture(scope="module")
def jpegs():
    out = []
    for face in smooth_faces(N, seed=29):
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def _sources(tmp_path, jpegs):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, blob in enumerate(jpegs):
        (folder / f"{i:02d}.jpg").write_bytes(blob)
    listing = tmp_path / "faces.txt"
    listing.write_text("".join(f"{folder}/{i:02d}.jpg\n" for i in range(N)))
    write_rec(tmp_path / "train.rec", [(i % 3, blob) for i, blob in enumerate(jpegs)], header="insightface")
    with webdataset.TarWriter(str(tmp_path / "shard-000.tar")) as writer:
        for i, blob in enumerate(jpegs):
            writer.write({"__key__": f"{i:02d}", "jpg": blob, "cls": i % 3})
    table = pa.table({"id": [f"{i:02d}" for i in range(N)], "image": [{"bytes": b, "path": None} for b in jpegs]})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=4)  # pieces of 2 row groups: 8 rows
    return {
        "images": str(folder),
        "list": str(listing),
        "rec": str(tmp_path / "train.rec"),
        "wds": str(tmp_path / "shard-{000..000}.tar"),
        "parquet": str(tmp_path / "train.parquet"),
    }


def test_the_same_jpeg_bytes_score_the_same_through_every_source(tiny_checkpoint, tmp_path, jpegs):
    qualities = {}
    for kind, location in _sources(tmp_path, jpegs).items():
        out = tmp_path / f"{kind}.csv"
        # Batches of 8 over 8 devices, and (chunked runs) pieces of 8: every image at the same batch position.
        # The folder is scored into one file as before; the rest in chunks.
        argv = [f"--{kind}", location, "--out", str(out), "--batch-size", "8"]
        argv += [] if kind == "images" else ["--chunk-rows", "8"]
        assert run(tiny_checkpoint, *argv) == 0, kind
        rows = read_csv(out)
        quality = rows[0].index("quality")
        assert len(rows) == N + 1 and all(r[-1] == "" for r in rows[1:]), (kind, rows)
        qualities[kind] = [r[quality] for r in rows[1:]]
    # One compiled program, the same inputs at the same batch positions: the same floats, to the last digit.
    assert len({tuple(v) for v in qualities.values()}) == 1, qualities
