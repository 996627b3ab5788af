"""vitnt_jax.distributed: joining, the end-of-run status exchange and its bounded waits, with real processes."""

import json
import os
import signal
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


# ------------------------------------------------------------------------------------------------ the supervisor


def _supervise(tmp_path, code: str, **where) -> tuple[int, str]:
    """Runs `distributed.supervise` in a fresh Python over a child running `code`; returns (status, stderr)."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(code))
    parent = (
        "import sys; from vitnt_jax import distributed; "
        f"sys.exit(distributed.supervise([sys.executable, {str(child)!r}], **{where!r}))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop(distributed.WORKER_ENV, None)
    done = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


C_LOG = ("F1201", "Check failure", "*** ", "    @ ", "Traceback")


def test_the_supervisor_passes_a_normal_child_through_in_order(tmp_path):
    code = """
        import os, sys
        from vitnt_jax import distributed
        assert distributed.is_worker()
        sys.stderr.write("first\\n")
        sys.stderr.write("W1201 23:04:06.702040   16349 some_file.cc:147] a C++ warning\\n")
        sys.stderr.write("its second line\\nlast\\n")
        sys.exit(3)
    """
    rc, err = _supervise(tmp_path, code)
    assert rc == 3
    assert err.splitlines() == [
        "first",
        "W1201 23:04:06.702040   16349 some_file.cc:147] a C++ warning",
        "its second line",
        "last",
    ]


def test_a_lost_coordinator_is_one_line_instead_of_the_abort(tmp_path):
    # The records JAX 0.10's coordination client writes when process 0 is gone, then its abort.
    code = """
        import os, sys
        sys.stderr.write("scoring 7 of 13 inputs\\n")
        sys.stderr.flush()
        os.write(2, b"E1201 23:04:06.702073   16349 coordination_service_agent.cc:289] Polled an error\\n"
                    b"F1201 23:04:06.702122   16349 client.h:80] Terminating process because the JAX distributed "
                    b"service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination "
                    b"service. Either the leader task was preempted/died/restarted unexpectedly\\n"
                    b"*** Check failure stack trace: ***\\n    @     0x7eff99840634  absl::LogMessage::SendToLog()\\n")
        os.abort()
    """
    rc, err = _supervise(tmp_path, code, process=1, processes=2)
    assert rc == 1
    assert err.splitlines() == [
        "scoring 7 of 13 inputs",
        "error: process 0 stopped answering (killed or hung); every part is kept: rerun all processes with --resume.",
    ]


def test_a_cluster_that_never_forms_is_one_line(tmp_path):
    port = _free_port()  # nobody listens: process 0 never started
    code = f"""
        from vitnt_jax import distributed
        distributed.initialize(2, 1, "127.0.0.1:{port}", timeout_s=1)
    """
    started = time.monotonic()
    rc, err = _supervise(tmp_path, code, process=1, processes=2, coordinator=f"127.0.0.1:{port}")
    assert rc == 1 and time.monotonic() - started < 60
    assert err.strip().splitlines()[-1] == (
        f"error: process 1 could not join the 2-process cluster at 127.0.0.1:{port}: a process did not start in "
        "time or cannot reach the coordinator; start every process with the same --coordinator and --num-processes."
    ), err
    assert not any(marker in err for marker in C_LOG), err


def test_a_worker_ended_by_a_signal_is_one_line_with_128_plus_the_signal(tmp_path):
    rc, err = _supervise(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert rc == 137
    assert err.strip() == (
        "error: this process's worker ended by SIGKILL; the rows written so far are kept: rerun all processes "
        "with --resume."
    )


def test_killing_the_supervisor_kills_its_worker(tmp_path):
    marker = tmp_path / "alive"
    child = tmp_path / "child.py"
    child.write_text(
        "import os, time\nfrom vitnt_jax import distributed\nassert distributed.is_worker()\n"
        f"open({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(distributed.WORKER_ENV, None)
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from vitnt_jax import distributed; distributed.supervise([{sys.executable!r}, {str(child)!r}])",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker = int(marker.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(worker):
            assert time.monotonic() < deadline, "the worker outlived its supervisor"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Joins with a 3 s heartbeat, then waits (a process scoring a long share).
HEARTBEAT_WORKER = """
import sys, time
from vitnt_jax import distributed
assert distributed.is_worker()
distributed.HEARTBEAT_S = 3
distributed.initialize(2, int(sys.argv[1]), f"127.0.0.1:{sys.argv[2]}", timeout_s=60)
print("joined", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("victim", [0, 1])
def test_a_peer_hung_past_the_heartbeat_is_one_line_not_jax_abort(tmp_path, victim):
    worker = tmp_path / "worker.py"
    worker.write_text(HEARTBEAT_WORKER)
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop(distributed.WORKER_ENV, None)
    supervisors = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from vitnt_jax import distributed; "
                f"sys.exit(distributed.supervise([sys.executable, {str(worker)!r}, '{i}', '{port}'], process={i}))",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for proc in supervisors:
            assert proc.stdout.readline() == "joined\n"
        hung = next(int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == supervisors[victim].pid)
        os.kill(hung, signal.SIGSTOP)
        started = time.monotonic()
        err = supervisors[1 - victim].communicate(timeout=60)[1]
        took = time.monotonic() - started
    finally:
        for proc in supervisors:
            proc.kill()  # and with it its (stopped) worker
            proc.communicate()
    assert supervisors[1 - victim].returncode == 1
    assert err.strip() == (
        f"error: process {victim} stopped answering (killed or hung); every part is kept: rerun all processes with "
        "--resume."
    ), err
    assert took < 30  # a few heartbeats


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _supervising(child, **popen):
    """Returns a started `python -c` process that supervises the script `child` (stderr piped)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(distributed.WORKER_ENV, None)
    command = (
        f"import sys; from vitnt_jax import distributed; "
        f"sys.exit(distributed.supervise([{sys.executable!r}, {str(child)!r}]))"
    )
    return subprocess.Popen([sys.executable, "-c", command], env=env, stderr=subprocess.PIPE, **popen)


def test_sigterm_to_the_supervisor_reaches_its_worker(tmp_path):
    child = tmp_path / "child.py"
    child.write_text("import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    parent = _supervising(child, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "ready\n"
        parent.send_signal(signal.SIGTERM)
        err = parent.communicate(timeout=30)[1]
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + signal.SIGTERM
    assert err.strip() == (
        "error: this process's worker ended by SIGTERM; the rows written so far are kept: rerun all processes "
        "with --resume."
    )


def test_a_long_line_without_end_is_passed_on_before_it_ends(tmp_path):
    """A worker writing on stderr without a line end (a progress bar's carriage returns) is heard as it writes,
    and the supervisor never holds more than a bounded piece of it."""
    import select

    child = tmp_path / "child.py"
    child.write_text("import sys, time\nsys.stderr.write('x' * 300000); sys.stderr.flush()\ntime.sleep(60)\n")
    parent = _supervising(child)
    got = b""
    try:
        deadline = time.monotonic() + 20
        while len(got) < 200000 and time.monotonic() < deadline:
            if select.select([parent.stderr], [], [], 1)[0]:
                got += os.read(parent.stderr.fileno(), 1 << 20)
    finally:
        parent.send_signal(signal.SIGTERM)  # reaches the child too
        try:
            parent.communicate(timeout=30)
        finally:
            if parent.poll() is None:
                parent.kill()
    assert len(got) >= 200000 and set(got) == {ord("x")}
