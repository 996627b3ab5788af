"""Result files: parts of a multi-process run merge into one table (and its arrays) row for row."""

import contextlib
import os
import re
import socket

import numpy as np
import pytest

from vitnt_jax import output

from helpers import returns_within


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_merge_keeps_ids_with_line_breaks_and_carriage_returns(tmp_path, fmt):
    # File names may hold any character but '/': a row is a CSV record, not a text line. The reference format
    # cannot quote, so it holds no line break (refused) but keeps spaces and formula characters as they are.
    if fmt == "csv":
        ids = [["a.png", "b\rc.png", "d\u2028e.png"], ["f\x0cg.png", "h.png", "i\nj.png", "=1+2.png", "'k.png"]]
    else:
        ids = [["a.png", "b c.png", " d.png "], ["=1+2.png", "h.png", "'k.png", "-l.png\t"]]
    out, emb = tmp_path / "s.out", tmp_path / "e.npy"
    for k, part in enumerate(ids):
        writer = output.ResultWriter(
            output.part_path(out, k, 2), fmt=fmt, arrays={"embedding": (output.part_path(emb, k, 2), (2,))}
        )
        writer.write([output.Row(i, 0.5) for i in part], {"embedding": np.ones((len(part), 2), np.float32) * k})
        writer.close(True)
    assert output.merge_parts(out, 2, fmt, [emb]) == sum(map(len, ids))
    assert [r.id for r in output.read_results(out, fmt)] == [i for part in ids for i in part]
    np.testing.assert_array_equal(np.load(emb)[:, 0], [k for k, part in enumerate(ids) for _ in part])


def test_a_resumed_csv_reads_back_ids_with_carriage_returns(tmp_path):
    path, ids = tmp_path / "s.csv", ["a\rb.png", "c\r\nd.png", 'e",f.png', "g.png"]
    writer = output.ResultWriter(path)
    writer.write([output.Row(i, 0.25, None, "") for i in ids])
    writer.close(True)
    assert output.ResultWriter(path, resume=True).done_ids == ids
    assert path.read_bytes().count(b"\n") == 1 + 4 + 1  # the header, one per row, and the quoted '\r\n'


def test_a_csv_that_csv_cannot_read_is_one_sentence(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"id,quality,error\nb\rc,0.5,\n")
    with pytest.raises(output.OutputError, match=r"s.csv is not a valid CSV \(.*\); choose a new out\.$"):
        output.ResultWriter(path, resume=True)


def test_a_csv_saved_by_an_editor_resumes_bom_crlf_and_a_last_blank_line_included(tmp_path):
    path, fmt = tmp_path / "s.csv", "csv"
    body = "id,quality,error\r\na b.png,0.5,\r\n'=c.png,,bad\r\n\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    writer = output.ResultWriter(path, fmt=fmt, resume=True)
    assert writer.done_ids == ["a b.png", "=c.png"]
    writer.write([output.Row("d.png", 0.25)])
    writer.close(True)
    rows = output.read_results(path, fmt)
    assert [(r.id, r.quality) for r in rows] == [("a b.png", 0.5), ("=c.png", None), ("d.png", 0.25)]


def test_a_resumed_file_holding_an_id_twice_is_refused_naming_it(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,quality,error\na.png,0.5,\nb.png,0.5,\na.png,0.25,\n")
    with pytest.raises(output.OutputError, match=r"s.csv already holds the id 'a.png' twice; .*: choose a new out\.$"):
        output.ResultWriter(path, resume=True)
    assert path.read_text().count("a.png") == 2


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_a_non_finite_quality_is_never_counted_as_scored_when_written_or_read(tmp_path, fmt):
    old = tmp_path / "old.out"  # written by an older version, which counted NaN scores as scored
    old.write_text(
        "id,quality,error\na.png,nan,\nb.png,inf,\nc.png,-1e999,\nd.png,0.5,\n"
        if fmt == "csv"
        else "a.png nan\nb.png inf\nc.png -1e999\nd.png 0.5\n"
    )
    assert [r.quality for r in output.read_results(old, fmt)] == [None, None, None, 0.5]
    new = tmp_path / "new.out"
    output.write_results(new, [output.Row("a.png", float("nan")), output.Row("b.png", float("-inf"))], fmt=fmt)
    rows = output.read_results(new, fmt)
    assert [r.quality for r in rows] == [None, None]
    if fmt == "csv":
        assert [r.error for r in rows] == ["non-finite score (nan)", "non-finite score (-inf)"]


def test_an_id_of_a_megabyte_resumes(tmp_path):
    path, ident, fmt = tmp_path / "s.csv", "x" * (1 << 20) + ".png", "csv"  # beyond the csv module's default limit
    writer = output.ResultWriter(path, fmt=fmt)
    writer.write([output.Row(ident, 0.5), output.Row("b.png", None, None, "e" * (1 << 18))])
    writer.close(True)
    assert output.ResultWriter(path, fmt=fmt, resume=True).done_ids == [ident, "b.png"]


def test_a_fifo_at_the_lock_files_name_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "s.csv.lock")  # opened, it would be locked, and a second run's read of its note would fail
    with pytest.raises(output.OutputError, match=r"s.csv: its lock file .*s.csv.lock is not a regular file"):
        output.lock_output(tmp_path / "s.csv")
    with pytest.raises(output.OutputError, match=r"s.csv: its lock file .*s.csv.lock is not a regular file"):
        output.ResultWriter(tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_a_lock_in_a_folder_that_cannot_be_written_says_permission_denied(tmp_path, monkeypatch):
    real = os.open

    def read_only_folder(path, flags, *args):  # what a read-only folder (or another user's) does to a new file
        if flags & os.O_CREAT and str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(output.os, "open", read_only_folder)
    with pytest.raises(output.OutputError, match=r"cannot create its lock file .*s.csv.lock \(Permission denied\)"):
        output.lock_output(tmp_path / "s.csv")


def test_a_partial_array_torn_inside_its_header_resumes_when_the_table_holds_no_row(tmp_path):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    output.ResultWriter(path, arrays={"embedding": (emb, (2,))}).close(False)
    partial = tmp_path / "e.npy.partial"
    partial.write_bytes(partial.read_bytes()[:20])  # killed (or the disk full) while its header was written
    writer = output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))})
    writer.write([output.Row("a.png", 0.5)], {"embedding": np.ones((1, 2), np.float32)})
    writer.close(True)
    np.testing.assert_array_equal(np.load(emb), np.ones((1, 2)))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_reading_results_from_a_fifo_or_a_device_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "s.csv"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes it: reading would wait forever
    else:
        path.symlink_to("/dev/zero")  # read_results follows links (a result may be linked in): endless zeros
    name = "a named pipe (FIFO)" if kind == "fifo" else "a character device"
    with pytest.raises(output.OutputError, match=rf"s.csv is {re.escape(name)}, not a result file\.$"):
        output.read_results(path)
    if kind == "fifo":
        with pytest.raises(output.OutputError, match=r"s.csv is a named pipe \(FIFO\), not a result file\.$"):
            output.ResultWriter(path, resume=True)


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_a_file_with_old_mac_line_ends_is_refused_unchanged_not_cut_to_nothing(tmp_path, fmt):
    path = tmp_path / "s.out"  # no '\n' at all: every record would count as one torn record
    before = b"id,quality,error\ra.png,0.5,\rb.png,0.25,\r" if fmt == "csv" else b"a.png 0.5\rb.png 0.25\r"
    path.write_bytes(before)
    match = r"s.out has records ending in a carriage return alone .*; convert its line ends to LF or CRLF, or choose"
    with pytest.raises(output.OutputError, match=match):
        output.ResultWriter(path, fmt=fmt, resume=True)
    with pytest.raises(output.OutputError, match=match):
        output.read_results(path, fmt)
    assert path.read_bytes() == before


def test_a_record_torn_inside_a_quoted_id_holding_a_carriage_return_is_still_cut(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b'id,quality,error\na.png,0.5,\n"b\rc\r')  # torn inside the quotes: one record, cut
    assert output.ResultWriter(path, resume=True).done_ids == ["a.png"]
    assert path.read_bytes() == b"id,quality,error\na.png,0.5,\n"


def test_an_id_starting_with_a_byte_order_mark_is_refused_by_the_reference_format_and_kept_by_csv(tmp_path):
    # First in a reference file, it would be read as an editor's mark and dropped: resuming would score it again.
    ident = "\ufeffx.png"
    with pytest.raises(output.OutputError, match=r"starts with a byte-order mark \(U\+FEFF\), .*; use format csv"):
        output.check_ids(["a.png", ident], "reference")
    writer = output.ResultWriter(tmp_path / "s.txt", fmt="reference")
    with pytest.raises(output.OutputError, match=r"starts with a byte-order mark"):
        writer.write([output.Row(ident, 0.5)])
    writer.close(True)
    assert (tmp_path / "s.txt").read_bytes() == b""
    writer = output.ResultWriter(tmp_path / "s.csv")
    writer.write([output.Row(ident, 0.5)])
    writer.close(True)
    assert output.ResultWriter(tmp_path / "s.csv", resume=True).done_ids == [ident]


def _release(fifo):
    """Lets a writer stuck opening `fifo` go on (a failing test leaves no thread waiting)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_writer_given_a_fifo_or_a_socket_refuses_it_at_once(tmp_path, kind):
    # A library caller of pipeline.score_source passes its own writer: the pipeline's path checks never ran.
    path, server = tmp_path / "s.csv", socket.socket(socket.AF_UNIX)
    if kind == "fifo":
        os.mkfifo(path)  # nobody reads it: opening it for writing would wait forever
    else:
        server.bind(str(path))
    try:
        got = returns_within(1, lambda: output.ResultWriter(path, overwrite=True))
        _release(path)
    finally:
        server.close()
    assert got is not None, "opening the FIFO for writing blocked"
    name = "a named pipe (FIFO)" if kind == "fifo" else "a socket"
    assert got[0] == "error" and isinstance(got[1], output.OutputError), got
    assert str(got[1]) == f"out {path} is {name}, not a file; give a file path.", str(got[1])


def test_a_merge_given_a_fifo_as_an_array_part_refuses_it_at_once(tmp_path):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    for k in range(2):
        writer = output.ResultWriter(output.part_path(out, k, 2))
        writer.write([output.Row(f"{k}.png", 0.5)])
        writer.close(True)
    with open(output.part_path(emb, 0, 2), "wb") as f:
        np.save(f, np.ones((1, 2), np.float32))
    os.mkfifo(output.part_path(emb, 1, 2))  # reading it would wait for a writer forever
    got = returns_within(1, lambda: output.merge_parts(out, 2, "csv", [emb]))
    with contextlib.suppress(OSError):
        os.close(os.open(output.part_path(emb, 1, 2), os.O_WRONLY | os.O_NONBLOCK))
    assert got is not None, "the merge waited on the FIFO"
    assert got[0] == "error" and isinstance(got[1], output.OutputError), got
    assert "is a named pipe (FIFO), not a regular file" in str(got[1]) and not out.exists()
