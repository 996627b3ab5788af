"""Hostile flag combinations and an unlucky operator: outputs aimed at the run's own input, at special files and
at each other; a tampered settings record; processes started with different flags; SIGTERM. Each is refused in
one line (or finishes cleanly), and no input or earlier row is touched."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from pipeline_helpers import faces_folder, read_csv, run

from vitnt_jax import fingerprint, output, pipeline
from vitnt_jax.output import OutputError
from vitnt_jax.pipeline import Job, JobError
from vitnt_jax.sources import SourceSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces", n=5)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------- a run never writes its input


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "{faces}/00.png", "--overwrite"],
        ["--out", "{faces}/sub/new.PNG"],  # would be scored by the next --resume
        ["--out", "{tmp}/s.csv", "--save-aligned", "{faces}", "--overwrite"],
        ["--out", "{tmp}/s.csv", "--save-aligned", "{faces}/crops"],
    ],
)
def test_an_output_inside_the_scored_folder_is_refused(tiny_checkpoint, folder, tmp_path, capsys, argv):
    before = _contents(folder)
    argv = [a.format(faces=folder, tmp=tmp_path) for a in argv]
    assert run(tiny_checkpoint, "--images", str(folder), *argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"lies in the --images folder {folder} that this run reads" in line, line
    assert _contents(folder) == before  # nothing written, removed or created in it


def test_a_table_beside_the_images_is_fine_and_never_scored(tiny_checkpoint, folder, capsys):
    out = folder / "scores.csv"
    for extra in ([], ["--resume"]):
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), *extra) == 0
    assert [r[0] for r in read_csv(out)[1:]] == [f"{i:02d}.png" for i in range(5)]


@pytest.mark.parametrize("kind", ["list", "bin"])
@pytest.mark.parametrize("onto", ["table", "record"])
def test_an_output_that_is_the_list_or_pack_read_is_refused(tiny_checkpoint, folder, tmp_path, capsys, kind, onto):
    out = tmp_path / "input"
    given = out if onto == "table" else fingerprint.settings_path(out)  # the table or its record onto the input
    given.write_text(f"{folder / '00.png'}\n")
    assert run(tiny_checkpoint, f"--{kind}", str(given), "--out", str(out), "--overwrite") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"is the --{kind} file {given} that this run reads" in line, line
    assert given.read_text() == f"{folder / '00.png'}\n"


@pytest.mark.parametrize("crops", ["s.csv", "."])
def test_results_inside_the_crops_folder_are_refused_in_plain_words(tiny_checkpoint, folder, tmp_path, capsys, crops):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out), "--save-aligned", str(tmp_path / crops)]
    assert run(tiny_checkpoint, *argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--save-aligned folder" in line and "keep results and crops apart" in line, line
    assert "another run" not in line and not out.exists()


@pytest.mark.parametrize("special", ["fifo", "device"])
def test_an_output_that_is_a_special_file_is_refused_at_once(tiny_checkpoint, folder, tmp_path, capsys, special):
    out = tmp_path / "s.csv"
    if special == "fifo":
        os.mkfifo(out)
    else:
        out = tmp_path / "null"
        os.symlink("/dev/null", tmp_path / "null")  # a device under the output's name
    for mode in ("--overwrite", "--resume"):
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), mode) == 1  # no wait on the FIFO
        line = _one_error_line(capsys.readouterr().err)
        assert ("is a named pipe (FIFO), not a file" if special == "fifo" else "is a character device") in line
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# ------------------------------------------------------------------------------------------- flag values


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("coordinator", "notaport", "must be HOST:PORT"),
        ("coordinator", "host:0", "must be HOST:PORT"),
        ("coordinator", "host:99999", "must be HOST:PORT"),
        ("coordinator", ":1234", "must be HOST:PORT"),
        ("alpha", 1e308, "must be at most 3.4e+38, the float32 range (got 1e+308)"),
        ("alpha", 3.5e38, "must be at most 3.4e+38"),
        ("process_timeout", float("inf"), "must be a positive number of seconds"),
    ],
)
def test_flag_values_that_cannot_work_are_refused_when_the_job_is_made(folder, field, value, text):
    multi = {"num_processes": 2, "process_id": 1, "coordinator": "127.0.0.1:1"}
    with pytest.raises(JobError, match=re.escape(text)) as caught:
        Job(SourceSpec("images", folder), **{**multi, field: value})
    assert caught.value.field == field


def test_a_coordinator_that_is_not_host_port_is_one_line_in_the_worker(folder, tmp_path, monkeypatch, capsys):
    from vitnt_jax import distributed, score

    monkeypatch.setattr(distributed, "is_worker", lambda: True)  # the supervised child's own path
    argv = ["--images", str(folder), "--out", str(tmp_path / "s.csv"), "--num-processes", "2", "--process-id", "1"]
    assert score.main([*argv, "--coordinator", "notaport"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "error: --coordinator must be HOST:PORT, a port from 1 to 65535 (got 'notaport')."


# -------------------------------------------------------------------------------------- the settings record


def _record_text(out, text):
    fingerprint.settings_path(out).write_text(text)


@pytest.mark.parametrize(
    "planted, said",
    [
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        (json.dumps({"format": fingerprint.FORMAT, "pad": "x" * (2 << 20), "settings": {}}), "larger than 1024 KiB"),
        (json.dumps({"format": fingerprint.FORMAT, "version": 2, "settings": {}}), "format version 2"),
        (json.dumps({"format": fingerprint.FORMAT, "version": "1", "settings": {}}), "format version 1,"),
        ("fifo", "not a regular file"),
    ],
)
def test_a_tampered_record_is_one_sentence(tmp_path, planted, said):
    out = tmp_path / "s.csv"
    if planted == "fifo":
        os.mkfifo(fingerprint.settings_path(out))
    else:
        _record_text(out, planted)
    with pytest.raises(OutputError, match=said) as caught:
        fingerprint.read(out)  # never waits on the FIFO, never recurses out of the interpreter
    assert "--overwrite" in caught.value.render(lambda n: "--" + n)


def test_a_newer_record_is_refused_through_the_cli(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv) == 0
    record = json.loads(fingerprint.settings_path(out).read_text())
    record["version"] = 7
    _record_text(out, json.dumps(record))
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    assert "format version 7" in _one_error_line(capsys.readouterr().err)


def test_an_overwrite_stopped_before_its_first_row_resumes_with_the_new_settings(
    tiny_checkpoint, folder, tmp_path, capsys
):
    """A replaced result holding its header only still has the old record: nothing can be mixed, so resuming it
    with the new settings goes on (and records them)."""
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv, "--alpha", "4") == 0
    out.write_text("id,quality,error\n")  # what an --overwrite killed right after truncating leaves
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert capsys.readouterr().err.count("error") == 0
    assert len(read_csv(out)) == 6
    assert fingerprint.read(out)["alpha"] == 8.0
    # A result holding rows still refuses the change.
    assert run(tiny_checkpoint, *argv, "--resume", "--alpha", "4") == 1
    assert "--alpha 8 -> 4" in _one_error_line(capsys.readouterr().err)


# -------------------------------------------------------------------------- processes with different flags


def _as_process(monkeypatch, process, statuses=None):
    from vitnt_jax import distributed

    monkeypatch.setattr(pipeline, "_initialize", lambda job: (process, 2))
    monkeypatch.setattr(distributed, "report", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "wait_for_all", lambda *a, **k: statuses or {0: "ok", 1: "ok"})


def test_parts_scored_with_other_settings_are_never_merged(tiny_checkpoint, folder, tmp_path, monkeypatch):
    out = tmp_path / "s.csv"
    spec = SourceSpec("images", folder)
    _as_process(monkeypatch, 1)
    pipeline.run(Job(spec, out=out, model=str(tiny_checkpoint), alpha=4.0, blocks="0-1"))
    _as_process(monkeypatch, 0)
    with pytest.raises(JobError) as caught:
        pipeline.run(Job(spec, out=out, model=str(tiny_checkpoint)))
    line = caught.value.render(lambda n: "--" + n.replace("_", "-"))
    assert line.startswith(
        "process 1 scored its part with other settings than process 0 (differing: --blocks, --alpha); nothing was "
        "merged"
    ), line
    assert not out.exists()  # no merged table
    assert len(read_csv(output.part_path(out, 1, 2))) == 4 and len(read_csv(output.part_path(out, 0, 2))) == 3
    # Rerun as the message says: every process with the same flags and --overwrite; then they merge.
    _as_process(monkeypatch, 1)
    pipeline.run(Job(spec, out=out, model=str(tiny_checkpoint), overwrite=True))
    _as_process(monkeypatch, 0)
    pipeline.run(Job(spec, out=out, model=str(tiny_checkpoint), overwrite=True))
    assert [r[0] for r in read_csv(out)[1:]] == [f"{i:02d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == []  # parts and their records gone


def test_parts_read_from_other_sources_are_never_merged(tiny_checkpoint, folder, tmp_path, monkeypatch):
    """Process 1 given another folder (one more image: the shares no longer tile one list) stops the merge."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    shutil.copy(folder / "00.png", other / "05.png")
    out = tmp_path / "s.csv"
    _as_process(monkeypatch, 1)
    pipeline.run(Job(SourceSpec("images", other), out=out, model=str(tiny_checkpoint)))
    _as_process(monkeypatch, 0)
    with pytest.raises(JobError) as caught:
        pipeline.run(Job(SourceSpec("images", folder), out=out, model=str(tiny_checkpoint)))
    assert "(differing: the inputs (another source)); nothing was merged" in str(caught.value)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_to_a_single_process_run_is_one_line_and_keeps_the_rows(tiny_checkpoint, tmp_path):
    """A batch scheduler's SIGTERM stops a run as Ctrl-C does: one line, status 143, rows kept, resume finishes."""
    folder = faces_folder(tmp_path / "faces", n=40)
    out = tmp_path / "s.csv"
    hook = tmp_path / "slow.py"
    # The run, slowed down after its first batch so that the signal lands mid-run.
    hook.write_text(
        "import sys, time\n"
        "from vitnt_jax import pipeline, score\n"
        "real, calls = pipeline._rows, []\n"
        "def slow(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:  # the first batch is written\n"
        "        print('batch', flush=True)\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "pipeline._rows = slow\n"
        "sys.exit(score.main(sys.argv[1:]))\n"
    )
    argv = ["--images", str(folder), "--model", str(tiny_checkpoint), "--out", str(out), "--batch-size", "8"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, str(hook), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"batch\n"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - started < 30
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted; the rows written so far are kept: rerun with --resume to continue {out}"
    ), err
    assert "Traceback" not in err
    kept = len(read_csv(out)) - 1
    assert 8 <= kept < 40
    assert run(tiny_checkpoint, *argv[:2], "--out", str(out), "--batch-size", "8", "--resume") == 0
    assert [r[0] for r in read_csv(out)[1:]] == [f"{i:02d}.png" for i in range(40)]


def test_a_coordinator_port_in_use_is_one_line_naming_it(tiny_checkpoint, folder, tmp_path):
    """Process 0 of a second run on a port already taken (by another run's process 0, or any program)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--images", str(folder), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.csv")]
        argv += ["--num-processes", "2", "--process-id", "0", "--coordinator", f"127.0.0.1:{port}"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
        done = subprocess.run(
            [sys.executable, "-m", "vitnt_jax.score", *argv, "--process-timeout", "20"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: process 0 could not start the coordination service at 127.0.0.1:{port}: its port is taken (by "
        "another program, or another run's process 0); give every process another --coordinator port."
    ), done.stderr
