"""Whole runs against a second process, settings drift, NaN scores, planted links and hostile names: each is
refused in one line or becomes an error row, and the first run's rows are never touched."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import faces_folder, read_csv, run

from vitnt_jax import output, pipeline, sources
from vitnt_jax.pipeline import InputError, Job
from vitnt_jax.sources import SourceSpec

from helpers import smooth_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces", n=5)


def _record(out):
    """Returns the path of the settings record of the result `out`."""
    return out.with_name(out.name + ".settings.json")


def _score_command(ckpt, folder, out, *extra):
    argv = ["--images", str(folder), "--model", str(ckpt), "--out", str(out), *extra]
    return [sys.executable, "-m", "vitnt_jax.score", *argv]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------- the lock


def test_second_writers_are_refused_while_a_run_writes(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """While a run writes, a resumed and an overwriting run of the same --out (real processes) are refused in
    one line, and the first run's table and embeddings come out whole (one row per input, none twice)."""
    folder = faces_folder(tmp_path / "faces", n=13)
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    seconds = {}
    real_load = pipeline.load_scorer

    class Interrupting:
        """The real scorer; on its first fetch, while the run holds its outputs, two other runs start."""

        def __init__(self, scorer):
            self.scorer, self.config = scorer, scorer.config

        def __getattr__(self, name):
            return getattr(self.scorer, name)

        def fetch(self, pending):
            if not seconds:
                for mode in ("--resume", "--overwrite"):
                    command = _score_command(tiny_checkpoint, folder, out, mode, "--save-embeddings", str(emb))
                    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
                    seconds[mode] = (done.returncode, done.stderr)
            return self.scorer.fetch(pending)

    monkeypatch.setattr(pipeline, "load_scorer", lambda *a, **k: Interrupting(real_load(*a, **k)))
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--save-embeddings", str(emb)) == 0
    for mode, (status, err) in seconds.items():
        assert status == 1, (mode, err)
        assert "is being written by another run" in _one_error_line(err) and "--out" in err, err
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(13)] and all(r[1] for r in rows[1:])
    assert np.load(emb).shape == (13, 8)


def test_a_held_lock_refuses_every_kind_of_run_before_anything_else(tiny_checkpoint, folder, tmp_path, capsys):
    """Another process holds the lock of --out (or of the embeddings file, or of the crops folder): a fresh run,
    a --resume and an --overwrite are each refused in one line, before even a bad model is looked at, and the
    files stay as they were."""
    out, emb, crops = tmp_path / "s.csv", tmp_path / "e.npy", tmp_path / "crops"
    outputs = ["--out", str(out), "--save-embeddings", str(emb), "--save-aligned", str(crops)]
    assert run(tiny_checkpoint, "--images", str(folder), *outputs) == 0
    before = out.read_bytes(), emb.read_bytes(), sorted(p.name for p in crops.iterdir())
    capsys.readouterr()
    for held, flag in ((out, "--out"), (emb, "--save-embeddings"), (crops, "--save-aligned")):
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                    import sys
                    from vitnt_jax.output import lock_output
                    with lock_output({str(held)!r}):
                        print("locked", flush=True)
                        sys.stdin.read()
                """),
            ],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "locked"
            for extra in ([], ["--resume"], ["--overwrite"], ["--overwrite", "--model", "no_such_model"]):
                model = [] if "--model" in extra else ["--model", str(tiny_checkpoint)]
                assert pipeline_main(["--images", str(folder), *outputs, *extra, *model]) == 1
                line = _one_error_line(capsys.readouterr().err)
                assert line.startswith(f"error: {flag} {held} is being written by another run"), line
                assert (out.read_bytes(), emb.read_bytes(), sorted(p.name for p in crops.iterdir())) == before
        finally:
            holder.communicate("", timeout=30)


def pipeline_main(argv):
    from vitnt_jax import score

    return score.main(argv)


def test_process_0_keeps_the_lock_of_the_merged_file_through_the_merge(tiny_checkpoint, folder, tmp_path, monkeypatch):
    from vitnt_jax import distributed

    out = tmp_path / "s.csv"
    seen = []

    def merge(job, processes, settings):
        for path in (job.out, job.save_embeddings, output.part_path(job.out, 0, 2)):
            with pytest.raises(output.OutputError, match="is being written by another run"):
                output.lock_output(path)
            seen.append(path)

    monkeypatch.setattr(pipeline, "_initialize", lambda job: (0, 2))
    monkeypatch.setattr(distributed, "report", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "_wait_and_merge", merge)
    job = Job(SourceSpec("images", folder), out=out, model=str(tiny_checkpoint), save_embeddings=tmp_path / "e.npy")
    summary = pipeline.run(job)
    assert summary.scored == 2 and len(seen) == 3  # process 0 of 2 scores inputs 0..1 of 5
    with output.lock_output(out):  # released once the run is over
        pass


# -------------------------------------------------------------------------------------- the settings record


def _resume_after_new_images(ckpt, folder, tmp_path, extra, capsys):
    out = tmp_path / "s.csv"
    assert run(ckpt, "--images", str(folder), "--out", str(out)) == 0
    before = out.read_bytes()
    Image.fromarray(smooth_faces(1, seed=5)[0]).save(folder / "99.png")
    capsys.readouterr()
    status = run(ckpt, "--images", str(folder), "--out", str(out), "--resume", *extra)
    return out, before, status, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--blocks", "0,1"], "--blocks 0-2 -> 0-1"),
        (["--alpha", "4"], "--alpha 8 -> 4"),
        (["--metric", "cosine"], "--metric euclidean -> cosine"),
        (["--aggregation", "mean"], "--aggregation attention -> mean"),
        (["--attention", "all"], "--attention last -> all"),
        (["--color", "bgr"], "--color rgb -> bgr"),
        (["--align", "center"], "--align none -> center"),
        (["--dtype", "bfloat16"], "--dtype float32 -> bfloat16"),
        (["--precision", "default"], "--precision highest -> default"),
    ],
)
def test_resume_with_other_scoring_settings_is_refused(tiny_checkpoint, folder, tmp_path, capsys, extra, named):
    out, before, status, err = _resume_after_new_images(tiny_checkpoint, folder, tmp_path, extra, capsys)
    assert status == 1
    line = _one_error_line(err)
    assert f"{out} was scored with other settings ({named})" in line, line
    assert "--overwrite" in line and "new --out" in line
    assert out.read_bytes() == before


def test_resume_with_other_weights_is_refused_naming_both(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert pipeline_main([*argv, "--resume", "--model", "testing"]) == 1  # the random-weight model
    line = _one_error_line(capsys.readouterr().err)
    assert f"--model checkpoint {tiny_checkpoint} (from model.pt, sha256 " in line and "(random weights" in line
    assert out.read_bytes() == before
    # The same file converted again elsewhere holds the same weights (in files Orbax names anew): no difference.
    from converters import cvlface

    again = cvlface.convert(tiny_checkpoint.parent / "model.pt", tmp_path / "again")
    assert sorted(os.listdir(again / "variables")) and run(again, *argv, "--resume") == 0


def test_several_differences_are_named_together_and_mean_ignores_attention(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out), "--aggregation", "mean"]
    assert run(tiny_checkpoint, *argv) == 0
    assert run(tiny_checkpoint, *argv, "--resume", "--attention", "all") == 0  # mean aggregation reads no attention
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume", "--alpha", "2", "--blocks", "1,2") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "(--blocks 0-2 -> 1-2; --alpha 8 -> 2)" in line


def test_speed_settings_may_change_on_resume(tiny_checkpoint, tmp_path):
    folder = faces_folder(tmp_path / "faces", n=13)
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv, "--batch-size", "8") == 0
    rows = read_csv(out)
    out.write_text("".join(",".join(r) + "\n" for r in rows[:6]))  # an interrupted run: 5 rows written
    record = _record(out).read_text()
    speed = ["--batch-size", "16", "--micro-batch", "0", "--workers", "1", "--parallel", "pmap"]
    assert run(tiny_checkpoint, *argv, "--resume", *speed, "--attention-kernel", "xla") == 0
    again = read_csv(out)
    assert [r[0] for r in again] == [r[0] for r in rows]
    assert _record(out).read_text() == record  # none of them is recorded


def test_the_record_is_written_with_the_result_and_an_old_result_resumes_with_a_warning(
    tiny_checkpoint, folder, tmp_path, capsys
):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv) == 0
    record = json.loads(_record(out).read_text())
    assert record["format"] == "vitnt-jax-settings" and record["settings"]["blocks"] == [0, 1, 2]
    assert not {"batch_size", "workers", "micro_batch", "parallel", "attention_kernel"} & set(record["settings"])
    _record(out).unlink()  # as a result written before settings were recorded
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume", "--alpha", "3") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: {out} records no scoring settings (written by an older version): resuming it as if its rows "
        "were scored with this run's settings"
    ]
    assert json.loads(_record(out).read_text())["settings"]["alpha"] == 3.0
    # --overwrite replaces the rows, and the record with them.
    assert run(tiny_checkpoint, *argv, "--overwrite", "--alpha", "5") == 0
    assert json.loads(_record(out).read_text())["settings"]["alpha"] == 5.0


def test_a_damaged_record_is_one_line(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv) == 0
    _record(out).write_text("{not json")
    capsys.readouterr()
    assert run(tiny_checkpoint, *argv, "--resume") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "records the settings of --out" in line and "--overwrite" in line


# ------------------------------------------------------------------------------------------ non-finite scores


class Poisoned:
    """A batch scorer without JAX: quality = mean pixel / 255, except NaN for rows `nan` and inf for `inf`."""

    def __init__(self, nan=(), inf=(), embedding=()):
        self.nan, self.inf, self.embedding, self.seen = set(nan), set(inf), set(embedding), 0

    def padded_size(self, n):
        return -(-n // 4) * 4

    def dispatch(self, images):
        q = images.reshape(len(images), -1).mean(axis=1) / 255
        e = np.ones((len(images), 8), np.float32)
        for row in range(len(images)):
            k = self.seen + row
            q[row] = np.nan if k in self.nan else np.inf if k in self.inf else q[row]
            e[row, 3] = np.nan if k in self.embedding else 1.0
        self.seen += len(images)
        return q, e

    def fetch(self, pending):
        return {"quality": pending[0], "embedding": pending[1]}


def test_non_finite_scores_are_error_rows(folder, tmp_path):
    source = sources.image_folder(folder)
    out = tmp_path / "s.csv"
    toy = Poisoned(nan={1}, inf={4}, embedding={2})
    writer = output.ResultWriter(out, arrays={"embedding": (tmp_path / "e.npy", (8,))})
    summary = pipeline.score_source(toy, source, writer, batch_size=4, size=32)
    writer.close(True)
    assert (summary.scored, summary.failed) == (2, 3)
    rows = read_csv(out)
    assert [bool(r[1]) for r in rows[1:]] == [True, False, False, True, False]
    assert rows[2][2].startswith("non-finite score; the model gave nan as quality")
    assert rows[3][2].startswith("non-finite score; the model gave nan or inf as embedding")
    assert rows[5][2].startswith("non-finite score; the model gave inf as quality")
    emb = np.load(tmp_path / "e.npy")
    assert np.isnan(emb[[1, 2, 4]]).all() and np.isfinite(emb[[0, 3]]).all()
    results = list(pipeline.score_iter(Poisoned(nan={0}), [np.zeros((32, 32, 3), np.uint8)] * 2, batch_size=4, size=32))
    assert results[0].quality is None and results[0].error.startswith("non-finite score")
    assert results[1].quality is not None and results[1].error == ""


def test_a_non_finite_score_stops_an_on_error_fail_run_after_the_rows_before_it(tmp_path):
    out = tmp_path / "s.csv"
    source = sources.image_folder(faces_folder(tmp_path / "more", n=9))
    with pytest.raises(InputError) as stop:
        pipeline.score_source(Poisoned(nan={6}), source, out, batch_size=4, size=32, on_error="fail")
    assert stop.value.id == "06.png" and stop.value.reason.startswith("non-finite score")
    assert [r[0] for r in read_csv(out)[1:]] == [f"{i:02d}.png" for i in range(6)]


def test_a_model_giving_nan_is_an_error_row_through_the_cli(tiny_checkpoint, folder, tmp_path, monkeypatch, capsys):
    real_load = pipeline.load_scorer

    class NanForSecond:
        def __init__(self, scorer):
            self.scorer, self.config = scorer, scorer.config

        def __getattr__(self, name):
            return getattr(self.scorer, name)

        def fetch(self, pending):
            got = dict(self.scorer.fetch(pending))
            got["quality"] = np.array(got["quality"], np.float32)
            got["quality"][1] = np.nan
            return got

    monkeypatch.setattr(pipeline, "load_scorer", lambda *a, **k: NanForSecond(real_load(*a, **k)))
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
    rows = read_csv(out)
    assert rows[2][:2] == ["01.png", ""] and rows[2][2].startswith("non-finite score")
    assert "scored 4, failed 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- links in output folders


def test_a_link_in_the_crops_folder_is_replaced_never_followed(tiny_checkpoint, folder, tmp_path):
    out, crops = tmp_path / "s.csv", tmp_path / "crops"
    argv = ["--images", str(folder), "--out", str(out), "--save-aligned", str(crops)]
    assert run(tiny_checkpoint, *argv) == 0
    victims = []
    for name in ("00000000_00.png", "00000005_99.png"):  # an existing crop, and the crop a resume will write
        victim = tmp_path / f"victim_{name}"
        victim.write_bytes(b"precious")
        (crops / name).unlink(missing_ok=True)
        (crops / name).symlink_to(victim)
        victims.append(victim)
    assert run(tiny_checkpoint, *argv, "--overwrite") == 0
    Image.fromarray(smooth_faces(1, seed=5)[0]).save(folder / "99.png")
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert [v.read_bytes() for v in victims] == [b"precious", b"precious"]
    for name in ("00000000_00.png", "00000005_99.png"):
        assert not (crops / name).is_symlink() and Image.open(crops / name).size == (32, 32)
    assert sorted(p.name for p in crops.iterdir()) == sorted(f"{i:08d}_{i:02d}.png" for i in range(5)) + [
        "00000005_99.png"
    ]  # no temporary file left behind


@pytest.mark.parametrize(
    "flag, name", [("--out", "s.csv"), ("--save-embeddings", "e.npy"), ("--save-embeddings", "e.npy.partial")]
)
def test_output_paths_that_are_links_are_refused(tiny_checkpoint, folder, tmp_path, capsys, flag, name):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / name
    link.symlink_to(victim)
    argv = ["--images", str(folder), "--overwrite", "--out", str(tmp_path / "s.csv")]
    assert run(tiny_checkpoint, *argv, "--save-embeddings", str(tmp_path / "e.npy")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {link} is a symbolic link (to {victim})"), line
    assert victim.read_bytes() == b"precious"


# --------------------------------------------------------------------------------------- what is checked first


def test_the_model_is_checked_before_the_source_is_opened(tiny_checkpoint, folder, tmp_path, monkeypatch, capsys):
    done = tmp_path / "done.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(done)) == 0

    def never(self):
        raise AssertionError("the source was opened before the model was checked")

    monkeypatch.setattr(SourceSpec, "open", never)
    capsys.readouterr()
    new = ["--out", str(tmp_path / "new.csv")]
    for argv, message in (
        ([*new, "--model", "no_such_model"], "--model 'no_such_model' is neither a converted checkpoint folder"),
        ([*new, "--model", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        ([*new, "--model", str(tiny_checkpoint), "--blocks", "7"], "7"),
        ([*new, "--model", "no_such_model", "--align", "none", "--mtcnn-weights", "w.npz"], "only applies to --align"),
        (["--out", str(done), "--model", str(tiny_checkpoint), "--resume", "--alpha", "3"], "with other settings"),
    ):
        assert pipeline_main(["--images", str(folder), *argv]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert message in line, line


def test_the_first_line_names_the_weights(tiny_checkpoint, folder, tmp_path, capsys):
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv")) == 0
    digest = hashlib.sha256((tiny_checkpoint.parent / "model.pt").read_bytes()).hexdigest()
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"model testing: checkpoint {tiny_checkpoint} (from model.pt, sha256 {digest})"


# ------------------------------------------------------------------------------------------------- hostile ids


def test_hostile_file_names_finish_and_resume(tiny_checkpoint, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    names = [b"bad_\xff.png", b"cr\r.png", b"=cmd.png", b"+sum.png", b"plain.png"]
    for name, face in zip(names, smooth_faces(len(names), seed=3), strict=True):
        path = os.path.join(os.fsencode(folder), name)
        with open(path, "wb") as f:
            Image.fromarray(face).save(f, format="PNG")
    out = tmp_path / "s.csv"
    argv = ["--images", str(folder), "--out", str(out)]
    assert run(tiny_checkpoint, *argv) == 0
    want = sorted(output.render_id(os.fsdecode(n)) for n in names)
    rows = output.read_results(out)
    assert sorted(r.id for r in rows) == want and all(r.quality is not None for r in rows)
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    again = output.read_results(out)
    assert [r.id for r in again] == [r.id for r in rows]
    out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    # A run stopped after its first two rows resumes to one row per name, none twice.
    output.write_results(out, rows[:2], overwrite=True)
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert [r.id for r in output.read_results(out)] == [r.id for r in rows]


def test_ids_written_alike_are_refused(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    for name, face in zip((b"bad_\xff.png", b"bad_\\xff.png"), smooth_faces(2, seed=3), strict=True):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            Image.fromarray(face).save(f, format="PNG")
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "which a result file writes as the same id 'bad_\\\\xff.png'; rename one of them." in line, line
    assert not out.exists() or len(read_csv(out)) == 1
