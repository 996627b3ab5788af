"""The ablation sweep and the baseline CLI: same numbers as the library's own scorer and CLI."""

import csv
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from experiments import ablations
from vitnt_jax import checkpoint, score

from helpers import smooth_faces, write_pack_with_a_bad_image


@pytest.fixture(scope="module")
def faces():
    return smooth_faces(6, size=32, seed=5)


@pytest.fixture
def pack(tmp_path, faces):
    return write_pack_with_a_bad_image(tmp_path / "tiny.bin", faces)


def _read(path):
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_ablation_variants_equal_the_scoring_cli(tiny_checkpoint, tmp_path, faces):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(faces):
        Image.fromarray(f).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"nope")
    out = tmp_path / "abl"
    code = ablations.main(
        [
            "--images",
            str(folder),
            "--model",
            str(tiny_checkpoint),
            "--depths",
            "2,3",
            "--alphas",
            "4,8",
            "--metrics",
            "euclidean,cosine",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    names = {p.stem for p in out.glob("*.csv")}
    # Every variant's CSV holds its column of the one table the pass wrote, row for row.
    listed = [v["name"] for v in json.loads((out / "variants.json").read_text())]
    table = np.load(out / "qualities.npy")
    assert table.shape == (7, len(listed)) and set(listed) == names
    for j, name in enumerate(listed):
        rows = list(_read(out / f"{name}.csv").values())
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        for i, r in enumerate(rows):
            assert (r["quality"] == "") == bool(r["error"]) == bool(np.isnan(table[i, j]))
            if r["quality"]:
                assert float(r["quality"]) == float(table[i, j])
    # One factor at a time around blocks 3 (testing preset: all), alpha 8, attention-last, euclidean.
    assert names == {
        "blocks3_alpha8_attention-last_euclidean",
        "blocks2_alpha8_attention-last_euclidean",
        "blocks3_alpha4_attention-last_euclidean",
        "blocks3_alpha8_mean_euclidean",
        "blocks3_alpha8_attention-all_euclidean",
        "blocks3_alpha8_attention-last_cosine",
    }
    # Two variants through the CLI (each CLI run compiles anew): the depth cut and the all-block attention,
    # the two that read different states; alpha, metric and mean act on the same states (test_stability).
    for name, flags in (
        ("blocks2_alpha8_attention-last_euclidean", ["--blocks", "0-1"]),
        ("blocks3_alpha8_attention-all_euclidean", ["--attention", "all"]),
    ):
        ref = tmp_path / f"{name}.csv"
        argv = ["--images", str(folder), "--model", str(tiny_checkpoint), "--out", str(ref), *flags]
        assert score.main(argv) == 0
        want, got = _read(ref), _read(out / f"{name}.csv")
        assert set(want) == set(got) and len(got) == 7
        for key, row in want.items():
            if row["error"]:
                assert got[key]["error"] and got[key]["quality"] == ""
            else:
                assert float(got[key]["quality"]) == pytest.approx(float(row["quality"]), abs=2e-6)


def test_ablation_sweeps_differ_and_full_grid_crosses_factors():
    base = ablations.Variant(3, 8.0, "attention-last", "euclidean")
    full = ablations.variants([2, 3], [4.0, 8.0], ["mean"], ["l1", "cosine"], base=base, grid="full")
    assert len(full) == 8 and len(set(full)) == 8
    single = ablations.variants([2, 3], [4.0, 8.0], ["mean"], ["l1", "cosine"], base=base)
    assert len(single) == 1 + 1 + 1 + 1 + 2  # base, depth 2, alpha 4, mean, l1, cosine


def test_ablation_bad_flags_are_one_line(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "i"
    folder.mkdir()
    Image.fromarray(smooth_faces(1)[0]).save(folder / "a.png")
    base = ["--images", str(folder), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    assert ablations.main([*base, "--depths", "1,9"]) == 1
    assert "--depths [1, 9] must lie between 2 and the model's 3 blocks" in capsys.readouterr().err
    assert ablations.main([*base, "--metrics", "hamming"]) == 1
    assert "unknown metric 'hamming'" in capsys.readouterr().err


def test_baseline_cli_writes_every_row_with_the_library_values(tiny_checkpoint, tmp_path, faces):
    import jax

    from experiments import baselines

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(faces[:3]):
        Image.fromarray(f).save(folder / f"{i}.png")
    (folder / "3_broken.png").write_bytes(b"nope")
    config, variables = checkpoint.load(tiny_checkpoint)
    for method in ("serfiq", "embedding_norm"):
        out = tmp_path / f"{method}.csv"
        argv = [method, "--images", str(folder), "--model", str(tiny_checkpoint), "--out", str(out)]
        assert baselines.main([*argv, "--passes", "4", "--seed", "7", "--batch-size", "2"]) == 0
        rows = _read(out)
        assert list(rows) == ["0.png", "1.png", "2.png", "3_broken.png"]
        assert rows["3_broken.png"]["quality"] == "" and rows["3_broken.png"]["error"]
        stack = np.stack(faces[:3])
        if method == "serfiq":  # an image's dropout key is fold_in(seed, CRC-32 of its pixels), whatever the batching
            seeds = [zlib.crc32(face.tobytes()) for face in faces[:3]]
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(7), s))(
                np.array(seeds, np.uint32).view(np.int32)
            )
            want = baselines.serfiq(variables, config, stack, keys, passes=4)
        else:
            want = baselines.embedding_norm(variables, config, stack)
        got = [float(rows[f"{i}.png"]["quality"]) for i in range(3)]
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_baseline_and_ablation_outputs_are_replaced_only_with_overwrite(tiny_checkpoint, tmp_path, capsys):
    from experiments import baselines

    folder = tmp_path / "i"
    folder.mkdir()
    Image.fromarray(smooth_faces(1)[0]).save(folder / "a.png")
    source = ["--images", str(folder), "--model", str(tiny_checkpoint)]
    out = tmp_path / "b.csv"
    out.write_text("keep me\n")
    assert baselines.main(["embedding_norm", *source, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert out.read_text() == "keep me\n"
    assert baselines.main(["embedding_norm", *source, "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("id,quality,error\n")
    folder_out = tmp_path / "abl"
    sweep = [*source, "--depths", "2", "--alphas", "8", "--aggregations", "mean", "--metrics", "l1"]
    assert ablations.main([*sweep, "--out", str(folder_out)]) == 0
    before = {p.name: p.read_bytes() for p in folder_out.iterdir()}
    assert ablations.main([*sweep, "--out", str(folder_out)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder_out.iterdir()} == before
    assert ablations.main([*sweep, "--out", str(folder_out), "--overwrite"]) == 0


@pytest.mark.parametrize("module", ["experiments.baselines", "experiments.ablations"])
def test_help_and_flag_errors_answer_without_jax(module):
    code = (
        "import sys\n"
        f"from {module} import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'jax' in sys.modules)\n"
    )
    for argv, status in ((["--help"], 0), (["--batch", "3"], 2)):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert done.stdout.splitlines()[-1] == f"exit {status} False", (argv, done.stdout, done.stderr)
        if status == 2:
            assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")


@pytest.mark.parametrize("module", ["reference_parity", "zoo_parity", "benchmark", "baseline_timing"])
def test_figure_scripts_keep_an_existing_out_without_overwrite(module, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    out = tmp_path / "figures.json"
    out.write_text("{}\n")
    argv = ["--out", str(out)] + (["--reference", str(tmp_path)] if module == "reference_parity" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert out.read_text() == "{}\n"


def test_reference_parity_names_a_missing_clone_in_one_line(tmp_path, capsys):
    from experiments import reference_parity

    assert reference_parity.main(["--reference", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backbones/vit/vit.py not found; pass --reference" in err
