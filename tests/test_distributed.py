"""vitnt_jax.distributed: joining, the end-of-run status exchange and its bounded waits, with real processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vitnt_jax import distributed

REPO = Path(__file__).resolve().parents[1]

# One worker per process: join, then act out `mode` ('failed', 'crash' or 'silent') as the last process,
# or as process 0 ('silent0': never collects); the others report 'ok'. Prints one JSON line: the
# statuses, or the error.
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from vitnt_jax import distributed

    pid, port, mode, timeout, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    process, processes = distributed.initialize(count, pid, f"127.0.0.1:{port}", timeout_s=60)
    assert distributed.initialize(count, pid, f"127.0.0.1:{port}") == (process, processes) == (pid, count)  # once
    waits = []
    try:
        if process > 0:
            last = process == processes - 1
            if mode == "crash" and last:
                os._exit(3)
            if mode == "silent" and last:
                time.sleep(120)
            distributed.report(process, "failed: 12.png: not a readable image" if mode == "failed" and last else "ok",
                               timeout_s=timeout)
            print(json.dumps({"reported": True}), flush=True)
        else:
            if mode == "silent0":
                time.sleep(120)
            distributed.report(0, "ok")
            statuses = distributed.wait_for_all(processes, timeout, on_wait=lambda i, s: waits.append(i))
            print(json.dumps({"statuses": statuses, "waits": waits}), flush=True)
    except distributed.DistributedError as error:
        print(json.dumps({"error": str(error), "waits": waits}), flush=True)
        distributed.exit_without_shutdown(1)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, mode: str, timeout: float, count: int = 2) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, mode, str(timeout), str(count)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


def _result(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, err[-2000:]
    return proc.returncode, json.loads(lines[-1])


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_single_process_needs_no_cluster():
    assert distributed.initialize(None, None, None) == (0, 1)
    assert distributed.initialize(1, 0, None) == (0, 1)
    distributed.report(0, "ok")  # nothing to publish to
    assert distributed.wait_for_all(1, timeout_s=0.1) == {0: "ok"}


@pytest.mark.parametrize(
    "args, message",
    [
        ((2, None, "127.0.0.1:1"), "2 processes need this process's id and the coordinator's address"),
        ((2, 2, "127.0.0.1:1"), "process id 2 is outside 0..1"),
        ((0, 0, None), "the number of processes is 0"),
    ],
)
def test_an_incomplete_cluster_description_is_one_sentence(args, message):
    with pytest.raises(distributed.DistributedError, match=message) as caught:
        distributed.initialize(*args)
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


def test_a_status_is_ok_or_a_failure():
    with pytest.raises(ValueError, match="'ok' or 'failed: <reason>'"):
        distributed.report(0, "done")


def test_process_0_receives_every_status(tmp_path):
    # Three processes: each exchange involves process 0 and one other, never the third.
    procs = _start(tmp_path, "failed", timeout=60, count=3)
    try:
        (rc0, out0), *others = [_result(p) for p in procs]
    finally:
        _stop(procs)
    assert others == [(0, {"reported": True})] * 2
    want = {"0": "ok", "1": "ok", "2": "failed: 12.png: not a readable image"}
    assert rc0 == 0 and out0 == {"statuses": want, "waits": []}


def test_a_crashed_process_ends_the_wait_with_one_sentence_naming_it(tmp_path):
    procs = _start(tmp_path, "crash", timeout=3)
    started = time.monotonic()
    try:
        rc0, out0 = _result(procs[0])
        elapsed = time.monotonic() - started
    finally:
        _stop(procs)
    assert procs[1].returncode == 3
    assert rc0 == 1 and out0["error"].startswith("process 1 did not report within 3 s"), out0
    assert "\n" not in out0["error"]
    assert elapsed < distributed.HEARTBEAT_S  # our deadline ended it, not JAX's heartbeat or shutdown barrier


def test_a_process_waiting_for_process_0_gives_up_in_time(tmp_path):
    procs = _start(tmp_path, "silent0", timeout=3)
    try:
        rc1, out1 = _result(procs[1])
    finally:
        _stop(procs)
    assert rc1 == 1 and out1["error"].startswith("process 0 did not collect this process's status within 3 s"), out1
