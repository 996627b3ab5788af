"""Chunked runs (vitnt_jax.chunked): pieces committed as whole chunks, resumed by piece, merged into one result."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import assert_same_floats, assert_same_rows, faces_folder, read_csv, run

from vitnt_jax import chunked, output
from vitnt_jax.pipeline import Job, JobError
from vitnt_jax.sources import SourceSpec

from helpers import smooth_faces

pytest_plugins = ["storage_fixtures"]  # S3 and GCS servers on 127.0.0.1: storage_env, s3_bucket, gcs_bucket


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


@pytest.fixture()
def single(tiny_checkpoint, folder, tmp_path):
    """The single-file run of `folder` (csv, embeddings and patch maps) that chunked runs must equal."""
    out = tmp_path / "single"
    out.mkdir()
    argv = ["--images", str(folder), "--out", str(out / "s.csv"), "--batch-size", "8"]
    arrays = ["--save-embeddings", str(out / "e.npy"), "--save-patch-quality", str(out / "p.npy")]
    assert run(tiny_checkpoint, *argv, *arrays) == 0
    return out


def _chunk_names(out):
    return sorted(os.listdir(chunked.chunks_dir(out)))


def test_a_chunked_run_writes_what_a_single_file_run_writes(tiny_checkpoint, folder, single, tmp_path):
    out, emb, patch = tmp_path / "c.csv", tmp_path / "c.npy", tmp_path / "p.npy"
    argv = ["--images", str(folder), "--out", str(out), "--chunk-rows", "8", "--batch-size", "8"]
    assert run(tiny_checkpoint, *argv, "--save-embeddings", str(emb), "--save-patch-quality", str(patch)) == 0
    # Pieces of 8 start batches where the single run's batches of 8 start: the same bytes, not only close floats.
    assert out.read_bytes() == (single / "s.csv").read_bytes()
    assert_same_floats(np.load(emb), np.load(single / "e.npy"))
    assert_same_floats(np.load(patch), np.load(single / "p.npy"))
    # The chunks are gone once merged; the plan and the merge record stay for a --resume to find.
    assert _chunk_names(out) == ["merged.json", "plan.json"]
    assert json.loads((tmp_path / "c.csv.chunks" / "merged.json").read_text()) == {"rows": 13}


def test_a_resumed_run_scores_only_the_pieces_not_committed(tiny_checkpoint, folder, single, tmp_path, caplog):
    good = (folder / "10.png").read_bytes()
    (folder / "10.png").write_bytes(b"broken")  # in piece 1 (inputs 8..12)
    out = tmp_path / "c.csv"
    argv = ["--images", str(folder), "--out", str(out), "--chunk-rows", "8", "--batch-size", "8"]
    assert run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    assert _chunk_names(out) == ["00000000-r8.csv", "plan.json"]  # piece 0 committed, nothing of piece 1
    (folder / "10.png").write_bytes(good)
    caplog.set_level("INFO", "vitnt_jax")
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert "scoring 1 of 2 pieces (5 inputs)" in caplog.text and "skipping 8 rows already committed" in caplog.text
    # (The single run also computed embeddings: another compiled program, so floats agree to the ulp only.)
    assert_same_rows(read_csv(out), read_csv(single / "s.csv"))
    merged = out.read_bytes()
    caplog.clear()
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert "complete already" in caplog.text
    assert out.read_bytes() == merged


def test_a_bad_input_is_a_row_of_its_piece(tiny_checkpoint, folder, tmp_path):
    (folder / "05.png").write_bytes(b"broken")
    out = tmp_path / "c.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--chunk-rows", "4") == 0
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(13)]
    assert rows[6][1] == "" and "not a readable image" in rows[6][2]


@pytest.mark.parametrize(
    "change, named",
    [(["--alpha", "4"], "--alpha 8.0 -> 4.0"), (["--chunk-rows", "5"], "piece rows 4 -> 5")],
)
def test_a_resume_with_other_settings_is_refused_in_one_line(tiny_checkpoint, folder, tmp_path, capsys, change, named):
    (folder / "05.png").write_bytes(b"broken")
    out = tmp_path / "c.csv"
    argv = ["--images", str(folder), "--out", str(out), "--chunk-rows", "4"]
    assert run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume", *change) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--overwrite" in err, err
    assert _chunk_names(out) == ["00000000-r4.csv", "plan.json"]  # nothing was touched


def test_the_source_changing_under_a_resume_is_refused(tiny_checkpoint, folder, tmp_path, capsys):
    (folder / "05.png").write_bytes(b"broken")
    out = tmp_path / "c.csv"
    argv = ["--images", str(folder), "--out", str(out), "--chunk-rows", "4"]
    assert run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    Image.fromarray(smooth_faces(1, seed=3)[0]).save(folder / "00a.png")  # every later input moves by one
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    err = capsys.readouterr().err
    assert "another source (inputs 13 inputs in pieces of 4" in err and "-> 14 inputs in pieces of 4" in err


def test_a_fresh_run_over_committed_pieces_is_refused_and_overwrite_replaces_them(tiny_checkpoint, folder, tmp_path):
    (folder / "05.png").write_bytes(b"broken")
    out = tmp_path / "c.csv"
    argv = ["--images", str(folder), "--out", str(out), "--chunk-rows", "4"]
    assert run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    assert run(tiny_checkpoint, *argv) == 1
    assert _chunk_names(out) == ["00000000-r4.csv", "plan.json"]
    assert run(tiny_checkpoint, *argv, "--overwrite", "--chunk-rows", "6") == 0
    assert len(read_csv(out)) == 14 and _chunk_names(out) == ["merged.json", "plan.json"]
    assert json.loads((tmp_path / "c.csv.chunks" / "plan.json").read_text())["settings"]["piece_rows"] == 6
    assert run(tiny_checkpoint, *argv) == 1  # a finished chunked result is not replaced without --overwrite


def test_a_file_url_and_the_parquet_format(tiny_checkpoint, folder, single, tmp_path):
    url = f"file://{tmp_path}/u.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", url, "--chunk-rows", "8", "--batch-size", "8") == 0
    assert_same_rows(read_csv(tmp_path / "u.csv"), read_csv(single / "s.csv"))
    table = tmp_path / "t.parquet"
    argv = ["--images", str(folder), "--out", str(table), "--format", "parquet", "--chunk-rows", "8"]
    assert run(tiny_checkpoint, *argv, "--batch-size", "8") == 0
    want, got = output.read_results(tmp_path / "u.csv"), output.read_results(table, "parquet")
    assert got == want  # the same program as the file:// run: the same floats


def test_chunked_jobs_refuse_what_they_cannot_write(folder, tmp_path):
    spec = SourceSpec("images", folder)
    with pytest.raises(JobError, match="save_aligned is not written by chunked runs"):
        Job(spec, out=tmp_path / "c.csv", chunk_rows=4, save_aligned=tmp_path / "crops")
    with pytest.raises(JobError, match="chunk_rows must be at least 1"):
        Job(spec, out=tmp_path / "c.csv", chunk_rows=0)
    job = Job(spec, out="s3://bucket/run/scores.csv", save_embeddings="s3://bucket/run/e.npy")
    assert job.out == "s3://bucket/run/scores.csv" and job.chunked
    assert not Job(spec, out=tmp_path / "c.csv").chunked


def _killed_then_resumed(tiny_checkpoint, tmp_path, out_arg, chunks_folder, env=None):
    """Starts a chunked run of 40 faces, kills it (SIGKILL) once 3 pieces are committed, then resumes it."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i, face in enumerate(smooth_faces(40, seed=5)):
        Image.fromarray(face).save(folder / f"{i:02d}.png")
    base = [sys.executable, "-m", "vitnt_jax.score", "--images", str(folder), "--model", str(tiny_checkpoint)]
    argv = [*base, "--out", out_arg, "--chunk-rows", "2", "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len([n for n in chunks_folder() if n.endswith(".csv")]) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1].decode()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    committed = sorted(n for n in chunks_folder() if n.endswith(".csv"))
    assert 3 <= len(committed) < 20
    resumed = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping {2 * len(committed)} rows already committed" in resumed.stderr
    single = subprocess.run(
        [*base, "--out", str(tmp_path / "single.csv"), "--batch-size", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    return read_csv(tmp_path / "single.csv")


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_without_losing_or_repeating_a_row(tiny_checkpoint, tmp_path):
    out = tmp_path / "k.csv"
    want = _killed_then_resumed(tiny_checkpoint, tmp_path, str(out), lambda: _listed(chunked.chunks_dir(out)))
    got = read_csv(out)
    assert [r[0] for r in got] == [r[0] for r in want]  # every id once, in source order
    assert_same_rows(got, want)


def _listed(folder):
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


# Two fake CPU devices per process; the other XLA flags (e.g. --xla_cpu_max_isa=AVX2) are kept.
_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
MULTI_ENV = {
    **os.environ,
    "XLA_FLAGS": " ".join([*_FLAGS, "--xla_force_host_platform_device_count=2"]),
    "JAX_PLATFORMS": "cpu",
}


def faces_rec(path, n=23, seed=7):
    """Writes an insightface-layout RecordIO of n JPEG faces (labels i % 4) at `path`; returns the JPEG bytes."""
    import io

    from recordio_writer import write_rec

    jpegs = []
    for face in smooth_faces(n, seed=seed):
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    write_rec(path, [(i % 4, j) for i, j in enumerate(jpegs)], header="insightface")
    return jpegs


def run_processes(argv, count, workdirs, env, timeout=300):
    """Runs `count` processes of one job, process i in workdirs[i]; returns [(exit status, stderr)]."""
    from pipeline_helpers import free_port

    port = free_port()
    procs = [
        subprocess.Popen(
            [*argv, "--num-processes", str(count), "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"],
            cwd=workdirs[i],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]


def _upload(local, url):
    import fsspec

    with open(local, "rb") as f, fsspec.open(url, "wb") as g:
        g.write(f.read())


def _fetch(url) -> bytes:
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # this test's own listings are not the bucket's state now
    return fs.cat_file(inner)


def _listing(url):
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return [p.rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)]
    except FileNotFoundError:
        return []


def test_a_recordio_on_s3_scored_into_s3_equals_the_local_run(tiny_checkpoint, tmp_path, s3_bucket):
    rec = tmp_path / "train.rec"
    faces_rec(rec)
    for suffix in (".rec", ".idx"):
        _upload(rec.with_suffix(suffix), f"{s3_bucket}/sets/train{suffix}")
    argv = ["--chunk-rows", "4", "--batch-size", "8"]
    assert run(tiny_checkpoint, "--rec", str(rec), "--out", str(tmp_path / "l.csv"), *argv) == 0
    url = f"{s3_bucket}/run/scores.csv"
    assert run(tiny_checkpoint, "--rec", f"{s3_bucket}/sets/train.rec", "--out", url, *argv) == 0
    assert _fetch(url) == (tmp_path / "l.csv").read_bytes()
    assert sorted(_listing(f"{s3_bucket}/run/scores.csv.chunks")) == ["merged.json", "plan.json"]


def test_a_folder_on_gcs_scored_into_gcs_as_parquet(tiny_checkpoint, folder, tmp_path, gcs_bucket):
    for image in sorted(folder.iterdir()):
        _upload(image, f"{gcs_bucket}/faces/{image.name}")
    argv = ["--chunk-rows", "8", "--batch-size", "8", "--format", "parquet"]
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "l.parquet"), *argv) == 0
    url = f"{gcs_bucket}/run/scores.parquet"
    assert run(tiny_checkpoint, "--images", f"{gcs_bucket}/faces", "--out", url, *argv) == 0
    (tmp_path / "g.parquet").write_bytes(_fetch(url))
    assert output.read_results(tmp_path / "g.parquet") == output.read_results(tmp_path / "l.parquet")


@pytest.mark.slow
def test_a_run_into_s3_killed_mid_way_resumes_without_losing_or_repeating_a_row(
    tiny_checkpoint, tmp_path, s3_bucket, storage_env
):
    url = f"{s3_bucket}/run/k.csv"
    want = _killed_then_resumed(
        tiny_checkpoint, tmp_path, url, lambda: _listing(chunked.chunks_dir(url)), env=storage_env.variables
    )
    (tmp_path / "k.csv").write_bytes(_fetch(url))
    got = read_csv(tmp_path / "k.csv")
    assert [r[0] for r in got] == [r[0] for r in want]
    assert_same_rows(got, want)


@pytest.mark.slow
def test_hosts_sharing_only_a_bucket_survive_a_killed_host_and_resume_to_the_single_result_byte_for_byte(
    tiny_checkpoint, tmp_path, s3_bucket, storage_env
):
    rec = tmp_path / "train.rec"
    faces_rec(rec, n=40)
    for suffix in (".rec", ".idx"):
        _upload(rec.with_suffix(suffix), f"{s3_bucket}/sets/train{suffix}")
    env = {**MULTI_ENV, **storage_env.variables}
    base = [sys.executable, "-m", "vitnt_jax.score", "--model", str(tiny_checkpoint), "--chunk-rows", "2"]
    base += ["--batch-size", "2", "--workers", "1"]
    single = subprocess.run(
        [*base, "--rec", str(rec), "--out", str(tmp_path / "single.csv"), "--save-embeddings", str(tmp_path / "e.npy")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr.decode()
    workdirs = [tmp_path / "host0", tmp_path / "host1"]
    for w in workdirs:
        w.mkdir()
    url = f"{s3_bucket}/run/scores.csv"
    argv = [*base, "--rec", f"{s3_bucket}/sets/train.rec", "--out", url, "--process-timeout", "60"]
    argv += ["--save-embeddings", f"{s3_bucket}/run/e.npy"]  # relative paths would land in each host's folder
    from pipeline_helpers import free_port

    port = free_port()
    procs = [
        subprocess.Popen(
            [*argv, "--num-processes", "2", "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"],
            cwd=workdirs[i],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # the process and the worker its supervisor starts die together, as a host would
        )
        for i in range(2)
    ]
    # Process 1 (pieces 10..19) dies by SIGKILL once it has committed two of its pieces.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and procs[1].poll() is None:
        names = _listing(chunked.chunks_dir(url))
        if len([n for n in names if n.endswith(".csv") and int(n[:8]) >= 10]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    assert procs[0].wait(timeout=120) != 0  # process 0 reports the lost process and merges nothing
    procs[1].wait(timeout=30)
    assert "scores.csv" not in _listing(f"{s3_bucket}/run")
    results = run_processes([*argv, "--resume"], 2, workdirs, env)
    assert all(rc == 0 for rc, _ in results), results
    assert "merged 20 pieces (40 rows)" in results[0][1], results[0][1]
    # Every piece starts a batch, so which process scored it (and when) changes no byte of the result.
    assert _fetch(url) == (tmp_path / "single.csv").read_bytes()
    (tmp_path / "multi.npy").write_bytes(_fetch(f"{s3_bucket}/run/e.npy"))
    assert_same_floats(np.load(tmp_path / "multi.npy"), np.load(tmp_path / "e.npy"))
    assert all(os.listdir(w) == [] for w in workdirs)  # nothing written where the processes ran
    assert sorted(_listing(chunked.chunks_dir(url))) == ["merged.json", "plan.json"]
