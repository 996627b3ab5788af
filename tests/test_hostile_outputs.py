"""Hostile and unlucky outputs: a second writer, odd file names, torn records, a full disk."""

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
