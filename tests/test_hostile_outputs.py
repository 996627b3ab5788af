"""Hostile and unlucky outputs: a second writer, odd file names, torn records, a full disk."""

import csv
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitnt_jax import output

# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_lock_on_one_output_is_refused_even_in_the_same_process(tmp_path):
    out = tmp_path / "s.csv"
    with output.lock_output(out) as held:
        assert held.held and (tmp_path / "s.csv.lock").read_text().startswith(f"pid {os.getpid()} on host ")
        with pytest.raises(output.OutputError) as caught:
            output.lock_output(out)
        text = caught.value.render({"out": "--out"})
        assert text.startswith(f"--out {out} is being written by another run (pid {os.getpid()} on host ")
        assert text.endswith("; wait for it to finish or choose another --out.") and "\n" not in text
        output.lock_output(tmp_path / "t.csv").release()  # another output is not locked
    assert not (tmp_path / "s.csv.lock").exists()  # released: removed
    with output.lock_output(out):  # and free again
        pass


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from vitnt_jax import output
    lock = output.lock_output(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _hold_in_subprocess(path):
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_lock_held_by_another_process_refuses_and_a_killed_holder_blocks_nothing(tmp_path):
    out = tmp_path / "s.csv"
    child = _hold_in_subprocess(out)
    try:
        with pytest.raises(output.OutputError, match=f"being written by another run \\(pid {child.pid} on host "):
            output.lock_output(out)
        with pytest.raises(output.OutputError, match="being written by another run"):
            output.ResultWriter(out, overwrite=True)  # an --overwrite cannot destroy the other run's rows
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert (tmp_path / "s.csv.lock").exists()  # left behind by kill -9 ...
    with output.lock_output(out):  # ... and blocks nothing: the kernel released the lock with the process
        assert f"pid {os.getpid()} " in (tmp_path / "s.csv.lock").read_text()
    assert not (tmp_path / "s.csv.lock").exists()


def test_a_writer_locks_its_table_and_arrays_before_touching_them_and_releases_on_close(tmp_path):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    first = output.ResultWriter(out, arrays={"embedding": (emb, (2,))})
    first.write([output.Row("a.png", 0.5)], {"embedding": np.ones((1, 2), np.float32)})
    before = out.read_bytes()
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(output.OutputError, match="s.csv is being written by another run"):
            output.ResultWriter(out, **kwargs)
        assert out.read_bytes() == before  # nothing truncated, nothing read-and-cut
    with pytest.raises(output.OutputError) as caught:  # another table, the same embeddings file
        output.ResultWriter(tmp_path / "t.csv", arrays={"embedding": (emb, (2,))})
    assert caught.value.render({"save_embeddings": "--save-embeddings"}).startswith(f"--save-embeddings {emb} is ")
    assert not (tmp_path / "t.csv.lock").exists()  # the table lock it took first was released again
    first.close(True)
    assert not (tmp_path / "s.csv.lock").exists() and not (tmp_path / "e.npy.lock").exists()
    second = output.ResultWriter(out, resume=True, arrays={"embedding": (emb, (2,))})
    assert second.done_ids == ["a.png"]
    second.close(True)


def test_a_writer_can_use_a_lock_its_caller_holds_for_a_whole_run(tmp_path):
    out = tmp_path / "s.csv"
    with output.lock_output(out) as held:
        writer = output.ResultWriter(out, lock=held)
        writer.write([output.Row("a.png", 0.5)])
        writer.close(True)
        assert held.held  # the caller's lock outlives the writer (e.g. across a merge)
        with pytest.raises(output.OutputError, match="being written by another run"):
            output.ResultWriter(out, resume=True)
        writer = output.ResultWriter(out, resume=True, lock=False)
        assert writer.done_ids == ["a.png"]
        writer.close(True)
    assert not (tmp_path / "s.csv.lock").exists()


def test_a_link_where_the_lock_file_goes_is_never_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "s.csv.lock").symlink_to(target)
    with pytest.raises(output.OutputError, match=r"s.csv: cannot create its lock file .*s.csv.lock \("):
        output.lock_output(tmp_path / "s.csv")
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ hostile ids


def test_render_id_escapes_each_undecodable_byte_and_keeps_valid_text():
    assert output.render_id("bad_\udcff.png") == "bad_\\xff.png"  # os.fsdecode(b"bad_\xff.png")
    assert output.render_id(os.fsdecode(b"a\xc3(\x80.png")) == "a\\xc3(\\x80.png"  # byte by byte
    assert output.render_id("x\ud800y") == "x\\ud800y"  # a lone surrogate from elsewhere (a JSON list, TFDS)
    for text in ("plain.png", "caf\u00e9 \u2028\U0001f600.jpg", "literal_\\xff.png", ""):
        assert output.render_id(text) == text
    assert output.render_id(output.render_id("bad_\udcff.png")) == "bad_\\xff.png"  # rendered ids are fixed points


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_a_name_that_is_not_utf8_is_written_escaped_and_resumes(tmp_path, fmt):
    path, bad = tmp_path / "s.out", os.fsdecode(b"bad_\xff.png")
    writer = output.ResultWriter(path, fmt=fmt, arrays={"embedding": (tmp_path / "e.npy", (2,))})
    rows = [output.Row("a.png", 0.5), output.Row(bad, None, error=f"{bad}: not a readable image")]
    writer.write(rows, {"embedding": np.zeros((2, 2), np.float32)})
    writer.close(True)
    text = path.read_bytes().decode("utf-8")  # the file stays UTF-8
    assert "bad_\\xff.png" in text
    again = output.ResultWriter(path, fmt=fmt, resume=True, arrays={"embedding": (tmp_path / "e.npy", (2,))})
    assert again.done_ids == ["a.png", "bad_\\xff.png"] == [output.render_id(r.id) for r in rows]
    again.close(True)
    back = output.read_results(path, fmt)
    assert [r.id for r in back] == ["a.png", "bad_\\xff.png"]
    if fmt == "csv":
        assert back[1].error == "bad_\\xff.png: not a readable image"


_BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_every_line_break_in_a_csv_id_is_quoted_and_resumes(tmp_path):
    path = tmp_path / "s.csv"
    ids = [f"a{c}b.png" for c in _BREAKS]
    writer = output.ResultWriter(path)
    writer.write([output.Row(i, 0.5, error=f"e{c}f") for i, c in zip(ids, _BREAKS, strict=True)])
    writer.close(True)
    text = path.read_bytes().decode("utf-8")
    for i, c in zip(ids, _BREAKS, strict=True):
        assert f'\n"{i}",0.5,"e{c}f"\n' in text  # quoted: no reader that honours quotes splits the row
    outside = "".join(text.split('"')[::2])  # outside quotes: one '\n' per record, no other line break
    assert outside.count("\n") == 1 + len(ids) and not set(outside) & (set("".join(_BREAKS)) - {"\n"})
    resumed = output.ResultWriter(path, resume=True)
    assert resumed.done_ids == ids
    resumed.close(True)


_FORMULAS = ["=1+1.png", "+a.png", "-a.png", "@a.png", "\ta.png", "\ra.png", "'a.png", "''a.png", "a=b.png", "'"]


def test_csv_cells_that_a_spreadsheet_would_run_start_with_an_apostrophe_and_read_back_exactly(tmp_path):
    path = tmp_path / "s.csv"
    writer = output.ResultWriter(path, with_label=True)
    writer.write([output.Row(i, 0.5, label=f"@{k}", error=f"={k}") for k, i in enumerate(_FORMULAS)])
    writer.close(True)
    records = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))[1:]
    cells = [r[0] for r in records]
    assert cells[:8] == ["'=1+1.png", "'+a.png", "'-a.png", "'@a.png", "'\ta.png", "'\ra.png", "''a.png", "'''a.png"]
    assert cells[8:] == ["a=b.png", "''"] and records[0][2:] == ["'@0", "'=0"]
    back = output.read_results(path)
    assert [r.id for r in back] == _FORMULAS and [r.label for r in back] == [f"@{k}" for k in range(len(_FORMULAS))]
    assert [r.error for r in back] == [f"={k}" for k in range(len(_FORMULAS))]
    resumed = output.ResultWriter(path, with_label=True, resume=True)
    assert resumed.done_ids == _FORMULAS
    resumed.close(True)


def test_the_reference_format_refuses_an_id_with_a_line_break_before_writing_anything(tmp_path):
    path, emb = tmp_path / "s.txt", tmp_path / "e.npy"
    writer = output.ResultWriter(path, fmt="reference", arrays={"embedding": (emb, (2,))})
    writer.write([output.Row("=a b.png", 0.5)], {"embedding": np.zeros((1, 2), np.float32)})  # kept as is
    for c in _BREAKS:
        with pytest.raises(output.OutputError) as caught:
            writer.write([output.Row("c.png", 0.5), output.Row(f"x{c}y.png", 0.5)], {"embedding": np.zeros((2, 2))})
        text = caught.value.render({"format": "--format"})
        assert text == f"the id {f'x{c}y.png'!r} holds a line break, which the reference format cannot hold; use " + (
            "--format csv, which quotes it."
        )
    writer.close(True)
    assert path.read_text() == "=a b.png 0.500000000000000\n" and np.load(emb).shape == (1, 2)  # nothing half-written
    with pytest.raises(output.OutputError, match="holds a line break"):
        output.check_ids(["a.png", "b\u2028.png"], "reference")
    assert output.check_ids(["a.png", "b\u2028.png", "bad_\udcff.png"], "csv") == [
        "a.png",
        "b\u2028.png",
        "bad_\\xff.png",
    ]
    with pytest.raises(output.OutputError, match="holds a line break"):
        output.write_results(tmp_path / "w.txt", [output.Row("a\rb", 0.5)], fmt="reference")
    assert not (tmp_path / "w.txt").exists() and not (tmp_path / "w.txt.partial").exists()


def test_merged_parts_keep_escaped_and_apostrophed_ids(tmp_path):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    ids = [["=a.png", os.fsdecode(b"b\xfe.png")], ["'c.png", "d\u2028e.png", "-f.png"]]
    for k, part in enumerate(ids):
        writer = output.ResultWriter(
            output.part_path(out, k, 2), arrays={"embedding": (output.part_path(emb, k, 2), (1,))}
        )
        writer.write([output.Row(i, 0.5) for i in part], {"embedding": np.full((len(part), 1), k, np.float32)})
        writer.close(True)
    parts = b"".join(output.part_path(out, k, 2).read_bytes().split(b"\n", 1)[1] for k in range(2))
    assert output.merge_parts(out, 2, "csv", [emb]) == 5
    assert out.read_bytes() == b"id,quality,error\n" + parts  # byte for byte
    assert [r.id for r in output.read_results(out)] == ["=a.png", "b\\xfe.png", "'c.png", "d\u2028e.png", "-f.png"]
    np.testing.assert_array_equal(np.load(emb)[:, 0], [0, 0, 1, 1, 1])


# ------------------------------------------------------------------------------------------------ torn writes


def _written(tmp_path, rows, n_array=None):
    """Returns (table path, array path) after writing `rows` (array row k = k) and stopping unfinished."""
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (1,))})
    writer.write(rows, {"embedding": np.arange(len(rows), dtype=np.float32)[:, None]})
    writer.close(False)  # a crash: the array rows stay in e.npy.partial
    return path, emb


@pytest.mark.parametrize(
    "rows, cut_after",
    [
        ([output.Row("a.png", 0.5), output.Row("x\ny.png", 0.25), output.Row("c.png", 0.5)], '"x\n'),
        ([output.Row("a.png", 0.5), output.Row("b.png", None, error="one\ntwo"), output.Row("c.png", 0.5)], '"one\n'),
        ([output.Row("a.png", 0.5), output.Row("x,\u2028\ny.png", 0.25), output.Row("c.png", 0.5)], ",\u2028\n"),
    ],
    ids=["inside-a-quoted-id", "inside-a-quoted-error", "after-a-quoted-comma"],
)
def test_resume_cuts_a_record_torn_inside_quotes_and_keeps_the_arrays_aligned(tmp_path, rows, cut_after):
    path, emb = _written(tmp_path, rows)
    text = path.read_bytes().decode("utf-8")
    path.write_bytes(text[: text.index(cut_after) + len(cut_after)].encode("utf-8"))  # a crash right after '\n'
    resumed = output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (1,))})
    assert resumed.done_ids == ["a.png"]
    assert path.read_bytes() == b"id,quality,error\na.png,0.5,\n"  # cut back to the last complete record
    resumed.write(rows[1:], {"embedding": np.arange(1, len(rows), dtype=np.float32)[:, None]})
    resumed.close(True)
    back = output.read_results(path)
    assert [(r.id, r.quality, r.error) for r in back] == [(r.id, r.quality, r.error) for r in rows]
    np.testing.assert_array_equal(np.load(emb)[:, 0], np.arange(len(rows)))  # row k of the array is row k


def test_resume_drops_a_character_torn_in_half(tmp_path):
    rows = [output.Row("a.png", 0.5), output.Row("\u00e9t\u00e9.png", 0.25)]
    path, emb = _written(tmp_path, rows)
    data = path.read_bytes()
    path.write_bytes(data[: data.index("\u00e9".encode()) + 1])  # the first byte of a two-byte character
    resumed = output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (1,))})
    assert resumed.done_ids == ["a.png"] and path.read_bytes() == b"id,quality,error\na.png,0.5,\n"
    resumed.close(False)
    assert output.read_results(path)[0].id == "a.png"


def test_a_resumed_file_with_a_broken_record_in_the_middle_is_refused_unchanged(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b'id,quality,error\n"a"b,0.5,\nc,0.5,\n')
    with pytest.raises(output.OutputError, match=r"s.csv is not a valid CSV \(.*\); choose a new out\.$"):
        output.ResultWriter(path, resume=True)
    assert path.read_bytes() == b'id,quality,error\n"a"b,0.5,\nc,0.5,\n'


# ------------------------------------------------------------------------------------------------ a full disk


@pytest.fixture()
def full_disk(monkeypatch):
    """Returns set(budget, which): writes to files whose name ends in `which` fail with ENOSPC after
    `budget` more bytes (a write that crosses it is written in part, as a real full disk does)."""
    state = {"budget": None, "which": ()}

    class Full:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            if state["budget"] is not None and len(raw) > state["budget"]:
                part = raw[: state["budget"]]
                self._file.write(part.decode("utf-8", "ignore") if isinstance(data, str) else part)
                self._file.flush()
                state["budget"] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if state["budget"] is not None:
                state["budget"] -= len(raw)
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    def fake_open(file, *args, **kwargs):
        real = open(file, *args, **kwargs)
        return Full(real) if str(file).endswith(state["which"]) else real

    monkeypatch.setattr(output, "open", fake_open, raising=False)

    def set_(budget, which):
        state.update(budget=budget, which=tuple(which))

    return set_


def _one_line_about_the_disk(error, path):
    text = error.render({"resume": "--resume"})
    assert text == f"cannot write {path}: the disk is full (No space left on device); free space, then rerun with " + (
        "--resume."
    )
    assert error.__cause__ is None and error.__suppress_context__  # no chained traceback


@pytest.mark.parametrize("which, budget, kept", [("s.csv", 15, 4), ("e.npy.partial", 10, 3)])
def test_a_full_disk_mid_batch_is_one_sentence_and_resume_keeps_table_and_arrays_aligned(
    tmp_path, full_disk, which, budget, kept
):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    arrays = {"embedding": (emb, (2,))}
    full_disk(None, [which])
    writer = output.ResultWriter(path, arrays=arrays)
    writer.write([output.Row(f"{k}.png", 0.5) for k in range(3)], {"embedding": np.zeros((3, 2), np.float32)})
    full_disk(budget, [which])  # in the middle of the next batch
    with pytest.raises(output.OutputError) as caught:
        writer.write([output.Row(f"{k}.png", 0.5) for k in range(3, 6)], {"embedding": np.ones((3, 2), np.float32)})
    _one_line_about_the_disk(caught.value, tmp_path / which)
    writer.close(False)  # the run stops on that error: closing raises nothing over it
    full_disk(None, [])  # space freed
    resumed = output.ResultWriter(path, resume=True, arrays=arrays)
    done = kept
    assert resumed.done_ids == [f"{k}.png" for k in range(kept)]  # the rows complete in the table
    resumed.write([output.Row(f"{k}.png", 0.5) for k in range(done, 6)], {"embedding": np.ones((6 - done, 2))})
    resumed.close(True)
    assert [r.id for r in output.read_results(path)] == [f"{k}.png" for k in range(6)]
    np.testing.assert_array_equal(np.load(emb)[:, 0], [0, 0, 0] + [1] * 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s.csv"]  # no partial, temporary or lock file


def test_a_full_disk_while_the_npy_is_made_leaves_no_temporary_file_and_resume_finishes_it(tmp_path, full_disk):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (4,))})
    writer.write([output.Row("a.png", 0.5), output.Row("b.png", 0.5)], {"embedding": np.ones((2, 4), np.float32)})
    full_disk(140, [".tmp.npy"])  # the header (128 bytes) and part of the rows
    with pytest.raises(output.OutputError) as caught:
        writer.close(True)
    _one_line_about_the_disk(caught.value, emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy.partial", "s.csv"]  # the rows are kept
    full_disk(None, [])
    resumed = output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))})
    assert resumed.done_ids == ["a.png", "b.png"]
    resumed.close(True)
    np.testing.assert_array_equal(np.load(emb), np.ones((2, 4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s.csv"]


@pytest.mark.parametrize("which", [".merging", ".merging.npy"])
def test_a_full_disk_during_a_merge_changes_nothing_and_keeps_every_part(tmp_path, full_disk, which):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    for k in range(2):
        writer = output.ResultWriter(
            output.part_path(out, k, 2), arrays={"embedding": (output.part_path(emb, k, 2), (2,))}
        )
        writer.write([output.Row(f"{k}.png", 0.5)], {"embedding": np.full((1, 2), k, np.float32)})
        writer.close(True)
    before = sorted(p.name for p in tmp_path.iterdir())
    full_disk(20, [which])
    with pytest.raises(output.OutputError) as caught:
        output.merge_parts(out, 2, "csv", [emb])
    _one_line_about_the_disk(caught.value, out if which == ".merging" else emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no merged file, no temporary one, every part
    full_disk(None, [])
    assert output.merge_parts(out, 2, "csv", [emb]) == 2
    np.testing.assert_array_equal(np.load(emb)[:, 0], [0, 1])


def test_a_full_disk_under_write_results_keeps_the_old_file_and_no_temporary_one(tmp_path, full_disk):
    path = tmp_path / "s.csv"
    output.write_results(path, [output.Row("a.png", 0.5)])
    full_disk(10, [".partial"])
    with pytest.raises(output.OutputError, match=r"s.csv: the disk is full .*; free space, then run it again\.$"):
        output.write_results(path, [output.Row("b.png", 0.5)], overwrite=True)
    assert [r.id for r in output.read_results(path)] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


_FORKS = textwrap.dedent(
    """
    import os, sys
    from vitnt_jax import output
    held = output.lock_output(sys.argv[1])
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the lock, as a forked worker's garbage collector would
        held.release()
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        output.lock_output(sys.argv[1])
    except output.OutputError:
        print("still held", os.path.exists(sys.argv[1] + ".lock"))
    """
)


def test_a_forked_child_never_removes_its_parents_lock(tmp_path):
    # In a process of its own: this one has JAX's threads running, and forking it would warn.
    done = subprocess.run([sys.executable, "-c", _FORKS, str(tmp_path / "s.csv")], capture_output=True, timeout=60)
    assert done.stdout.decode().strip() == "still held True", done.stderr.decode()


_RAW_HOLDER = textwrap.dedent(
    """
    import fcntl, sys, time
    f = open(sys.argv[1], "r+b")
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_the_refusal_names_the_holder_in_one_printable_line_whatever_the_lock_file_holds(tmp_path):
    lock = tmp_path / "s.csv.lock"
    lock.write_bytes(b"pid 7 on host \x1b[31mevil\x07 since then\nsecond line\n" + b"x" * 500)
    child = subprocess.Popen([sys.executable, "-c", _RAW_HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(output.OutputError) as caught:
            output.lock_output(tmp_path / "s.csv")
        assert str(caught.value) == (
            f"out {tmp_path / 's.csv'} is being written by another run (pid 7 on host [31mevil since then); wait "
            "for it to finish or choose another out."
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()


# ------------------------------------------------------------------------------------------------ links planted late


def _two_parts(tmp_path, fmt="csv", ids=(["0.png"], ["1.png"]), width=2):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    for k, part in enumerate(ids):
        writer = output.ResultWriter(
            output.part_path(out, k, len(ids)),
            fmt=fmt,
            arrays={"embedding": (output.part_path(emb, k, len(ids)), (width,))},
        )
        writer.write([output.Row(i, 0.5) for i in part], {"embedding": np.full((len(part), width), k, np.float32)})
        writer.close(True)
    return out, emb


def _plant(tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / name).symlink_to(victim)
    return victim


def _link_sentence(name):
    return rf"{name} is a symbolic link; results are never written through a link: remove it, or give the file it "


@pytest.mark.parametrize("name", ["s.csv", "e.npy.partial"])
def test_a_resume_never_writes_through_a_link_at_the_table_or_its_arrays(tmp_path, name):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (2,))})
    writer.write([output.Row("a.png", 0.5)], {"embedding": np.ones((1, 2), np.float32)})
    writer.close(False)
    (tmp_path / name).rename(tmp_path / "moved")
    victim = _plant(tmp_path, name)
    victim.write_bytes((tmp_path / "moved").read_bytes() + b"torn")  # a resume through the link would cut it
    before = victim.read_bytes()
    with pytest.raises(output.OutputError, match=_link_sentence(name)):
        output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))})
    assert victim.read_bytes() == before and (tmp_path / name).is_symlink()


def test_the_table_is_opened_without_following_a_link_planted_after_the_checks(tmp_path, monkeypatch):
    path = tmp_path / "s.csv"
    victim = _plant(tmp_path, "s.csv")
    monkeypatch.setattr(output.Path, "is_symlink", lambda self: False)  # the link comes after every check
    with pytest.raises(output.OutputError, match=_link_sentence("s.csv")):
        output.ResultWriter(path, overwrite=True)
    assert victim.read_bytes() == b"precious"


def test_a_link_at_the_temporary_npy_name_is_refused_and_a_leftover_file_there_is_replaced(tmp_path):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (2,))})
    writer.write([output.Row("a.png", 0.5)], {"embedding": np.ones((1, 2), np.float32)})
    victim = _plant(tmp_path, "e.npy.tmp.npy")
    with pytest.raises(output.OutputError, match=_link_sentence("e.npy.tmp.npy")):
        writer.close(True)
    assert victim.read_bytes() == b"precious" and (tmp_path / "e.npy.partial").exists() and not emb.exists()
    (tmp_path / "e.npy.tmp.npy").unlink()
    (tmp_path / "e.npy.tmp.npy").write_bytes(b"left by a killed run")
    output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))}).close(True)
    np.testing.assert_array_equal(np.load(emb), np.ones((1, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s.csv", "victim"]


@pytest.mark.parametrize("name", ["s.csv.merging", "e.npy.merging.npy"])
def test_a_link_at_a_merge_temporary_is_refused_and_a_leftover_file_there_is_replaced(tmp_path, name):
    out, emb = _two_parts(tmp_path)
    victim = _plant(tmp_path, name)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(output.OutputError, match=_link_sentence(name)):
        output.merge_parts(out, 2, "csv", [emb])
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / name).unlink()
    (tmp_path / name).write_bytes(b"left by a killed merge")
    assert output.merge_parts(out, 2, "csv", [emb]) == 2
    assert [r.id for r in output.read_results(out)] == ["0.png", "1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s.csv", "victim"]


def test_write_results_never_writes_through_a_link_at_its_temporary(tmp_path):
    victim = _plant(tmp_path, "w.csv.partial")
    with pytest.raises(output.OutputError, match=_link_sentence("w.csv.partial")):
        output.write_results(tmp_path / "w.csv", [output.Row("a.png", 0.5)])
    assert victim.read_bytes() == b"precious" and not (tmp_path / "w.csv").exists()


# ------------------------------------------------------------------------------------------------ merges


def _merge_setup(tmp_path, append):
    """Returns (out, emb, ranges): two parts of a 2-process run, after a finished merge of 'old' rows when `append`."""
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    if append:
        writer = output.ResultWriter(out, arrays={"embedding": (emb, (3,))})
        writer.write([output.Row(f"old{k}.png", 0.25) for k in range(3)], {"embedding": np.full((3, 3), 9.0)})
        writer.close(True)
    ranges = [[f"a{k}\n.png" for k in range(4)], [f"b{k}.png" for k in range(3)]]
    for i, ids in enumerate(ranges):
        writer = output.ResultWriter(
            output.part_path(out, i, 2), arrays={"embedding": (output.part_path(emb, i, 2), (3,))}
        )
        writer.write([output.Row(k, 0.5) for k in ids], {"embedding": np.full((len(ids), 3), i, np.float32)})
        writer.close(True)
    return out, emb, ranges


_KILL_AT = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    from vitnt_jax import output
    left = int(sys.argv[1])
    def counted(real):
        def call(*args, **kwargs):
            global left
            left -= 1
            if left == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    os.replace, os.fsync = counted(os.replace), counted(os.fsync)
    pathlib.Path.unlink = counted(pathlib.Path.unlink)
    output._copy_rows = counted(output._copy_rows)
    out = pathlib.Path(sys.argv[2])
    output.merge_parts(out, 2, "csv", [out.with_name("e.npy")], append=out.exists())
    """
)


@pytest.mark.parametrize("append", [False, True])
def test_a_merge_killed_at_any_point_changes_nothing_or_is_complete_and_a_resume_finishes_it(tmp_path, append):
    done = tmp_path / "uninterrupted"
    done.mkdir()
    out, emb, ranges = _merge_setup(done, append)
    output.merge_parts(out, 2, "csv", [emb], append=append)
    want_table, want_emb = out.read_bytes(), np.load(emb)
    for point in range(1, 40):
        work = tmp_path / str(point)
        work.mkdir()
        out, emb, ranges = _merge_setup(work, append)
        before = {p.name: p.read_bytes() for p in work.iterdir()}
        child = subprocess.run([sys.executable, "-c", _KILL_AT, str(point), str(out)], capture_output=True)
        if child.returncode == 0:
            break  # past the merge's last step
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        table = out.read_bytes() if out.exists() else None
        if table != want_table:  # not merged yet: every part and the table as they were
            assert table == before.get("s.csv")
            assert all(before[n] == (work / n).read_bytes() for n in before if "part" in n), point
        # Rerun all processes with --resume (each skips what its part or the merged table holds), then merge.
        merged = set(output.read_ids(out, "csv", output.columns(False))) if out.exists() else set()
        for i, ids in enumerate(ranges):
            writer = output.ResultWriter(
                output.part_path(out, i, 2), resume=True, arrays={"embedding": (output.part_path(emb, i, 2), (3,))}
            )
            todo = [k for k in ids if k not in set(writer.done_ids) | merged]
            writer.write([output.Row(k, 0.5) for k in todo], {"embedding": np.full((len(todo), 3), i, np.float32)})
            writer.close(True)
        output.merge_parts(out, 2, "csv", [emb], append=out.exists())
        assert out.read_bytes() == want_table, point
        np.testing.assert_array_equal(np.load(emb), want_emb)
        assert sorted(p.name for p in work.iterdir()) == ["e.npy", "s.csv"], point
    else:
        raise AssertionError("the merge was killed at every one of 39 points")
    assert point > 8  # the kills reached the renames and the removal of the parts


def test_a_missing_part_is_one_sentence_and_changes_nothing(tmp_path):
    out, emb, _ = _merge_setup(tmp_path, append=False)
    output.part_path(out, 1, 2).unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(output.OutputError, match=r"part 1 of .*s.csv \(.*part00001-of-00002\) is missing; rerun all"):
        output.merge_parts(out, 2, "csv", [emb])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("tamper", ["same ids in two parts", "an id the merged table holds", "rows of another width"])
def test_parts_that_do_not_come_from_one_run_are_refused_not_merged(tmp_path, tamper):
    out, emb, _ = _merge_setup(tmp_path, append=tamper == "an id the merged table holds")
    if tamper == "rows of another width":
        with open(output.part_path(emb, 1, 2), "wb") as f:
            np.save(f, np.zeros((3, 5), np.float32))
        match = r"part 1 of .*e.npy has rows of shape \(5,\), not \(3,\) as part 0"
    else:
        part = output.part_path(out, 1, 2)  # a part holding a row of another process's range, or of the merged table
        other = "old0.png" if tamper == "an id the merged table holds" else '"a0\n.png"'
        part.write_text(part.read_text().replace("b1.png", other))
        match = r"part 1 of .*s.csv holds the id .* that (part 0|.*s.csv) holds too; the parts do not come from one run"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(output.OutputError, match=match):
        output.merge_parts(out, 2, "csv", [emb], append=out.exists())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_merge_appending_to_a_table_with_a_torn_tail_keeps_table_and_arrays_aligned(tmp_path):
    out, emb, ranges = _merge_setup(tmp_path, append=True)
    with open(out, "ab") as f:
        f.write(b"old3.png,0.2")  # torn after the merged table was written (its array already holds the row)
    np.save(emb, np.concatenate([np.load(emb), np.full((1, 3), 9.0, np.float32)]))
    assert output.merge_parts(out, 2, "csv", [emb], append=True) == 7
    assert [r.id for r in output.read_results(out)] == [f"old{k}.png" for k in range(3)] + ranges[0] + ranges[1]
    np.testing.assert_array_equal(np.load(emb)[:, 0], [9] * 3 + [0] * 4 + [1] * 3)


# ------------------------------------------------------------------------------------------------ arrays on resume


def _crashed_run(tmp_path, width=4):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (width,))})
    writer.write([output.Row(f"{k}.png", 0.5) for k in range(3)], {"embedding": np.ones((3, width), np.float32)})
    writer.close(False)  # a crash: the rows stay in e.npy.partial
    return path, emb


def test_a_resume_with_rows_of_another_shape_is_refused_in_one_line(tmp_path):
    # Another model's embedding size: 3 rows of 4 values hold as many bytes as 6 rows of 2.
    path, emb = _crashed_run(tmp_path)
    before = (tmp_path / "e.npy.partial").read_bytes()
    with pytest.raises(
        output.OutputError, match=r"e.npy.partial holds float32 rows of shape \(4,\), not float32 rows "
    ):
        output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))})
    assert (tmp_path / "e.npy.partial").read_bytes() == before
    output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))}).close(True)
    np.testing.assert_array_equal(np.load(emb), np.ones((3, 4)))


def test_a_damaged_partial_header_is_one_sentence_and_an_older_headerless_partial_still_resumes(tmp_path):
    path, emb = _crashed_run(tmp_path)
    partial = tmp_path / "e.npy.partial"
    rows = partial.read_bytes()[-3 * 16 :]
    partial.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 1 +" + rows)
    with pytest.raises(output.OutputError, match=r"e.npy.partial has a damaged header; remove it and start again"):
        output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))})
    partial.write_bytes(rows + b"\x00\x00")  # written by an earlier version: rows only, the last one torn
    output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))}).close(True)
    np.testing.assert_array_equal(np.load(emb), np.ones((3, 4)))


@pytest.mark.parametrize(
    "npy, match",
    [
        (b"\x93NUMPY\x01\x00garbage", r"e.npy is not a readable .npy file \(.*\); remove it and start again"),
        (np.zeros((3, 4), np.float64), r"e.npy holds float64 rows of shape \(4,\), not float32 rows of shape \(4,\)"),
        (np.zeros((3, 2), np.float32), r"e.npy holds float32 rows of shape \(2,\), not float32 rows of shape \(4,\)"),
        (np.zeros((2, 4), np.float32), r"e.npy holds 2 rows but the table holds 3; the array file belongs to another"),
    ],
)
def test_resuming_a_finished_run_refuses_an_npy_that_does_not_fit_its_table(tmp_path, npy, match):
    path, emb = _crashed_run(tmp_path)
    output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))}).close(True)
    if isinstance(npy, bytes):
        emb.write_bytes(npy)
    else:
        np.save(emb, npy)
    before = emb.read_bytes()
    with pytest.raises(output.OutputError, match=match):
        output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (4,))})
    assert emb.read_bytes() == before and not (tmp_path / "e.npy.partial").exists()


@pytest.mark.parametrize("arrays", [True, False])
def test_a_part_with_a_torn_last_record_is_refused_not_merged_short(tmp_path, arrays):
    out, emb, _ = _merge_setup(tmp_path, append=False)
    part = output.part_path(out, 1, 2)
    part.write_bytes(part.read_bytes()[:-3])  # its last row, torn: merged, it would be lost with the part
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(output.OutputError, match=r"part 1 of .*s.csv \(.*\) ends in a torn record, so its process did"):
        output.merge_parts(out, 2, "csv", [emb] if arrays else [])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_arrays_asked_for_only_when_resuming_are_refused_saying_why(tmp_path):
    # The first run saved no embeddings: resuming with them cannot give the rows already written one.
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path)
    writer.write([output.Row("a.png", 0.5)])
    writer.close(True)
    with pytest.raises(output.OutputError, match=r"neither .*e.npy nor .*e.npy.partial exists but the table holds 1"):
        output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))})
    out, emb, _ = _merge_setup(tmp_path / "merged", append=True)
    emb.unlink()
    with pytest.raises(
        output.OutputError, match=r"e.npy does not exist but .*s.csv holds 3 rows, so their arrays were"
    ):
        output.merge_parts(out, 2, "csv", [emb], append=True)


_KILLED_REOPENING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from vitnt_jax import output
    def half(file, arrays):
        file.write(np.ascontiguousarray(arrays[0][:1]).tobytes())
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    output._copy_rows = half
    path = Path(sys.argv[1])
    output.ResultWriter(path, resume=True, arrays={"embedding": (path.with_name("e.npy"), (2,))})
    """
)


def test_a_resume_killed_while_it_reopens_the_finished_npy_resumes_again(tmp_path):
    path, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    writer = output.ResultWriter(path, arrays={"embedding": (emb, (2,))})
    writer.write([output.Row(f"{k}.png", 0.5) for k in range(3)], {"embedding": np.arange(6.0).reshape(3, 2)})
    writer.close(True)
    child = subprocess.run([sys.executable, "-c", _KILLED_REOPENING, str(path)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    resumed = output.ResultWriter(path, resume=True, arrays={"embedding": (emb, (2,))})
    resumed.write([output.Row("3.png", 0.5)], {"embedding": np.full((1, 2), 6.0)})
    resumed.close(True)
    np.testing.assert_array_equal(np.load(emb), np.concatenate([np.arange(6.0).reshape(3, 2), np.full((1, 2), 6.0)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "s.csv"]
