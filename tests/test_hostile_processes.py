"""A multi-process run whose peer is killed (SIGKILL) or hangs (SIGSTOP): one line, a bounded wait, a resume.

Each process is started the way the command line runs a multi-process job: a supervisor
(`vitnt_jax.distributed.supervise`) with the real `python -m vitnt_jax.score` as its worker. Killing a
process kills its supervisor (and with it its worker); hanging one stops its worker.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from pipeline_helpers import faces_folder, free_port, read_csv

from vitnt_jax import distributed

pytestmark = pytest.mark.slow  # real processes, each starting JAX

_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
ENV = {
    **os.environ,
    "XLA_FLAGS": " ".join([*_FLAGS, "--xla_force_host_platform_device_count=2"]),
    "JAX_PLATFORMS": "cpu",
}
if jax.config.jax_compilation_cache_dir:  # tests/conftest.py's persistent cache: the workers compile once too
    ENV.update(
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
ENV.pop(distributed.WORKER_ENV, None)

N = 120  # inputs: enough that a process is still scoring when its part holds its first rows
TIMEOUT_S = 5  # --process-timeout of these runs
C_LOG = re.compile(r"^[IWEF]\d{4} |Check failure|\*\*\* |^\s+@\s+0x|Traceback", re.M)
RESUME = re.escape("every part is kept: rerun all processes with --resume.")
LOST = {  # the survivor's last line, by the process killed
    1: r"error: process 1 stopped answering \(killed or hung\) after \d+ s; " + RESUME,
    0: r"error: process 0 stopped answering \(killed or hung\); " + RESUME,
}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return faces_folder(tmp_path_factory.mktemp("many") / "faces", n=N)


def _start(tmp_path, ckpt, folder, out, *extra):
    port = free_port()
    flags = ["--images", str(folder), "--model", str(ckpt), "--out", str(out), "--batch-size", "4"]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "vitnt_jax.score", *flags, "--num-processes", "2", "--process-id", str(i)]
            + ["--coordinator", f"127.0.0.1:{port}", "--process-timeout", str(TIMEOUT_S), *extra],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _rows(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n") - 1  # the header
    except FileNotFoundError:
        return -1


def _when_scoring(part, procs, limit=120.0):
    """Returns once `part` holds a scored row (the process writing it is mid-run)."""
    deadline = time.monotonic() + limit
    while _rows(part) < 1:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.01)


def _worker(supervisor: int) -> int:
    """Returns the pid of the worker a supervisor started."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == supervisor:
                        return int(entry)
            except (OSError, IndexError, ValueError):
                continue
    raise AssertionError(f"process {supervisor} has no worker")


def _finish(proc, limit):
    """Returns (exit status, stderr, seconds it took) of a process that must end within `limit` seconds."""
    started = time.monotonic()
    err = proc.communicate(timeout=limit)[1]
    return proc.returncode, err, time.monotonic() - started


def _stop(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _assert_one_line(err, want):
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(want, last), err[-3000:]
    assert not C_LOG.search(err), err[-3000:]


def _assert_resume_finishes(tmp_path, ckpt, folder, out, parts_before):
    for part, rows in parts_before.items():
        assert _rows(part) >= rows - 1  # what was written is kept (the row being written when killed may go)
    procs = _start(tmp_path, ckpt, folder, out, "--resume")
    try:
        results = [_finish(p, 300)[:2] for p in procs]
    finally:
        _stop(procs)
    assert all(rc == 0 for rc, _ in results), results
    ids = [row[0] for row in read_csv(out)[1:]]
    assert sorted(ids) == sorted(f"{i:02d}.png" for i in range(N)) and len(set(ids)) == N


def _part(out, i):
    return out.with_name(f"{out.name}.part{i:05d}-of-00002")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_leaves_the_other_one_line_and_resume_finishes(tiny_checkpoint, faces, tmp_path, victim):
    out = tmp_path / "m.csv"
    procs = _start(tmp_path, tiny_checkpoint, faces, out)
    try:
        _when_scoring(_part(out, victim), procs)
        procs[victim].send_signal(signal.SIGKILL)  # its supervisor: the worker dies with it
        rc, err, took = _finish(procs[1 - victim], 60)
        parts = {_part(out, i): _rows(_part(out, i)) for i in range(2)}
    finally:
        _stop(procs)
    assert rc == 1, err[-3000:]
    # Process 0 names process 1 after its wait; process 1 loses the coordinator process 0 hosts.
    _assert_one_line(err, LOST[victim])
    assert took < TIMEOUT_S + 30  # noticed at once (a closed connection), not after JAX's 100 s heartbeat
    assert not out.exists()
    _assert_resume_finishes(tmp_path, tiny_checkpoint, faces, out, parts)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_hung_process_ends_the_others_wait_within_the_process_timeout(tiny_checkpoint, faces, tmp_path, victim):
    out = tmp_path / "m.csv"
    procs = _start(tmp_path, tiny_checkpoint, faces, out)
    try:
        _when_scoring(_part(out, victim), procs)
        os.kill(_worker(procs[victim].pid), signal.SIGSTOP)
        rc, err, took = _finish(procs[1 - victim], 120)
    finally:
        _stop(procs)  # SIGKILL reaches the stopped worker through its supervisor
    assert rc == 1, err[-3000:]
    want = (
        r"error: process 1 did not report within \d+ s; it crashed, hangs or is still scoring; "
        if victim
        else r"error: process 0 did not collect this process's status within \d+ s; it crashed, hangs, failed "
        r"before collecting or is still scoring; "
    ) + RESUME
    _assert_one_line(err, want)
    assert took < distributed.HEARTBEAT_S  # --process-timeout ended it (plus the time to finish its own part)
