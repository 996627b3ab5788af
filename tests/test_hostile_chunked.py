"""Chunked runs attacked: planted, foreign, damaged or linked chunks, storage failing mid-commit or mid-merge."""

import errno
import io
import json
import os

import numpy as np
import pytest
from pipeline_helpers import faces_folder, read_csv, run

from vitnt_jax import chunked, output, pipeline, score, storage
from vitnt_jax.pipeline import JobError

pytest_plugins = ["storage_fixtures"]  # S3 and GCS servers on 127.0.0.1


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


def _argv(folder, out, *more):
    return ["--images", str(folder), "--out", str(out), "--chunk-rows", "8", "--batch-size", "8", *more]


def _names(out):
    return sorted(os.listdir(chunked.chunks_dir(out)))


def _one_line(capsys, *words):
    text = capsys.readouterr().err
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text  # (the other lines are the run's log)
    err = errors[0]
    for word in words:
        assert word in err, err
    return err


@pytest.fixture()
def half(tiny_checkpoint, folder, tmp_path, capsys):
    """A run of 13 faces in pieces of 8 stopped after piece 0 (a broken input in piece 1): (argv, out, good)."""
    good = (folder / "10.png").read_bytes()
    (folder / "10.png").write_bytes(b"broken")
    out = tmp_path / "c.csv"
    assert run(tiny_checkpoint, *_argv(folder, out, "--on-error", "fail")) == 1
    (folder / "10.png").write_bytes(good)
    assert _names(out) == ["00000000-r8.csv", "plan.json"]
    capsys.readouterr()
    return _argv(folder, out), out


# ----------------------------------------------------------------------------------------------- planted chunks


def test_a_planted_chunk_whose_name_lies_about_its_rows_is_refused_and_out_is_not_written(
    tiny_checkpoint, half, capsys
):
    argv, out = half
    folder = chunked.chunks_dir(out)
    piece0 = os.path.join(folder, "00000000-r8.csv")
    # Piece 1 has 5 inputs; a chunk claiming 5 rows but holding piece 0's 8 used to be merged: 16 rows, not 13.
    with open(piece0, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "00000001-r5.csv"), "wb") as f:
        f.write(data)
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "00000001-r5.csv holds 8 rows, not the 5 its name claims", "--overwrite")
    assert not out.exists()
    # One claiming the 8 it holds does not fit piece 1 (5 inputs) either.
    os.rename(os.path.join(folder, "00000001-r5.csv"), os.path.join(folder, "00000001-r8.csv"))
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "claims 8 rows but piece 1 has 5 inputs")
    assert not out.exists()
    assert run(tiny_checkpoint, *argv, "--overwrite") == 0
    assert len(read_csv(out)) == 14


def test_two_table_chunks_of_one_piece_are_refused_and_overwrite_clears_them(tiny_checkpoint, half, capsys):
    argv, out = half
    folder = chunked.chunks_dir(out)
    with open(os.path.join(folder, "00000000-r8.csv"), "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "000000000-r7.csv"), "wb") as f:  # nine digits: the same piece 0
        f.write(data)
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "two table chunks of piece 0")
    assert run(tiny_checkpoint, *argv, "--overwrite") == 0  # its own share is cleared before it is listed
    assert len(read_csv(out)) == 14 and _names(out) == ["merged.json", "plan.json"]


def test_a_truncated_table_chunk_is_refused(tiny_checkpoint, half, capsys):
    argv, out = half
    piece0 = os.path.join(chunked.chunks_dir(out), "00000000-r8.csv")
    with open(piece0, "rb") as f:
        data = f.read()
    with open(piece0, "wb") as f:
        f.write(data[:-7])
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "00000000-r8.csv is not a whole table chunk")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_chunk_name_that_is_a_folder_or_a_link_is_refused_in_one_line(tiny_checkpoint, half, capsys, tmp_path, kind):
    argv, out = half
    planted = os.path.join(chunked.chunks_dir(out), "00000001-r5.csv")
    if kind == "folder":
        os.mkdir(planted)
    else:
        elsewhere = tmp_path / "elsewhere.csv"
        elsewhere.write_text("id,quality,error\n")
        os.symlink(elsewhere, planted)
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "00000001-r5.csv is not a regular file")
    assert run(tiny_checkpoint, *argv, "--overwrite") == 1  # never removed through, nor replaced silently
    _one_line(capsys, "is not a regular file", "remove it yourself")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- links and folders


def test_chunks_folder_as_a_link_is_refused_and_nothing_is_written_through_it(
    tiny_checkpoint, folder, tmp_path, capsys
):
    target = tmp_path / "target"
    target.mkdir()
    out = tmp_path / "c.csv"
    os.symlink(target, chunked.chunks_dir(out))
    assert run(tiny_checkpoint, *_argv(folder, out)) == 1
    _one_line(capsys, "c.csv.chunks", "symbolic link", "--out")
    assert os.listdir(target) == [] and not out.exists()


@pytest.mark.parametrize("what", ["out", "embeddings"])
def test_an_output_that_is_a_folder_or_a_link_is_refused_before_scoring(
    tiny_checkpoint, folder, tmp_path, capsys, what
):
    out, emb = tmp_path / "c.csv", tmp_path / "e.npy"
    (out if what == "out" else emb).mkdir()
    argv = _argv(folder, out, "--save-embeddings", str(emb))
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "is a folder", "--out" if what == "out" else "--save-embeddings")
    assert not os.path.exists(chunked.chunks_dir(out)) or _names(out) == []
    (out if what == "out" else emb).rmdir()
    (tmp_path / "real").write_text("mine")
    os.symlink(tmp_path / "real", out if what == "out" else emb)
    assert run(tiny_checkpoint, *argv, "--overwrite") == 1
    _one_line(capsys, "symbolic link")
    assert (tmp_path / "real").read_text() == "mine"


# ----------------------------------------------------------------------------------------------- storage failures


def test_a_full_disk_mid_commit_stops_in_one_line_and_resume_continues(
    tiny_checkpoint, folder, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "c.csv"
    real = storage.write_bytes
    calls = []

    def full(path, data):
        calls.append(path)
        if str(path).endswith("00000001-r5.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(storage, "write_bytes", full)
    assert run(tiny_checkpoint, *_argv(folder, out)) == 1
    _one_line(capsys, "cannot write piece 1", "No space left on device", "--resume")
    assert _names(out) == ["00000000-r8.csv", "plan.json"] and not out.exists()
    monkeypatch.setattr(storage, "write_bytes", real)
    assert run(tiny_checkpoint, *_argv(folder, out, "--resume")) == 0
    assert len(read_csv(out)) == 14


def test_a_merge_failing_half_way_leaves_no_half_written_result(tiny_checkpoint, folder, tmp_path, capsys, monkeypatch):
    out, emb = tmp_path / "c.csv", tmp_path / "e.npy"
    argv = _argv(folder, out, "--save-embeddings", str(emb))
    real = storage.open_read

    def failing(path, **options):
        if str(path).endswith("00000001-r5.csv"):  # the second table chunk, once the first is streamed into OUT
            raise OSError(errno.EIO, "Input/output error")
        return real(path, **options)

    monkeypatch.setattr(storage, "open_read", failing)
    assert run(tiny_checkpoint, *argv) == 1
    _one_line(capsys, "cannot read the chunk", "00000001-r5.csv", "--resume")
    assert not out.exists() and not emb.exists()  # written whole or not at all (the arrays went first, and went)
    assert [n for n in _names(out) if n.endswith(".csv")] == ["00000000-r8.csv", "00000001-r5.csv"]
    monkeypatch.setattr(storage, "open_read", real)
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert len(read_csv(out)) == 14 and np.load(emb).shape[0] == 13


@pytest.mark.parametrize("record", [chunked.PLAN, "process-00001-of-00002.json"])
def test_a_record_of_another_run_written_before_the_merge_stops_it(
    tiny_checkpoint, folder, tmp_path, capsys, monkeypatch, record
):
    out = tmp_path / "c.csv"
    real = chunked.commit

    def commit_then_race(folder_, index, collector, fmt, with_label):
        real(folder_, index, collector, fmt, with_label)
        if index == 1:  # another run (object storage has no locks) started on OUT with --alpha 4
            with open(os.path.join(folder_, chunked.PLAN)) as f:
                plan = json.load(f)
            plan["settings"]["alpha"] = 4.0
            with open(os.path.join(folder_, record), "w") as f:
                json.dump(plan, f)

    monkeypatch.setattr(chunked, "commit", commit_then_race)
    assert run(tiny_checkpoint, *_argv(folder, out)) == 1
    _one_line(capsys, "other settings", "--alpha 4.0 -> 8.0")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- the chunk module


def _collector(n, dim=3):
    c = chunked.Collector({"embedding": (dim,)})
    rows = [output.Row(f"id{i}", 0.5, None, "") for i in range(n)]
    c.write(rows, {"embedding": np.arange(n * dim, dtype=np.float32).reshape(n, dim)})
    return c


@pytest.mark.parametrize("fmt", ["csv", "reference", "parquet"])
def test_a_piece_of_no_rows_commits_and_merges(tmp_path, fmt):
    out = str(tmp_path / f"r.{fmt}")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    for index, n in enumerate([2, 0, 3]):  # a WebDataset shard with no samples is a chunk of 0 rows
        chunked.commit(folder, index, _collector(n), fmt, False)
    assert chunked.committed(folder, fmt) == {0: 2, 1: 0, 2: 3}
    emb = str(tmp_path / "e.npy")
    assert chunked.merge(out, fmt, False, 3, {"embedding": (emb, (3,))}, sizes=[2, 0, None]) == 5
    assert np.load(emb).shape == (5, 3)
    assert len(output.read_results(out, fmt)) == 5


def _damage(path, how):
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:-4] if how == "short" else b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4'  \n" + blob[64:])


@pytest.mark.parametrize("how", ["short", "header"])
def test_a_damaged_array_chunk_is_refused_and_no_array_file_appears(tmp_path, how):
    out = str(tmp_path / "r.csv")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    chunked.commit(folder, 0, _collector(2), "csv", False)
    _damage(os.path.join(folder, "00000000-r2.embedding.npy"), how)
    emb = tmp_path / "e.npy"
    want = "cut short or padded" if how == "short" else "a damaged header"
    with pytest.raises(chunked.ChunkError, match=want):  # a short chunk was copied into a short, unloadable array
        chunked.merge(out, "csv", False, 1, {"embedding": (str(emb), (3,))})
    assert not emb.exists() and not os.path.exists(out)


def test_csv_chunk_rows_are_counted_as_records_when_ids_hold_line_breaks(tmp_path):
    out = str(tmp_path / "r.csv")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    c = chunked.Collector({})
    c.write([output.Row("a\nb", 0.5, None, ""), output.Row('c"\r\nd', None, None, "bad")], {})
    chunked.commit(folder, 0, c, "csv", False)
    assert chunked.merge(out, "csv", False, 1, {}) == 2
    assert [r[0] for r in read_csv(out)[1:]] == ["a\nb", 'c"\r\nd']


def test_remove_chunks_removes_what_a_killed_write_left(tmp_path):
    folder = tmp_path / "r.csv.chunks"
    folder.mkdir()
    for name in ["00000000-r2.csv", ".00000001-r2.csv.tmp123-0a1b2c3d", "plan.json", "keep.txt", ".hidden"]:
        (folder / name).write_text("x")
    chunked.remove_chunks(str(folder))
    assert sorted(os.listdir(folder)) == [".hidden", "keep.txt", "plan.json"]


def test_ten_thousand_pieces_merge_from_one_listing(tmp_path, monkeypatch):
    out = str(tmp_path / "r.csv")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    n = 10_000
    for i in range(n):  # written directly: 10,000 fsyncs would make the test slow, not the merge
        with open(os.path.join(folder, chunked.chunk_name(i, 1, ".csv")), "w") as f:
            f.write(f"id,quality,error\nid{i},0.5,\n")
    listings = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: listings.append(p) or real(p))
    assert chunked.merge(out, "csv", False, n, {}) == n
    assert len(listings) == 1
    rows = read_csv(out)
    assert len(rows) == n + 1 and rows[-1][0] == f"id{n - 1}"


def test_a_reference_id_with_a_line_break_in_a_later_piece_names_the_overwrite(
    tiny_checkpoint, folder, tmp_path, capsys
):
    os.rename(folder / "10.png", folder / "1\n0.png")  # in piece 1: known once that piece is read
    out = tmp_path / "r.txt"
    assert run(tiny_checkpoint, *_argv(folder, out, "--format", "reference")) == 1
    _one_line(capsys, "holds a line break", "--format csv", "--overwrite", "in inputs 8..12 of folder")
    assert run(tiny_checkpoint, *_argv(folder, out, "--format", "csv", "--overwrite")) == 0
    assert [r[0] for r in read_csv(out)].count("1\n0.png") == 1


def test_a_late_process_of_a_fresh_run_over_a_finished_result_scores_nothing(tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "c.csv"
    assert run(tiny_checkpoint, *_argv(folder, out)) == 0
    # Process 1 of 2 started again without --resume (its own share only: no cluster needed to reach the check).
    args = score.build_parser().parse_args([*_argv(folder, out), "--model", str(tiny_checkpoint)])
    with pytest.raises(JobError, match="already exists"):  # it used to score its share into a finished result
        pipeline._chunked_part(score.job_from_args(args), 1, 2, False)
    assert _names(out) == ["merged.json", "plan.json"]


def test_a_huge_file_named_like_a_chunk_is_not_read_whole(tmp_path):
    out = str(tmp_path / "r.csv")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    chunked.commit(folder, 0, _collector(2), "csv", False)
    with open(os.path.join(folder, "00000001-r1.csv"), "wb") as f:
        f.write(b"id,quality,error\n")
        f.truncate(1 << 30)  # 1 GiB claimed (sparse): reading it whole would hold it all in memory
    emb = str(tmp_path / "e.npy")
    with open(os.path.join(folder, "00000001-r1.embedding.npy"), "wb") as f:
        f.write(chunked._npy_bytes(np.zeros((1, 3), np.float32)))
    with pytest.raises(chunked.ChunkError, match="holds more than the 65553 bytes its rows can take"):
        chunked.merge(out, "csv", False, 2, {"embedding": (emb, (3,))})
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------- object storage


def _s3_names(url):
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)) if fs.exists(inner) else []


def test_on_s3_a_failing_merge_writes_no_result_and_a_prefix_named_like_a_chunk_is_refused(
    tiny_checkpoint, folder, tmp_path, s3_bucket, capsys, monkeypatch
):
    import fsspec

    url, emb = f"{s3_bucket}/run/c.csv", f"{s3_bucket}/run/e.npy"
    argv = _argv(folder, url, "--save-embeddings", emb)
    real = storage.open_read

    def failing(path, **options):
        if str(path).endswith("00000001-r5.csv"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, **options)

    monkeypatch.setattr(storage, "open_read", failing)
    assert run(tiny_checkpoint, *argv) == 1
    _one_line(capsys, "cannot read the chunk", "--resume")
    assert _s3_names(f"{s3_bucket}/run") == ["c.csv.chunks"]  # neither the result nor its array file appeared
    monkeypatch.setattr(storage, "open_read", real)
    fs, inner = fsspec.core.url_to_fs(url)
    fs.rm_file(inner + ".chunks/00000001-r5.csv")
    fs.pipe_file(inner + ".chunks/00000001-r5.csv/planted", b"x")  # a "folder" of that name
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "00000001-r5.csv", "--overwrite")
    assert "c.csv" not in _s3_names(f"{s3_bucket}/run")
    fs.rm(inner + ".chunks/00000001-r5.csv", recursive=True)
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert np.load(io.BytesIO(fs.cat_file(emb.split("://", 1)[1]))).shape[0] == 13


def test_a_result_written_without_its_merge_record_is_merged_again_on_resume(
    tiny_checkpoint, folder, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "c.csv"
    real = storage.write_bytes

    def full(path, data):
        if str(path).endswith(chunked.MERGED):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(storage, "write_bytes", full)
    assert run(tiny_checkpoint, *_argv(folder, out)) == 1
    _one_line(capsys, "c.csv is written but", "merged.json could not be", "--resume")
    first = out.read_bytes()
    assert "00000001-r5.csv" in _names(out)  # the chunks are kept until the record is written
    monkeypatch.setattr(storage, "write_bytes", real)
    assert run(tiny_checkpoint, *_argv(folder, out)) == 1  # not replaced without a flag
    _one_line(capsys, "already exists")
    assert run(tiny_checkpoint, *_argv(folder, out, "--resume")) == 0
    assert out.read_bytes() == first and _names(out) == ["merged.json", "plan.json"]


@pytest.mark.parametrize(
    "plan",
    [
        b"{" + b'"a": "' + b"x" * (10 << 20) + b'"}',  # 10 MiB: not read whole
        b"[" * 10_000 + b"]" * 10_000,  # nested 10,000 deep
        json.dumps({"format": chunked.RECORD_FORMAT, "version": 99, "pieces": 2, "settings": {}}).encode(),
        b"\xff\xfe not text",
    ],
    ids=["10MiB", "deep", "version", "binary"],
)
def test_a_foreign_plan_is_refused_in_one_line(tiny_checkpoint, half, capsys, plan):
    argv, out = half
    with open(os.path.join(chunked.chunks_dir(out), chunked.PLAN), "wb") as f:
        f.write(plan)
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    _one_line(capsys, "plan.json is not a chunk record of this version", "--overwrite")
    assert run(tiny_checkpoint, *argv, "--overwrite") == 0
    assert len(read_csv(out)) == 14


def test_arrays_added_or_dropped_on_resume_are_refused(tiny_checkpoint, half, tmp_path, capsys):
    argv, out = half
    assert run(tiny_checkpoint, *argv, "--resume", "--save-embeddings", str(tmp_path / "e.npy")) == 1
    _one_line(capsys, "(arrays none -> embedding (8))", "--overwrite")
    assert _names(out) == ["00000000-r8.csv", "plan.json"]
    argv, out = _argv(argv[1], tmp_path / "d.csv", "--save-embeddings", str(tmp_path / "d.npy")), tmp_path / "d.csv"
    assert run(tiny_checkpoint, *argv) == 0
    os.remove(out)
    os.remove(os.path.join(chunked.chunks_dir(out), chunked.MERGED))
    assert run(tiny_checkpoint, *argv[:-2], "--resume") == 1  # dropped
    _one_line(capsys, "(arrays embedding (8) -> none)")


def test_a_process_that_scored_with_other_flags_cannot_be_resumed_into_the_run(tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "c.csv"

    def job(*more):
        args = score.build_parser().parse_args([*_argv(folder, out, *more), "--model", str(tiny_checkpoint)])
        return score.job_from_args(args)

    # Both processes of a first try found no plan (a race): process 1 scored its share with --alpha 4, and
    # process 0, started with the default 8, finds that plan gone (replaced by its own in the race) ...
    pipeline._chunked_part(job("--alpha", "4"), 1, 2, False)
    os.remove(os.path.join(chunked.chunks_dir(out), chunked.PLAN))
    alpha = r"process-00001-of-00002.json .* \(alpha 4.0 -> 8.0\)"
    with pytest.raises(chunked.ChunkError, match=alpha):  # ... but not process 1's record: refused before scoring
        pipeline._chunked_part(job(), 0, 2, False)
    # Rerun with --resume and the right flags, process 1 must not keep the pieces it scored with --alpha 4.
    with pytest.raises(chunked.ChunkError, match=alpha):
        pipeline._chunked_part(job("--resume"), 1, 2, False)
    pipeline._chunked_part(job("--overwrite"), 1, 2, False)  # what the message says: its share is scored again
    pipeline._chunked_part(job("--resume"), 0, 2, False)
    summary, plan = pipeline._chunked_part(job("--resume"), 1, 2, False)
    assert summary.scored == 0 and summary.skipped == 5 and plan.settings["alpha"] == 8.0


def test_parquet_chunks_whose_names_swap_their_row_counts_are_refused(tmp_path):
    out = str(tmp_path / "r.parquet")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    chunked.commit(folder, 0, _collector(3), "parquet", False)
    chunked.commit(folder, 1, _collector(2), "parquet", False)
    os.rename(os.path.join(folder, "00000000-r3.parquet"), os.path.join(folder, "x"))
    os.rename(os.path.join(folder, "00000001-r2.parquet"), os.path.join(folder, "00000000-r3.parquet"))
    os.rename(os.path.join(folder, "x"), os.path.join(folder, "00000001-r2.parquet"))  # the total still agrees
    with pytest.raises(chunked.ChunkError, match="00000000-r3.parquet holds 2 rows, not the 3 its name claims"):
        chunked.merge(out, "parquet", False, 2, {})
    assert not os.path.exists(out)


def test_an_array_merge_failing_on_the_second_array_leaves_neither(tmp_path):
    out = str(tmp_path / "r.csv")
    folder = chunked.chunks_dir(out)
    os.makedirs(folder)
    c = chunked.Collector({"embedding": (3,), "patch_quality": (2, 2)})
    c.write([output.Row("a", 0.5)], {"embedding": np.ones((1, 3)), "patch_quality": np.ones((1, 2, 2))})
    chunked.commit(folder, 0, c, "csv", False)
    os.remove(os.path.join(folder, "00000000-r1.patch_quality.npy"))
    emb, patch = tmp_path / "e.npy", tmp_path / "p.npy"
    with pytest.raises(chunked.ChunkError, match="committed without its patch_quality rows"):
        chunked.merge(out, "csv", False, 1, {"embedding": (str(emb), (3,)), "patch_quality": (str(patch), (2, 2))})
    assert not emb.exists() and not patch.exists() and not os.path.exists(out)


def test_storage_refusing_to_remove_the_old_result_stops_an_overwrite_in_one_line(
    tiny_checkpoint, folder, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "c.csv"
    assert run(tiny_checkpoint, *_argv(folder, out)) == 0

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage, "remove", refused)
    assert run(tiny_checkpoint, *_argv(folder, out, "--overwrite")) == 1
    _one_line(capsys, "cannot remove", "Permission denied", "--out")
    monkeypatch.undo()
    os.remove(os.path.join(chunked.chunks_dir(out), chunked.MERGED))
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: refused(path) if str(path).endswith(".chunks") else real(path))
    assert run(tiny_checkpoint, *_argv(folder, out, "--resume")) == 1
    _one_line(capsys, "cannot list", "Permission denied", "--out")


def test_a_two_process_run_is_resumed_and_merged_by_one_process(tiny_checkpoint, folder, tmp_path, capsys):
    single = tmp_path / "s.csv"
    assert run(tiny_checkpoint, *_argv(folder, single)) == 0
    out = tmp_path / "c.csv"
    args = score.build_parser().parse_args([*_argv(folder, out), "--model", str(tiny_checkpoint)])
    for process in (0, 1):  # both shares committed, the merge never came (process 0 died waiting)
        pipeline._chunked_part(score.job_from_args(args), process, 2, False)
    capsys.readouterr()
    assert run(tiny_checkpoint, *_argv(folder, out, "--resume")) == 0  # one process, --num-processes not given
    assert "scoring 0 of 2 pieces" in capsys.readouterr().err
    assert out.read_bytes() == single.read_bytes() and _names(out) == ["merged.json", "plan.json"]
    assert run(tiny_checkpoint, *_argv(folder, out, "--resume")) == 0
    assert "complete already" in capsys.readouterr().err and out.read_bytes() == single.read_bytes()
