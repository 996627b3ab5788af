"""The pipeline as a library: Job, run, load_scorer, score_array / score_iter / score_source / score_folder,
any batch scorer, and the source and result-format registries (one entry adds a kind)."""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import assert_same_floats, faces_folder, read_csv, run

from vitnt_jax import output, pipeline, score, sources
from vitnt_jax.pipeline import InputError, Job, JobError
from vitnt_jax.sources import SourceSpec

from helpers import smooth_faces


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    """One compiled scorer for the module: loaded once, used by every test below (load once, score many)."""
    return pipeline.load_scorer(tiny_checkpoint, embeddings=True)


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


class MeanPixel:
    """A batch scorer without JAX: quality = mean pixel / 255; records the order of its calls."""

    def __init__(self):
        self.calls = []

    def padded_size(self, n):
        return -(-n // 4) * 4

    def dispatch(self, images):
        self.calls.append(("dispatch", len(self.calls)))
        return images.reshape(len(images), -1).mean(axis=1) / 255

    def fetch(self, pending):
        self.calls.append(("fetch", len(self.calls)))
        return {"quality": pending}


def test_job_validates_and_names_the_field():
    spec = SourceSpec("images", "faces")
    job = Job(spec, out="s.csv")
    assert job.out == Path("s.csv") and job.batch_size == 64 and job.on_error == "record"
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.batch_size = 3
    for changes, field, text in (
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1 (got 0)."),
        ({"alpha": float("nan")}, "alpha", "alpha must be a positive number (got nan)."),
        ({"format": "xml"}, "format", "format must be one of csv, reference, parquet (got 'xml')."),
        ({"resume": True, "overwrite": True}, "resume", "resume and overwrite exclude each other; choose one."),
        ({"micro_batch": -2}, "micro_batch", "micro_batch must be a number of images (0 = off), 'auto' or None"),
        ({"metric": "hamming"}, "metric", "metric must be one of"),
    ):
        with pytest.raises(JobError) as got:
            Job(spec, **changes)
        assert got.value.field == field and str(got.value).startswith(text)
    with pytest.raises(JobError, match="source must be a vitnt_jax.sources.SourceSpec"):
        Job("faces")


def test_every_job_field_is_a_flag_of_the_cli():
    dests = {a.dest for a in score.build_parser()._actions}
    assert set(Job.field_names()) - {"source"} <= dests
    assert set(sources.flag_names()) <= dests  # and every source kind and option


def test_score_array_is_one_compilation_for_any_count(scorer):
    images = np.stack(smooth_faces(13, seed=21))
    pipeline.score_array(scorer, images[:3], batch_size=4)
    compiled = scorer.cache_size()  # with batch 8
    got = pipeline.score_array(scorer, images, batch_size=4)  # fixed batches of 8 (8 devices), tail padded
    assert set(got) == {"quality", "embedding"} and got["quality"].shape == (13,)
    assert scorer.cache_size() == compiled  # 13 images, 3 images: the same program
    assert_same_floats(got["quality"], scorer(images)["quality"])  # other batch positions: to the ulp


def test_score_iter_takes_arrays_paths_bytes_and_pairs(scorer, folder):
    images = smooth_faces(4, seed=21)
    items = [
        images[0],
        folder / "01.png",
        ("mine", (folder / "02.png").read_bytes()),
        ("broken", b"not an image"),
        str(folder / "03.png"),
    ]
    results = list(pipeline.score_iter(scorer, items, batch_size=2, window=1))  # windows of one batch of 8
    assert [r.id for r in results] == ["0", str(folder / "01.png"), "mine", "broken", str(folder / "03.png")]
    assert results[3].quality is None and results[3].embedding is None
    assert results[3].error == "not a readable image (no PNG, JPEG or WEBP data)"
    want = pipeline.score_array(scorer, np.stack(images))
    assert_same_floats([r.quality for r in results if r.error == ""], want["quality"])
    assert results[0].embedding.shape == (8,)


def test_score_iter_streams_window_after_window_in_order(scorer):
    images = smooth_faces(19, seed=4)
    results = list(pipeline.score_iter(scorer, iter(images), batch_size=8, window=1))  # three windows of 8
    assert [r.id for r in results] == [str(k) for k in range(19)]
    assert_same_floats([r.quality for r in results], pipeline.score_array(scorer, images)["quality"])


def test_score_source_with_any_batch_scorer_double_buffers_and_writes(folder, tmp_path):
    toy = MeanPixel()
    (folder / "05.png").write_bytes(b"broken")
    summary = pipeline.score_source(toy, sources.image_folder(folder), tmp_path / "s.csv", batch_size=4, size=32)
    assert (summary.scored, summary.failed, summary.skipped) == (12, 1, 0)
    rows = read_csv(tmp_path / "s.csv")
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(13)]
    assert rows[6] == ["05.png", "", "not a readable image (no PNG, JPEG or WEBP data)"]
    faces = smooth_faces(13, seed=21)
    assert float(rows[1][1]) == pytest.approx(faces[0].mean() / 255, rel=1e-12)
    # Batch k+1 is dispatched before batch k is fetched: d0 d1 f0 d2 f1 d3 f2 f3.
    assert [kind for kind, _ in toy.calls] == ["dispatch", "dispatch", "fetch", "dispatch", "fetch", "dispatch"] + [
        "fetch",
        "fetch",
    ]
    again = pipeline.score_source(MeanPixel(), sources.image_folder(folder), tmp_path / "s.csv", size=32, resume=True)
    assert (again.scored, again.failed, again.skipped) == (0, 0, 13)


class OutOfMemory(MeanPixel):
    """A batch scorer that fails its second dispatch with `error`."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def dispatch(self, images):
        if len(self.calls) == 1:
            raise self.error
        return super().dispatch(images)


@pytest.mark.parametrize(
    "error, where",
    [
        (MemoryError("Unable to allocate 279. TiB for an array"), "the host"),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.\nmore"), "the devices"),
    ],
)
def test_running_out_of_memory_names_the_batch_size(folder, tmp_path, error, where):
    out = tmp_path / "s.csv"
    with pytest.raises(JobError) as got:
        pipeline.score_source(OutOfMemory(error), sources.image_folder(folder), out, batch_size=4, size=32)
    first = str(error).splitlines()[0]
    assert str(got.value) == f"{where} ran out of memory ({first}); lower batch_size."
    assert got.value.render(score.cli.flag).endswith("lower --batch-size.") and got.value.__cause__ is error
    assert [r[0] for r in read_csv(out)[1:]] == []  # the first batch was dispatched, never fetched: no row
    other = RuntimeError("INTERNAL: a bug")
    with pytest.raises(RuntimeError, match="INTERNAL: a bug"):
        pipeline.score_source(OutOfMemory(other), sources.image_folder(folder), None, batch_size=4, size=32)


def test_on_error_fail_keeps_the_rows_before_the_bad_input(folder, tmp_path):
    (folder / "06.png").write_bytes(b"broken")
    out = tmp_path / "s.csv"
    with pytest.raises(InputError) as got:
        pipeline.score_source(MeanPixel(), sources.image_folder(folder), out, batch_size=4, size=32, on_error="fail")
    assert got.value.id == "06.png" and got.value.reason == "not a readable image (no PNG, JPEG or WEBP data)"
    assert [r[0] for r in read_csv(out)[1:]] == [f"{i:02d}.png" for i in range(6)]


def test_run_a_job_equals_the_cli(tiny_checkpoint, folder, tmp_path):
    job = Job(SourceSpec("images", folder), out=tmp_path / "api.csv", model=str(tiny_checkpoint), batch_size=4)
    summary = pipeline.run(job)
    assert (summary.scored, summary.failed, summary.out) == (13, 0, tmp_path / "api.csv")
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "cli.csv"), "--batch-size", "4") == 0
    assert (tmp_path / "api.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()


def test_score_folder_and_errors_of_the_library_name_settings(scorer, folder, tmp_path):
    summary = pipeline.score_folder(scorer, folder, tmp_path / "s.csv")
    assert summary.scored == 13
    with pytest.raises(output.OutputError) as got:
        pipeline.score_folder(scorer, folder, tmp_path / "s.csv")
    message = str(got.value)
    assert "pass resume to continue it, overwrite to replace it" in message and "--" not in message
    with pytest.raises(sources.SourceError, match="^images .* is not a folder"):
        pipeline.score_folder(scorer, tmp_path / "none", None)


def test_plain_progress_lines_when_not_on_a_terminal(monkeypatch, capsys):
    from vitnt_jax import cli

    cli.configure_logging()  # as every command does: INFO lines as they are, on stderr
    clock = iter([0.0, 10.0, 31.0, 40.0])
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    progress = pipeline.Progress(100)  # stderr is captured: not a terminal, so no bar
    progress.update(20)  # t = 10 s: too soon for a line
    progress.update(42)  # t = 31 s: 62 images in 31 s
    progress.update(10)  # t = 40 s: 9 s after the last line
    progress.close()
    assert capsys.readouterr().err.strip().splitlines() == ["62/100 images, 2.0 images/s, ETA 19 s"]


def test_a_new_source_kind_is_one_registry_entry(monkeypatch, tmp_path, folder):
    def open_npz(path):
        arrays = np.load(path)
        names = sorted(arrays.files)
        return sources.Source(f"npz {path}", names, None, lambda i: arrays[names[i]])

    monkeypatch.setitem(sources.SOURCES, "npz", sources.SourceKind("npz", "FILE", "arrays in an .npz", open_npz))
    faces = smooth_faces(3, seed=21)
    np.savez(tmp_path / "faces.npz", **{f"f{i}": f for i, f in enumerate(faces)})
    args = score.build_parser().parse_args(["--npz", str(tmp_path / "faces.npz")])
    spec = sources.spec_from_args(args)
    summary = pipeline.score_source(MeanPixel(), spec.open(), tmp_path / "s.csv", size=32)
    assert summary.scored == 3 and [r[0] for r in read_csv(tmp_path / "s.csv")[1:]] == ["f0", "f1", "f2"]


def test_a_new_result_format_is_one_registry_entry(monkeypatch, tmp_path):
    class Tsv(output.CsvFormat):
        name, suffix, help = "tsv", ".tsv", "id<TAB>quality"

        def header(self, with_label):
            return "id\tquality\n"

        def write_rows(self, file, rows, with_label):
            for r in rows:
                file.write(f"{r.id}\t{'' if r.quality is None else repr(r.quality)}\n")

        def parse(self, text, where, with_label=None):
            lines = text.splitlines()[1:]
            return [output.Row(i, float(q) if q else None) for i, q in (line.split("\t") for line in lines)]

    monkeypatch.setitem(output.FORMATS, "tsv", Tsv())
    rows = [output.Row("a", 0.5), output.Row("b", None, error="broken")]
    output.write_results(tmp_path / "s.tsv", rows, fmt="tsv")
    assert (tmp_path / "s.tsv").read_text() == "id\tquality\na\t0.5\nb\t\n"
    assert [(r.id, r.quality) for r in output.read_results(tmp_path / "s.tsv", "tsv")] == [("a", 0.5), ("b", None)]
    writer = output.ResultWriter(tmp_path / "w.tsv", fmt="tsv")
    writer.write(rows[:1])
    writer.close(True)
    assert (tmp_path / "w.tsv").read_text() == "id\tquality\na\t0.5\n"


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_result_formats_read_what_they_write(tmp_path, fmt):
    rows = [output.Row("dir with space/a.jpg", 0.25), output.Row("b.jpg", None, error="unreadable image")]
    path = tmp_path / f"s.{fmt}"
    output.write_results(path, rows, fmt=fmt)
    back = output.read_results(path)  # the format is recognised from the content
    assert [(r.id, r.quality) for r in back] == [(r.id, r.quality) for r in rows]
    if fmt == "csv":
        assert back[1].error == "unreadable image"
    with pytest.raises(output.OutputError, match="already exists; pass overwrite"):
        output.write_results(path, rows, fmt=fmt)
    buffer = io.StringIO()
    output.FORMATS[fmt].write_rows(buffer, rows, False)
    assert output.FORMATS[fmt].parse(output.FORMATS[fmt].header(False) + buffer.getvalue(), "x")[0].quality == 0.25


def test_two_long_ids_written_alike_are_named_cut_in_the_middle():
    # Two 1 MB names that differ only where one holds an undecodable byte: the message quotes each cut.
    long = "x" * 1_000_000
    src = sources.Source("folder f", [long + "\udcff.png", long + "\\xff.png"], None, lambda i: None)
    with pytest.raises(pipeline.SourceError) as caught:
        pipeline._rendered_ids(src)
    message = str(caught.value)
    assert len(message) < 1000, len(message)
    assert message.startswith("folder f holds 'xxx") and "rename one of them." in message
    assert message.count("...") == 3 and "xxx\\udcff.png' and 'xxx" in message
    assert "xxx\\\\xff.png', which a result file writes as the same id 'xxx" in message
