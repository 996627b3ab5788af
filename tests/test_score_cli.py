"""`python -m vitnt_jax.score` end to end on temporary folders."""

import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from converters import cvlface
from vitnt_jax import checkpoint, score
from vitnt_jax.config import PRESETS
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

import torch_reference as tr

CFG = PRESETS["testing"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    torch_model = tr.randomize(tr.FaceViT(CFG), seed=3)
    torch.save({f"net.{k}": v for k, v in torch_model.state_dict().items()}, root / "model.pt")
    return cvlface.convert(root / "model.pt", root / "ckpt")


def _faces(n, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random images, so JPEG round trips stay close and scores differ between images.
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(s).resize((32, 32), Image.BILINEAR)) for s in small]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "faces"
    (root / "b" / "deep").mkdir(parents=True)
    faces = _faces(7)
    Image.fromarray(faces[0]).save(root / "z.png")
    Image.fromarray(faces[1]).save(root / "a.PNG")
    Image.fromarray(faces[2]).save(root / "b" / "c.png")
    Image.fromarray(faces[3]).save(root / "b" / "deep" / "d.png")
    Image.fromarray(faces[4]).save(root / "b" / "e.jpg", quality=95)
    Image.fromarray(faces[5]).convert("L").save(root / "grey.png")
    Image.fromarray(faces[6]).convert("RGBA").save(root / "rgba.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _expected(model_dir, paths, settings, color="rgb"):
    config, variables = checkpoint.load(model_dir)
    images = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"))
        images.append(a[..., ::-1] if color == "bgr" else a)
    return np.asarray(Scorer(config, variables, settings)(np.stack(images))["quality"])


def test_scores_every_file_once_sorted_with_errors(model_dir, folder, tmp_path):
    out = tmp_path / "scores.csv"
    assert score.main(["--images", str(folder), "--model", str(model_dir), "--out", str(out), "--batch-size", "3"]) == 0
    rows = _read(out)
    assert rows[0] == ["id", "quality", "error"]
    ids = [r[0] for r in rows[1:]]
    assert ids == sorted(ids)
    assert ids == sorted(
        ["z.png", "a.PNG", "b/c.png", "b/deep/d.png", "b/e.jpg", "grey.png", "rgba.png", "broken.jpg", "empty.png"]
    )
    by_id = {r[0]: r for r in rows[1:]}
    for bad in ("broken.jpg", "empty.png"):
        assert by_id[bad][1] == "" and by_id[bad][2]
    good = [i for i in ids if i not in ("broken.jpg", "empty.png")]
    got = np.asarray([float(by_id[i][1]) for i in good])
    assert all(by_id[i][2] == "" for i in good)
    # Default settings of the testing preset: all blocks, attention from the last, alpha 8.
    want = _expected(model_dir, [folder / i for i in good], ScoreSettings((0, 1, 2)))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.all((got > 0) & (got <= 1)) and np.ptp(got) > 1e-4


def test_batch_size_and_padding_do_not_change_scores(model_dir, folder, tmp_path):
    results = []
    for batch in ("1", "4", "64"):
        out = tmp_path / f"s{batch}.csv"
        assert (
            score.main(["--images", str(folder), "--model", str(model_dir), "--out", str(out), "--batch-size", batch])
            == 0
        )
        results.append(_read(out))
    for other in results[1:]:
        assert [r[0] for r in other] == [r[0] for r in results[0]]
        a = [float(r[1]) for r in results[0][1:] if r[1]]
        b = [float(r[1]) for r in other[1:] if r[1]]
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_flags_reach_the_scorer(model_dir, tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    faces = _faces(3, seed=4)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(root / f"{i}.png")
    out = tmp_path / "s.csv"
    argv = [
        "--images",
        str(root),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--blocks",
        "-2:",
        "--alpha",
        "3",
        "--aggregation",
        "attention",
        "--attention",
        "all",
        "--metric",
        "angular",
    ]
    assert score.main(argv) == 0
    got = [float(r[1]) for r in _read(out)[1:]]
    settings = ScoreSettings((1, 2), alpha=3.0, metric="angular", aggregation="attention", attention="all")
    want = _expected(model_dir, [root / f"{i}.png" for i in range(3)], settings)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    default = _expected(model_dir, [root / f"{i}.png" for i in range(3)], ScoreSettings((0, 1, 2)))
    assert np.abs(np.asarray(got) - default).max() > 1e-4  # the flags changed something


def test_color_bgr_swaps_channels(model_dir, tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    face = _faces(1, seed=9)[0]
    Image.fromarray(face[..., ::-1]).save(root / "swapped.png")  # a file that holds BGR
    out = tmp_path / "s.csv"
    assert score.main(["--images", str(root), "--model", str(model_dir), "--out", str(out), "--color", "bgr"]) == 0
    got = float(_read(out)[1][1])
    config, variables = checkpoint.load(model_dir)
    want = Scorer(config, variables, ScoreSettings((0, 1, 2)))(face[None])["quality"][0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_other_sizes_are_resized_with_one_warning(model_dir, tmp_path, capsys):
    root = tmp_path / "f"
    root.mkdir()
    for i, face in enumerate(_faces(3, seed=2)):
        Image.fromarray(face).resize((48, 40)).save(root / f"{i}.png")
    out = tmp_path / "s.csv"
    assert score.main(["--images", str(root), "--model", str(model_dir), "--out", str(out), "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "48x40" in err
    assert "scored 3, failed 0" in err
    assert all(r[1] for r in _read(out)[1:])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--blocks", "0-9"], "names block 9, but the model has 3 blocks"),
        (["--blocks", "1"], "at least two blocks"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--attention-kernel", "cudnn"], "runs in bfloat16 only; add --dtype bfloat16"),
        (["--attention-kernel", "cudnn", "--dtype", "bfloat16"], "needs NVIDIA GPUs; use --attention-kernel matmul"),
    ],
)
def test_bad_settings_are_one_clear_line(model_dir, folder, tmp_path, capsys, extra, message):
    out = tmp_path / "s.csv"
    assert score.main(["--images", str(folder), "--model", str(model_dir), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_missing_model_empty_folder_and_existing_output(model_dir, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert score.main(["--images", str(folder), "--model", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "does not exist; convert one" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert score.main(["--images", str(tmp_path / "empty"), "--model", str(model_dir), "--out", str(out)]) == 1
    assert "no PNG, JPEG or WEBP files" in capsys.readouterr().err
    out.write_text("keep me")
    assert score.main(["--images", str(folder), "--model", str(model_dir), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"


def test_damaged_checkpoint_is_a_clear_error(model_dir, folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "variables")
    assert score.main(["--images", str(folder), "--model", str(broken), "--out", str(tmp_path / "s.csv")]) == 1
    err = capsys.readouterr().err.strip()
    pattern = rf"error: checkpoint {re.escape(str(broken))} is damaged: its weights file variables/\S+ is missing; "
    assert re.fullmatch(pattern + "convert it again.", err), err


def test_module_entry_point_runs(model_dir, folder, tmp_path):
    out = tmp_path / "s.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitnt_jax.score",
            "--images",
            str(folder),
            "--model",
            str(model_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "scored 7, failed 2" in done.stderr
    assert len(_read(out)) == 10
