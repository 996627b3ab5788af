"""The evaluation driver: quality and embedding files in, tables and figures out, matched by image id."""

import csv
import json
import pickle

import numpy as np
import pytest

from experiments import edc, evaluate, protocols
from experiments.evaluate import EvaluationError


def _pack(path, issame, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(([b"x"] * (2 * len(issame)), [bool(s) for s in issame]), f, protocol=protocol)
    return path


@pytest.fixture
def bench(tmp_path):
    """A synthetic .bin benchmark where low-quality images spoil genuine comparisons.

    300 pairs, a third genuine. Every image has a hidden quality u in [0, 1]; its embedding is its identity's
    direction plus noise that grows as u falls. An informative quality method reports u; a reversed one -u.
    """
    rng = np.random.default_rng(3)
    pairs = 300
    issame = rng.random(pairs) < 1 / 3
    path = _pack(tmp_path / "synth.bin", issame)
    width = 64
    u = rng.random(2 * pairs)
    identity = rng.normal(size=(2 * pairs, width))
    identity[1::2][issame] = identity[0::2][issame]  # genuine pairs share their identity vector
    noise = rng.normal(size=(2 * pairs, width)) * (0.2 + 3.0 * (1 - u))[:, None]
    emb = identity + noise
    np.save(tmp_path / "synth_arc.npy", emb.astype(np.float32))
    # Our score CSV for the informative method, the text format for the reversed one.
    with open(tmp_path / "good_synth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "quality", "error"])
        for i, q in enumerate(u):
            w.writerow([str(i), repr(float(q)), ""])
    (tmp_path / "bad_synth.txt").write_text(
        "".join(f"quality_data/synth/images/{i:05d}.jpg {-q:.15f}\n" for i, q in enumerate(u))
    )
    return {"dir": tmp_path, "bin": path, "u": u, "emb": emb, "issame": issame}


def _run(bench, *extra):
    d = bench["dir"]
    return evaluate.main(
        [
            "--benchmark",
            f"synth=bin:{bench['bin']}",
            "--quality",
            f"good={d}/good_{{benchmark}}.csv",
            "--quality",
            f"bad={d}/bad_{{benchmark}}.txt",
            "--embeddings",
            f"arc={d}/{{benchmark}}_arc.npy",
            "--out",
            str(d / "out"),
            *extra,
        ]
    )


def test_driver_writes_tables_and_figures_and_ranks_methods(bench):
    assert _run(bench, "--protocol", "recomputed", "--protocol", "fixed", "--fmr", "0.01") == 0
    out = bench["dir"] / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2  # methods x protocols (one FMR)
    results = json.loads((out / "results.json").read_text())["results"]
    by = {(r["method"], r["protocol"]): r for r in results}
    for protocol in ("recomputed", "fixed"):
        good, bad = by[("good", protocol)], by[("bad", protocol)]
        # Discarding the truly worst images first must beat discarding the best first.
        assert good["pauc_0.3"] < bad["pauc_0.3"]
        assert good["fnmr_at_0"] == pytest.approx(bad["fnmr_at_0"])  # nothing discarded: same errors
    for stem in ("edc_arc_recomputed_fmr0.01", "edc_arc_fixed_fmr0.01"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0


def test_driver_numbers_equal_the_edc_module_on_the_same_comparisons(bench):
    assert _run(bench, "--fmr", "0.01") == 0
    results = json.loads((bench["dir"] / "out" / "results.json").read_text())["results"]
    got = next(r for r in results if r["method"] == "good")
    p = protocols.load_bin(bench["bin"])
    comparisons = protocols.compare(p, bench["emb"], bench["u"])
    e = bench["emb"] / np.linalg.norm(bench["emb"], axis=1, keepdims=True)
    np.testing.assert_allclose(comparisons.similarity, np.sum(e[0::2] * e[1::2], axis=1), atol=1e-12)
    np.testing.assert_allclose(comparisons.pair_quality, np.minimum(bench["u"][0::2], bench["u"][1::2]))
    curve = edc.edc_curve(
        comparisons.similarity, comparisons.genuine, comparisons.pair_quality, fmr=0.01, protocol="recomputed"
    )
    np.testing.assert_allclose(got["fnmr"], curve.fnmr, atol=1e-7)
    assert got["pauc_0.25"] == pytest.approx(edc.pauc(curve.discard, curve.fnmr, 0.25), abs=1e-7)


def test_quality_formats(tmp_path):
    ours = tmp_path / "s.csv"
    ours.write_text("id,quality,error\na.jpg,0.5,\nb.jpg,,unreadable image\n")
    keys, values = evaluate.read_quality(ours)
    assert keys == ["a.jpg", "b.jpg"] and values[0] == 0.5 and np.isnan(values[1])
    text = tmp_path / "q.txt"
    text.write_text("dir with space/a.jpg 0.25\nb.jpg nan\n")
    keys, values = evaluate.read_quality(text)
    assert keys == ["dir with space/a.jpg", "b.jpg"] and values[0] == 0.25 and np.isnan(values[1])
    text.write_text("a.jpg 0.1\na.jpg 0.2\n")
    with pytest.raises(EvaluationError, match="names an image twice"):
        evaluate.read_quality(text)
    text.write_text("a.jpg high\n")
    with pytest.raises(EvaluationError, match="line 1 is not .<id> <score>."):
        evaluate.read_quality(text)


def test_embedding_ids_come_from_a_sidecar_a_csv_or_a_folder(tmp_path):
    p = protocols.load_bin(_pack(tmp_path / "b.bin", [True, False]))
    rows = np.arange(8.0).reshape(4, 2)
    np.save(tmp_path / "e.npy", rows[::-1])
    (tmp_path / "e.ids.txt").write_text("3\n2\n1\n0\n")
    np.testing.assert_array_equal(evaluate.read_embeddings(str(tmp_path / "e.npy"), p).array, rows)
    (tmp_path / "scores.csv").write_text("id,quality,error\n3,1,\n2,1,\n1,1,\n0,1,\n")
    got = evaluate.read_embeddings(f"{tmp_path / 'e.npy'}@{tmp_path / 'scores.csv'}", p)
    np.testing.assert_array_equal(got.array, rows)
    # CR-FIQA's folder layout: one <name>.npy per image, named like the extracted images (00000.npy ...).
    folder = tmp_path / "b_ArcFaceModel"
    folder.mkdir()
    for i in (0, 1, 3):  # image 2 has no file: a NaN row, never a shifted one
        np.save(folder / f"{i:05d}.npy", rows[i])
    np.save(folder / "99999.npy", rows[0])  # names no image of the benchmark: counted, ignored
    got = evaluate.read_embeddings(str(folder), p)
    np.testing.assert_array_equal(got.array[[0, 1, 3]], rows[[0, 1, 3]])
    assert np.isnan(got.array[2]).all() and got.unmatched_rows == 1
    np.save(tmp_path / "short.npy", rows[:3])
    with pytest.raises(EvaluationError, match="has 3 rows but benchmark b has 4 images"):
        evaluate.read_embeddings(str(tmp_path / "short.npy"), p)


def test_embedding_files_that_name_an_image_twice_or_are_not_arrays_are_refused(tmp_path):
    p = protocols.load_bin(_pack(tmp_path / "b.bin", [True]))
    np.save(tmp_path / "e.npy", np.ones((2, 3)))
    (tmp_path / "e.ids.txt").write_text("0\n00000\n")
    with pytest.raises(EvaluationError, match="twice"):
        evaluate.read_embeddings(str(tmp_path / "e.npy"), p)
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(EvaluationError, match="not a plain .npy array"):
        evaluate.read_embeddings(str(tmp_path / "empty.npy"), p)
    with pytest.raises(EvaluationError, match="not a text file"):
        evaluate.read_embeddings(f"{tmp_path / 'e.npy'}@{tmp_path}", p)


def test_incomplete_files_warn_and_stop_beyond_max_missing(bench, capsys):
    d = bench["dir"]
    lines = (d / "bad_synth.txt").read_text().splitlines()
    (d / "part_synth.txt").write_text("\n".join(lines[:570]) + "\n")  # 30 of 600 images without a quality
    argv = ["--quality", f"part={d}/part_{{benchmark}}.txt", "--fmr", "0.01"]
    base = ["--benchmark", f"synth=bin:{bench['bin']}", "--embeddings", f"arc={d}/{{benchmark}}_arc.npy"]
    assert evaluate.main([*base, *argv, "--out", str(d / "o1")]) == 0  # 5% is allowed by default
    assert "30 of 600 images have no value" in capsys.readouterr().err
    (d / "part_synth.txt").write_text("\n".join(lines[:300]) + "\n")
    assert evaluate.main([*base, *argv, "--out", str(d / "o2")]) == 1
    err = capsys.readouterr().err
    assert "more than --max-missing 0.05 allows" in err and "Traceback" not in err
    assert evaluate.main([*base, *argv, "--max-missing", "0.6", "--out", str(d / "o3")]) == 0
    rows = list(csv.DictReader(open(d / "o3" / "results.csv")))
    assert rows[0]["missing_quality"] == "300"


def test_results_json_is_strict_and_records_the_reached_fmr(bench):
    assert _run(bench, "--fmr", "1e-4", "--protocol", "fixed") == 0
    text = (bench["dir"] / "out" / "results.json").read_text()
    assert "NaN" not in text
    results = json.loads(text)["results"]
    # 200 impostors cannot resolve FMR 1e-4: the reached FMR is 0 (threshold above every impostor).
    assert all(r["threshold_fmr_at_0"] == 0.0 for r in results)


def test_user_errors_are_one_line(bench, capsys):
    d = bench["dir"]
    (d / "other_synth.txt").write_text("zzz/not-an-image.jpg 0.3\n")
    code = evaluate.main(
        [
            "--benchmark",
            f"synth=bin:{bench['bin']}",
            "--quality",
            f"other={d}/other_{{benchmark}}.txt",
            "--embeddings",
            f"arc={d}/{{benchmark}}_arc.npy",
            "--out",
            str(d / "o"),
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "names none of the 600 images" in errors[0] and "Traceback" not in err
    assert _run(bench, "--quality", f"good={d}/x.csv") == 1
    assert "names 'good' twice" in capsys.readouterr().err
    (d / "file").write_text("")
    assert (
        evaluate.main(
            [
                "--benchmark",
                f"synth=bin:{bench['bin']}",
                "--quality",
                "a=x",
                "--embeddings",
                "b=y",
                "--out",
                str(d / "file"),
            ]
        )
        == 1
    )
    assert "is a file; pass a folder" in capsys.readouterr().err


def test_skip_missing_skips_and_says_so(bench, capsys):
    d = bench["dir"]
    assert _run(bench, "--quality", f"absent={d}/absent_{{benchmark}}.csv", "--skip-missing", "--fmr", "0.01") == 0
    assert "skipped synth/arc/absent" in capsys.readouterr().err
    rows = list(csv.DictReader(open(d / "out" / "results.csv")))
    assert {r["method"] for r in rows} == {"good", "bad"}


def test_existing_results_are_kept_unless_overwrite(bench, capsys):
    assert _run(bench, "--fmr", "0.01") == 0
    before = (bench["dir"] / "out" / "results.json").read_bytes()
    capsys.readouterr()
    assert _run(bench, "--fmr", "0.1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "already holds results" in err and "--overwrite" in err
    assert "\n" not in err and (bench["dir"] / "out" / "results.json").read_bytes() == before
    assert _run(bench, "--fmr", "0.1", "--overwrite") == 0
    assert (bench["dir"] / "out" / "results.json").read_bytes() != before


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_packs_of_every_pickle_protocol_are_evaluated_alike(bench, protocol):
    # Python 3 writes bytes at protocol 2 through _codecs.encode: the scorer's --bin and this driver share one
    # reader, so both accept such a pack (tests/test_pipeline.py scores the same kind of pack through the CLI).
    _pack(bench["bin"], bench["issame"], protocol)
    assert _run(bench, "--fmr", "0.01") == 0
    rows = list(csv.DictReader(open(bench["dir"] / "out" / "results.csv")))
    reference = bench["dir"] / "ref"
    _pack(bench["bin"], bench["issame"])
    argv = ["--benchmark", f"synth=bin:{bench['bin']}", "--quality", f"good={bench['dir']}/good_{{benchmark}}.csv"]
    argv += ["--embeddings", f"arc={bench['dir']}/{{benchmark}}_arc.npy", "--fmr", "0.01", "--out", str(reference)]
    assert evaluate.main(argv) == 0
    want = {r["method"]: r for r in csv.DictReader(open(reference / "results.csv"))}
    for row in rows:
        if row["method"] == "good":
            assert row == want["good"]


def test_scores_written_by_the_experiments_are_read_back_by_the_same_code(tmp_path):
    from experiments import harness
    from vitnt_jax.sources import Source

    source = Source("pack", ["0", "1", "2"], ["1", "1", "0"], None)
    out = tmp_path / "serfiq.csv"
    harness.write_scores(out, source, [0.5, float("nan"), 0.25], ["", "not a readable image", ""])
    assert out.read_text().splitlines()[0] == "id,quality,label,error"
    keys, values = evaluate.read_quality(out)
    assert keys == ["0", "1", "2"] and values[0] == 0.5 and np.isnan(values[1]) and values[2] == 0.25
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        harness.write_scores(out, source, [0.1, 0.2, 0.3], ["", "", ""])
    harness.write_scores(out, source, [0.1, 0.2, 0.3], ["", "", ""], overwrite=True)
    assert evaluate.read_quality(out)[1].tolist() == [0.1, 0.2, 0.3]
