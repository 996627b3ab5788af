"""Multi-process runs in real processes (2 fake CPU devices each): parts, merge, failures, resume."""

import os
import subprocess
import sys

import numpy as np
import pytest
from pipeline_helpers import assert_same_rows, faces_folder, free_port, read_csv, run

pytestmark = pytest.mark.slow  # real processes, each starting JAX

# Two fake CPU devices per process; the other XLA flags (e.g. --xla_cpu_max_isa=AVX2) are kept.
_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
ENV = {
    **os.environ,
    "XLA_FLAGS": " ".join([*_FLAGS, "--xla_force_host_platform_device_count=2"]),
    "JAX_PLATFORMS": "cpu",
}


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


def _command(folder, ckpt, out, *extra):
    argv = [sys.executable, "-m", "vitnt_jax.score", "--images", str(folder), "--model", str(ckpt)]
    return [*argv, "--out", str(out), "--batch-size", "4", *extra]


def _multi(folder, ckpt, out, *extra):
    """Runs two processes of one job; returns [(exit status, stderr)] of process 0 and 1."""
    port = free_port()
    procs = [
        subprocess.Popen(
            _command(
                folder,
                ckpt,
                out,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--coordinator",
                f"127.0.0.1:{port}",
                *extra,
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def test_two_processes_merge_to_the_single_process_result(tiny_checkpoint, folder, tmp_path):
    single = subprocess.run(
        _command(folder, tiny_checkpoint, tmp_path / "single.csv", "--save-embeddings", str(tmp_path / "single.npy")),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    results = _multi(folder, tiny_checkpoint, tmp_path / "multi.csv", "--save-embeddings", str(tmp_path / "multi.npy"))
    assert all(rc == 0 for rc, _ in results), results
    # Process 1 scores its share from batch position 0: ids and errors exact, floats to the ulp.
    assert_same_rows(read_csv(tmp_path / "multi.csv"), read_csv(tmp_path / "single.csv"))
    np.testing.assert_allclose(np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy"), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == []


def test_a_failing_process_stops_the_merge_with_one_line(tiny_checkpoint, folder, tmp_path):
    (folder / "12.png").write_bytes(b"broken")  # in process 1's share
    out = tmp_path / "m.csv"
    (rc0, err0), (rc1, err1) = _multi(folder, tiny_checkpoint, out, "--on-error", "fail")
    assert rc1 == 1 and "12.png: not a readable image" in err1
    assert rc0 == 1 and "process 1 failed: 12.png" in err0.strip().splitlines()[-1]
    assert not out.exists()  # nothing merged; the parts are kept for --resume
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == [
        "m.csv.part00000-of-00002",
        "m.csv.part00000-of-00002.settings.json",  # each part keeps the settings it was scored with
        "m.csv.part00001-of-00002",
        "m.csv.part00001-of-00002.settings.json",
    ]


def test_resume_of_a_finished_multi_process_run_changes_nothing(tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "m.csv"
    results = _multi(folder, tiny_checkpoint, out)
    assert all(rc == 0 for rc, _ in results), results
    before = out.read_bytes()
    results = _multi(folder, tiny_checkpoint, out, "--resume")
    assert all(rc == 0 for rc, _ in results), results
    assert out.read_bytes() == before and len(read_csv(out)) == 14


def test_distributed_without_a_cluster_is_one_line(tiny_checkpoint, folder, tmp_path, capsys):
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv"), "--distributed") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --distributed found no cluster") and "\n" not in err
