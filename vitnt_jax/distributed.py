"""Multi-process coordination: join a JAX cluster, exchange one end-of-run status per process, survive a lost one.

Built on public JAX APIs (`jax.distributed`, meshes, `jax.jit` over the processes' CPU devices).
Each process scores its own share and writes its own part; at the end every process reports
'ok' or 'failed: <reason>', and process 0 merges the parts only after all of them reported 'ok'.

The status exchange is a small collective between process 0 and each other process in turn
(a 2-device gather of a fixed-size status string, run on the CPU devices so no accelerator
collective is involved). A process that crashed or hangs never reaches that collective, so every
wait runs in a worker thread with a deadline and ends in a `DistributedError` that names the
process; a peer killed during the exchange ends it at once (its connection closes).

JAX itself ends a process with a C++ fatal log and SIGABRT when its coordination client loses the
service: process 0 (which hosts it) died or hangs, a peer stopped sending heartbeats for `HEARTBEAT_S`
seconds, or the cluster did not form within the join timeout. No setting of JAX 0.10 prevents that
inside the process (`jax_enable_recoverability` keeps process 0 alive but lets it exit before the others
have shut down, which can abort them at the end of a successful run; the client's missed-heartbeat
callback cannot be called from Python), so the command line runs each process's work as a child of
`supervise`, which turns that abort into one line naming the lost process.

    process, processes = initialize(num_processes, process_id, coordinator)
    ...                       # score this process's share
    report(process, "ok")     # or "failed: <reason>"; process k > 0 waits here for process 0
    if process == 0:
        statuses = wait_for_all(processes, timeout_s=600.0)
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import numpy as np

log = logging.getLogger(__name__)

STATUS_BYTES = 1024  # fixed size of one status message (UTF-8, zero-padded): the gather needs equal shapes
DEFAULT_TIMEOUT_S = 3600.0  # how long process k > 0 waits in `report` for process 0 to collect its status
CONNECT_TIMEOUT_S = 300  # jax.distributed.initialize: how long to wait for every process to join
HEARTBEAT_S = 100  # JAX's default: a process silent this long is declared dead and the others are aborted
TICK_S = 60.0  # how often a long wait calls `on_wait`
RESUME = "every part is kept: rerun all processes with --resume."  # how every lost-process message ends

_own_status: str | None = None


class DistributedError(Exception):
    """A process did not join, did not report in time, or the exchange itself failed."""


def initialize(
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator: str | None = None,
    auto: bool = False,
    *,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> tuple[int, int]:
    """Returns (this process's index, number of processes) after joining the cluster if one is asked for.

    Nothing given (or `num_processes` 1): a single process, (0, 1), and JAX is not touched beyond
    `jax.process_index()`. `num_processes` > 1 needs `process_id` and `coordinator` ('HOST:PORT' of
    process 0). `auto` lets JAX detect the cluster (TPU pods, SLURM, Open MPI). Joining waits at
    most `timeout_s` seconds for every process; a process that joined already is not joined again.
    """
    import jax

    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"the number of processes is {num_processes}; give 1 or more.")
    if num_processes is not None and num_processes > 1:
        if process_id is None or coordinator is None:
            raise DistributedError(
                f"{num_processes} processes need this process's id and the coordinator's address (HOST:PORT)."
            )
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process id {process_id} is outside 0..{num_processes - 1}; give one in range.")
        if jax.distributed.is_initialized():  # joined already (a second job in the same process)
            if (jax.process_index(), jax.process_count()) != (process_id, num_processes):
                raise DistributedError(
                    f"this process joined as process {jax.process_index()} of {jax.process_count()} already; "
                    f"it cannot join again as process {process_id} of {num_processes}."
                )
            return process_id, num_processes
        if process_id == 0 and _port_in_use(coordinator):  # JAX 0.10 may crash (SIGSEGV) failing to bind it
            raise DistributedError(_port_taken(coordinator))
        try:
            jax.distributed.initialize(
                coordinator,
                num_processes,
                process_id,
                initialization_timeout=max(1, int(timeout_s)),
                heartbeat_timeout_seconds=HEARTBEAT_S,
            )
        except (RuntimeError, ValueError, TypeError) as error:  # XlaRuntimeError is a RuntimeError
            if process_id == 0 and "Failed to start RPC server" in str(error):  # process 0 hosts the service
                raise DistributedError(_port_taken(coordinator)) from error
            raise DistributedError(
                f"process {process_id} could not join the {num_processes}-process cluster at {coordinator} "
                f"within {timeout_s:g} s ({_first_line(error)}); start every process with the same coordinator."
            ) from error
    elif auto and jax.distributed.is_initialized():
        pass
    elif auto:
        try:
            jax.distributed.initialize(initialization_timeout=max(1, int(timeout_s)))
        except (RuntimeError, ValueError, TypeError) as error:
            raise DistributedError(
                f"found no cluster to join ({_first_line(error)}); give the number of processes, this process's "
                "id and the coordinator's address instead."
            ) from error
    return jax.process_index(), jax.process_count()


def _port_taken(coordinator: str) -> str:
    return (
        f"process 0 could not start the coordination service at {coordinator}: its port is taken (by another "
        "program, or another run's process 0); give every process another --coordinator port."
    )


def _port_in_use(coordinator: str) -> bool:
    """Returns whether a socket already listens on the coordinator's port here (where process 0 binds it)."""
    import socket

    port = coordinator.rpartition(":")[2]
    if not port.isdigit():
        return False
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is free
                probe.bind((address, int(port)))
            return False
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            # this address family is not available here: try the next
    return False


def report(process: int, status: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Publishes this process's end-of-run status ('ok' or 'failed: <reason>'); returns once process 0 has it.

    On process 0 an 'ok' is only kept for `wait_for_all`. Any other process, and process 0 with a
    failure (so that the others are released), hands its status to process 0 and waits at most
    `timeout_s` seconds for process 0 to collect it. A single process does nothing.
    """
    import jax

    global _own_status
    _check_status(status)
    if jax.process_count() == 1:
        return
    _own_status = status
    if process == 0:
        if status != "ok":
            # Nothing will be merged: release every process that is waiting to hand over its status.
            _collect(jax.process_count(), timeout_s, None)
        return
    _exchange(process, status, time.monotonic() + timeout_s, None, what="process 0 to collect this status")


def wait_for_all(
    processes: int, timeout_s: float, on_wait: Callable[[int, float], None] | None = None
) -> dict[int, str]:
    """Returns {process: status} for every process, process 0 included, once each has reported.

    Runs on process 0 after its own `report`. Waits at most `timeout_s` seconds in all; calls
    `on_wait(process, seconds waited)` about once a minute while a process has not reported.
    Raises `DistributedError` naming the first process that did not report in time.
    """
    import jax

    if processes == 1 or jax.process_count() == 1:
        return {0: _own_status or "ok"}
    if jax.process_index() != 0:
        raise DistributedError(f"only process 0 collects the statuses; this is process {jax.process_index()}.")
    if processes != jax.process_count():
        raise DistributedError(f"{processes} processes were expected but the cluster has {jax.process_count()}.")
    return _collect(processes, timeout_s, on_wait)


def _collect(processes: int, timeout_s: float, on_wait) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    statuses = {0: _own_status or "ok"}
    for i in range(1, processes):
        statuses[i] = _exchange(i, statuses[0], deadline, on_wait, what=f"process {i} to report")
    return statuses


def _exchange(peer: int, status: str, deadline: float, on_wait, what: str) -> str:
    """Gathers (process 0's status, process `peer`'s status) on both; returns the other side's, bounded."""
    result: dict[str, object] = {}

    def gather():
        try:
            result["value"] = _gather_pair(peer, status)
        except Exception as error:  # handed to the waiting thread, which raises it there
            result["error"] = error

    worker = threading.Thread(target=gather, name=f"vitnt_jax-status-{peer}", daemon=True)
    started = time.monotonic()
    worker.start()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        worker.join(min(TICK_S, left))
        if not worker.is_alive() or time.monotonic() >= deadline:
            break
        waited = time.monotonic() - started
        if on_wait is not None:
            on_wait(peer, waited)
        else:
            log.info("waiting for %s (%.0f s)", what, waited)
    waited = time.monotonic() - started
    other = 0 if what.startswith("process 0") else peer  # the process this one waited for
    if worker.is_alive():
        if other == 0:
            raise DistributedError(
                f"process 0 did not collect this process's status within {waited:.0f} s; it crashed, hangs, "
                f"failed before collecting or is still scoring; {RESUME}"
            )
        raise DistributedError(
            f"process {peer} did not report within {waited:.0f} s; it crashed, hangs or is still scoring; {RESUME}"
        )
    if "error" in result:
        error = result["error"]
        if isinstance(error, RuntimeError):  # XlaRuntimeError: the collective lost its peer (e.g. 'Connection closed')
            raise DistributedError(
                f"process {other} stopped answering (killed or hung) after {waited:.0f} s; {RESUME}"
            ) from error
        raise error  # anything else is a bug here, not the cluster's state: shown as it is
    return result["value"]


def _gather_pair(peer: int, status: str) -> str:
    """One collective over the first CPU device of process 0 and of process `peer`: returns the other's status."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    me = jax.process_index()
    cpus = jax.devices("cpu")
    pair = [next(d for d in cpus if d.process_index == p) for p in (0, peer)]
    mesh = Mesh(np.array(pair), ("p",))
    mine = np.zeros((1, STATUS_BYTES), np.uint8)
    encoded = status.encode("utf-8")[:STATUS_BYTES]
    mine[0, : len(encoded)] = np.frombuffer(encoded, np.uint8)
    local = pair[0] if me == 0 else pair[1]
    gathered = jax.make_array_from_single_device_arrays(
        (2, STATUS_BYTES), NamedSharding(mesh, PartitionSpec("p")), [jax.device_put(mine, local)]
    )
    both = _replicate(gathered, NamedSharding(mesh, PartitionSpec()))
    row = np.asarray(both.addressable_data(0))[1 if me == 0 else 0]
    return bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")


def _identity(x):
    return x


def _replicate(x, sharding):
    import jax

    return jax.jit(_identity, out_shardings=sharding)(x)


def exit_without_shutdown(code: int) -> NoReturn:
    """Ends this process now with `code`, skipping JAX's shutdown barrier; for use after a `DistributedError`.

    Once a process is missing, JAX's at-exit shutdown would wait for it (up to 300 s) and then abort
    with its own multi-line report; the caller has already said what went wrong in one line.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said anyway
            pass
    logging.shutdown()
    os._exit(code)


def _check_status(status: str) -> None:
    if status != "ok" and not status.startswith("failed"):
        raise ValueError(f"a status is 'ok' or 'failed: <reason>', not {status!r}.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ the supervisor
# JAX's coordination client ends its process with a C++ fatal log (SIGABRT, exit 134, a stack trace) when it
# loses the coordination service: process 0 died or hangs, or the cluster never formed. Nothing inside the
# process can stop that (JAX 0.10 offers no switch, and its missed-heartbeat callback cannot be called from
# Python), so the command line runs each process's work in a child and says what happened in one line.

WORKER_ENV = "VITNT_JAX_WORKER"  # the supervisor's pid, in the environment of the child `supervise` starts
LINE_BYTES = 65536  # a longer line of the worker's stderr is passed on before its end arrives
HOLD_S = 2.0  # how long a C++ log record is held back: an abort follows its fatal record within milliseconds
_CPP_RECORD = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ \]]+:\d+\] ")  # absl/glog line prefix
_LOST_SERVICE = b"JAX distributed service detected fatal errors"  # the coordination client's fatal record


_supervisor: int | None = None  # the pid of this process's supervisor, once `is_worker` has seen it


def is_worker() -> bool:
    """Returns whether this process is the child of a `supervise` (and so does the work itself).

    The first call also makes the child die with its supervisor (Linux: the parent-death signal
    SIGKILL), and ends it at once when the supervisor is gone already; the variable is then removed
    from the environment, so the child's own children are not workers.
    """
    global _supervisor
    if _supervisor is None and os.environ.get(WORKER_ENV, "").isdigit():
        _supervisor = int(os.environ.pop(WORKER_ENV))
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: a killed supervisor leaves its worker running
            pass
        if os.getppid() != _supervisor:  # the supervisor died before the signal was armed
            os._exit(1)
    return _supervisor is not None


def supervise(
    command: list[str],
    *,
    process: int | None = None,
    processes: int | None = None,
    coordinator: str | None = None,
    debug: bool = False,
) -> int:
    """Returns the exit status of `command`, run as a child whose stderr passes through; a lost cluster is one line.

    For the command line of a multi-process run: `command` re-runs it with `WORKER_ENV` set, and the child
    calls `is_worker()` first (which also makes it die with this process, SIGKILL included). When the child
    is aborted by JAX's coordination client, its C++ fatal log (held back `HOLD_S` seconds) is replaced by one
    line naming what was lost, and the status is 1; a child ended by another signal gets one line and 128 +
    the signal. The child receives this process's SIGTERM and SIGHUP; Ctrl-C reaches it from the terminal.
    `debug`: C++ records pass through at once and are never dropped (the one line still ends the output).
    """
    import select
    import signal
    import subprocess

    # No preexec_fn: forking a process that runs JAX's threads is unsafe; the child arms its own death signal.
    child = subprocess.Popen(command, env={**os.environ, WORKER_ENV: str(os.getpid())}, stderr=subprocess.PIPE)
    forward = {s: signal.signal(s, lambda n, _: child.send_signal(n)) for s in (signal.SIGTERM, signal.SIGHUP)}
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to the child as well
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    held: list[tuple[float, bytes]] = []  # every line since the oldest C++ record not yet passed on, in order
    recent = b""  # the child's last lines, passed on or not: what an abort is told apart by

    def emit(line: bytes) -> None:
        try:
            if out is not None:
                out.write(line)
                out.flush()
            else:  # a text stream standing in for stderr (tests)
                sys.stderr.write(line.decode("utf-8", "replace"))
        except (OSError, ValueError):  # stderr closed or a broken pipe: the worker goes on, unheard
            pass

    try:
        fd, partial = child.stderr.fileno(), b""
        while True:
            wait = max(0.0, held[0][0] + HOLD_S - time.monotonic()) if held else None
            if select.select([fd], [], [], wait)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                recent = (recent + chunk)[-65536:]
                *lines, partial = (partial + chunk).split(b"\n")
                now = time.monotonic()
                for line in lines:
                    line += b"\n"
                    if held or (not debug and _CPP_RECORD.match(line)):
                        held.append((now, line))
                    else:
                        emit(line)
                if len(partial) > LINE_BYTES:  # a line without end: passed on in pieces, never held whole
                    if held:
                        held.append((now, partial))
                    else:
                        emit(partial)
                    partial = b""
            while held and held[0][0] + HOLD_S <= time.monotonic():
                emit(held.pop(0)[1])
        code = child.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, interrupt)
        if child.poll() is None:  # this process is being stopped: the child goes with it
            child.kill()
            child.wait()
    if code >= 0:
        for _, line in held:
            emit(line)
        if partial:
            emit(partial + b"\n")
        return code
    if _LOST_SERVICE in recent:
        message = _lost_service_line(recent, process, processes, coordinator)
        code = 1
    else:
        for _, line in held:  # an abort of another kind: its log is the evidence
            emit(line)
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        message = f"this process's worker ended by {name}; the rows written so far are kept: rerun all processes "
        message += "with --resume."
        code = 128 - code
    emit(f"error: {message}\n".encode())
    return code


def _lost_service_line(log: bytes, process: int | None, processes: int | None, coordinator: str | None) -> str:
    """The one line for a child that JAX's coordination client aborted, from its fatal log record."""
    if b"RegisterTask" in log:  # the cluster never formed
        where = f" at {coordinator}" if coordinator else ""
        size = f"{processes}-process " if processes else ""
        who = f"process {process}" if process is not None else "this process"
        return (
            f"{who} could not join the {size}cluster{where}: a process did not start in time or cannot reach "
            "the coordinator; start every process with the same --coordinator and --num-processes."
        )
    to_process_0 = (b"leader task", b"Failed to send RPC to coordination service", b"CoordinationService/Heartbeat")
    if process != 0 and any(text in log for text in to_process_0):  # process 0 hosts the coordination service
        return f"process 0 stopped answering (killed or hung); {RESUME}"
    silent = re.search(rb"stopped sending heartbeats\):\s*([\d,\s]*\d)", log)  # the service names them
    if silent:
        ids = [int(i) for i in re.findall(rb"\d+", silent.group(1))]
        who = "process " + ", ".join(map(str, ids)) if len(ids) == 1 else "processes " + ", ".join(map(str, ids))
        return f"{who} stopped answering (killed or hung); {RESUME}"
    return f"another process stopped answering (killed or hung); {RESUME}"
