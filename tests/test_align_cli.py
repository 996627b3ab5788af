"""`--align mtcnn` through `python -m vitnt_jax.score`: rows, errors, saved crops, resume, TFDS LFW."""

import csv
import importlib.metadata

import numpy as np
import pytest
from PIL import Image

from converters import mtcnn as converter
from vitnt_jax import checkpoint, mtcnn, score
from vitnt_jax.align import align
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

import torch_mtcnn as tm

pytestmark = pytest.mark.skipif(tm.facenet_data() is None, reason="facenet-pytorch (data only) is not installed")
SETTINGS = ScoreSettings((0, 1, 2))  # the testing preset's defaults


def _photo(package, path):
    try:
        return np.asarray(Image.open(importlib.metadata.distribution(package).locate_file(path)).convert("RGB"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return converter.convert(tm.facenet_data(), tmp_path_factory.mktemp("mtcnn") / "mtcnn.npz")


@pytest.fixture(scope="module")
def detector(weights):
    return mtcnn.Detector.load(weights)


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "people").mkdir(parents=True)
    astronaut = _photo("scikit-image", "skimage/data/astronaut.png")
    Image.fromarray(astronaut[:400, 50:450]).save(root / "astronaut.png")
    group = _photo("insightface", "insightface/data/images/t1.jpg")[::2, ::2]  # 8 faces, 640x443
    Image.fromarray(group).save(root / "people" / "group.jpg")
    Image.fromarray(np.full((150, 120, 3), 128, np.uint8)).save(root / "grey.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(root / "noise.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _run(ckpt, *argv):
    return score.main([*argv, "--model", str(ckpt)])


def _expected_crops(detector, root, ids, size=32):
    crops = {}
    for i in ids:
        image = np.asarray(Image.open(root / i).convert("RGB"))
        faces = detector.detect(image)
        pick = mtcnn.select_face(faces, *image.shape[:2])
        crops[i] = align(image, faces.landmarks[pick], size)
    return crops


def test_mtcnn_rows_errors_and_scores(tiny_checkpoint, weights, detector, photos, tmp_path):
    out, crops = tmp_path / "s.csv", tmp_path / "crops"
    argv = ["--images", str(photos), "--out", str(out), "--align", "mtcnn", "--mtcnn-weights", str(weights)]
    assert _run(tiny_checkpoint, *argv, "--batch-size", "2", "--save-aligned", str(crops)) == 0
    rows = _read(out)
    assert rows[0] == ["id", "quality", "error"]
    by_id = {r[0]: r for r in rows[1:]}
    names = ["astronaut.png", "people/group.jpg", "grey.png", "noise.png", "broken.jpg"]
    assert [r[0] for r in rows[1:]] == sorted(names)
    assert by_id["grey.png"][1:] == ["", "no face found"] and by_id["noise.png"][1:] == ["", "no face found"]
    assert by_id["broken.jpg"][1] == "" and by_id["broken.jpg"][2] not in ("", "no face found")
    # Faces are scored on the crops that detection + alignment give directly (the group photo: one face).
    want = _expected_crops(detector, photos, ["astronaut.png", "people/group.jpg"])
    config, variables = checkpoint.load(tiny_checkpoint)
    quality = Scorer(config, variables, SETTINGS)(np.stack(list(want.values())))["quality"]
    got = [float(by_id[i][1]) for i in want]
    np.testing.assert_allclose(got, quality, atol=1e-6, rtol=0)
    # Saved crops: one PNG per scored row, named <source index>_<safe id>.png, holding the model input.
    assert sorted(p.name for p in crops.iterdir()) == ["00000000_astronaut.png", "00000004_people_group.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(crops / "00000000_astronaut.png")), want["astronaut.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(crops / "00000004_people_group.png")), want["people/group.jpg"])
    # Existing crops are never replaced silently: a second run into the same folder needs --overwrite.
    again = [*argv[:3], str(tmp_path / "t.csv"), *argv[4:], "--save-aligned", str(crops)]
    assert _run(tiny_checkpoint, *again) == 1


def test_bgr_sources_are_swapped_before_detection(tiny_checkpoint, weights, photos, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    rgb = np.asarray(Image.open(photos / "astronaut.png"))
    Image.fromarray(rgb[..., ::-1].copy()).save(swapped / "astronaut.png")
    common = ["--align", "mtcnn", "--mtcnn-weights", str(weights)]
    assert _run(tiny_checkpoint, "--images", str(photos), "--out", str(tmp_path / "a.csv"), *common) == 0
    b_out = str(tmp_path / "b.csv")
    assert _run(tiny_checkpoint, "--images", str(swapped), "--out", b_out, "--color", "bgr", *common) == 0
    a = {r[0]: r[1] for r in _read(tmp_path / "a.csv")[1:]}
    b = {r[0]: r[1] for r in _read(tmp_path / "b.csv")[1:]}
    assert b["astronaut.png"] != "" and float(b["astronaut.png"]) == pytest.approx(float(a["astronaut.png"]), abs=1e-6)


def test_resume_with_mtcnn_neither_loses_nor_duplicates_rows(tiny_checkpoint, weights, photos, tmp_path):
    out = tmp_path / "s.csv"
    argv = ["--images", str(photos), "--out", str(out), "--align", "mtcnn", "--mtcnn-weights", str(weights)]
    assert _run(tiny_checkpoint, *argv, "--batch-size", "2") == 0
    full = _read(out)
    with open(out, "w", newline="") as f:  # as if interrupted after two rows
        csv.writer(f, lineterminator="\n").writerows(full[:3])
    assert _run(tiny_checkpoint, *argv, "--batch-size", "2", "--resume") == 0
    assert _read(out) == full


def test_tfds_lfw_defaults_to_mtcnn_and_converts_weights_once(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lfw.csv"
    with tfds.testing.mock_data(num_examples=5):
        assert _run(tiny_checkpoint, "--tfds", "lfw", "--out", str(out), "--batch-size", "3") == 0
    err = capsys.readouterr().err
    assert "align mtcnn" in err and "converting facenet-pytorch's MTCNN weights" in err
    assert (tmp_path / "cache" / mtcnn.WEIGHTS_NAME).is_file()
    rows = _read(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert [r[0] for r in rows[1:]] == [f"lfw/train/{i}" for i in range(5)]
    for r in rows[1:]:  # mock images are noise: each row has a score or says why not
        assert (r[1] != "" and r[3] == "") or (r[1] == "" and r[3] == "no face found")
    with tfds.testing.mock_data(num_examples=5):  # the cached conversion is reused
        assert _run(tiny_checkpoint, "--tfds", "lfw", "--out", str(tmp_path / "again.csv")) == 0
    assert "converting" not in capsys.readouterr().err


def test_missing_facenet_is_one_sentence(tiny_checkpoint, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(mtcnn, "installed_facenet_weights", lambda: None)
    assert _run(tiny_checkpoint, "--images", str(photos), "--out", str(tmp_path / "s.csv"), "--align", "mtcnn") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --align mtcnn needs MTCNN weights") and "\n" not in err
    assert "pip install --no-deps facenet-pytorch==2.6.0" in err and "--mtcnn-weights" in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--align", "mtcnn", "--mtcnn-weights", "absent.npz"], "MTCNN weights absent.npz do not exist"),
        (["--mtcnn-weights", "w.npz"], "--mtcnn-weights only applies to --align mtcnn"),
        (["--align", "center", "--min-face-size", "40"], "--min-face-size only applies to --align mtcnn"),
        (["--align", "mtcnn", "--min-face-size", "0"], "--min-face-size must be at least 12 pixels"),
    ],
)
def test_align_flag_errors_are_one_sentence(tiny_checkpoint, photos, tmp_path, capsys, argv, message):
    assert _run(tiny_checkpoint, "--images", str(photos), "--out", str(tmp_path / "s.csv"), *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "s.csv").exists()


def test_unknown_align_is_one_line(tiny_checkpoint, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _run(tiny_checkpoint, "--images", str(photos), "--out", str(tmp_path / "s.csv"), "--align", "sideways")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --align: invalid choice: 'sideways'") and "\n" not in err


def test_save_aligned_onto_a_file_is_one_sentence(tiny_checkpoint, weights, photos, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    argv = ["--images", str(photos), "--out", str(tmp_path / "s.csv"), "--save-aligned", str(tmp_path / "taken")]
    assert _run(tiny_checkpoint, *argv, "--align", "mtcnn", "--mtcnn-weights", str(weights)) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --save-aligned {tmp_path / 'taken'} is a file; give a folder path."


def test_crop_names_are_safe_and_unique():
    assert score.crop_name(3, "b/deep/d.png") == "00000003_b_deep_d.png"
    assert score.crop_name(12, "../../etc/passwd") == "00000012_etc_passwd.png"
    assert score.crop_name(5, "lfw/train/5") == "00000005_lfw_train_5.png"
    assert score.crop_name(7, "???") == "00000007_image.png"
    assert score.crop_name(123456789, "x" * 300) == "123456789_" + "x" * 100 + ".png"
    assert score.crop_name(1, "a b") != score.crop_name(2, "a_b")
