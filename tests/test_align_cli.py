"""`--align mtcnn` through `python -m vitnt_jax.score`: rows, errors, saved crops, resume, TFDS LFW,
detection in pixel groups, damaged weights."""

import csv
import importlib.metadata

import numpy as np
import pytest
from PIL import Image

from converters import mtcnn as converter
from experiments import torch_mtcnn as tm
from vitnt_jax import checkpoint, data, models, mtcnn, pipeline, score
from vitnt_jax.align import align
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

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


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
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


def assert_same_crop(got, want):
    """Crops of one face detected in different batches or groups: equal to one grey level.

    Other batch rows and tile packings may move the landmarks by float32 ulps (AVX2 and AVX-512
    round differently); a warped pixel near a rounding boundary then rounds the other way.
    """
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def assert_same_quality(got, want):
    """Qualities of the same model input scored at other batch positions: equal to 4 float32 ulps."""
    np.testing.assert_array_max_ulp(np.asarray(got, np.float32), np.asarray(want, np.float32), maxulp=4)


def _expected_crops(detector, root, ids, size=32):
    crops = {}
    for i in ids:
        image = np.asarray(Image.open(root / i).convert("RGB"))
        faces = detector.detect(image)
        pick = mtcnn.select_face(faces, *image.shape[:2])
        crops[i] = align(image, faces.landmarks[pick], size)
    return crops


def _mtcnn_argv(photos, weights, out):
    return ["--images", str(photos), "--out", str(out), "--align", "mtcnn", "--mtcnn-weights", str(weights)]


@pytest.fixture(scope="module")
def mtcnn_run(tiny_checkpoint, weights, photos, tmp_path_factory):
    """One `--align mtcnn --save-aligned` run over the photos: (its CSV, its crops folder); tests only read them."""
    root = tmp_path_factory.mktemp("mtcnn_run")
    out, crops = root / "s.csv", root / "crops"
    argv = _mtcnn_argv(photos, weights, out)
    assert _run(tiny_checkpoint, *argv, "--batch-size", "2", "--save-aligned", str(crops)) == 0
    return out, crops


@pytest.fixture(scope="module")
def face_crops(detector, photos):
    """The crops that the library's detector and alignment give for the two photos with faces."""
    return _expected_crops(detector, photos, ["astronaut.png", "people/group.jpg"])


def test_mtcnn_rows_errors_and_scores(tiny_checkpoint, weights, photos, mtcnn_run, face_crops, tmp_path):
    out, crops = mtcnn_run
    rows = _read(out)
    assert rows[0] == ["id", "quality", "error"]
    by_id = {r[0]: r for r in rows[1:]}
    names = ["astronaut.png", "people/group.jpg", "grey.png", "noise.png", "broken.jpg"]
    assert [r[0] for r in rows[1:]] == sorted(names)
    assert by_id["grey.png"][1:] == ["", "no face found"] and by_id["noise.png"][1:] == ["", "no face found"]
    assert by_id["broken.jpg"][1] == "" and by_id["broken.jpg"][2] not in ("", "no face found")
    # Faces are scored on the crops that detection + alignment give directly (the group photo: one face).
    # Saved crops: one PNG per scored row, named <source index>_<safe id>.png, holding the model input.
    assert sorted(p.name for p in crops.iterdir()) == ["00000000_astronaut.png", "00000004_people_group.png"]
    saved = {
        "astronaut.png": np.asarray(Image.open(crops / "00000000_astronaut.png")),
        "people/group.jpg": np.asarray(Image.open(crops / "00000004_people_group.png")),
    }
    for name, crop in saved.items():
        assert_same_crop(crop, face_crops[name])
    config, variables = checkpoint.load(tiny_checkpoint)
    quality = Scorer(config, variables, SETTINGS)(np.stack(list(saved.values())))["quality"]
    assert_same_quality([float(by_id[i][1]) for i in saved], quality)
    # Existing crops are never replaced silently: a second run into the same folder needs --overwrite.
    again = [*_mtcnn_argv(photos, weights, tmp_path / "t.csv"), "--save-aligned", str(crops)]
    assert _run(tiny_checkpoint, *again) == 1
    assert sorted(p.name for p in crops.iterdir()) == ["00000000_astronaut.png", "00000004_people_group.png"]


def test_batches_detect_photos_in_pixel_groups_with_the_same_crops(weights, photos, face_crops):
    ids = ["astronaut.png", "broken.jpg", "grey.png", "noise.png", "people/group.jpg"]
    # 150,000 pixels: the 400x400 astronaut alone, grey (150x120) with noise (90x100), the group alone.
    small = mtcnn.Detector.load(weights, group_pixels=150_000)
    calls = []
    detect_batch = small.detect_batch
    small.detect_batch = lambda images: calls.append(len(images)) or detect_batch(images)
    (batch,) = data.batches(lambda i: data.read_image(photos / ids[i]), range(5), 5, 32, align="mtcnn", detector=small)
    assert calls == [1, 2, 1]
    assert batch.valid.tolist() == [True, False, False, False, True]
    assert batch.errors[0] == batch.errors[4] == "" and batch.errors[2:4] == [data.NO_FACE, data.NO_FACE]
    assert batch.errors[1] not in ("", data.NO_FACE)
    assert_same_crop(batch.images[0], face_crops["astronaut.png"])
    assert_same_crop(batch.images[4], face_crops["people/group.jpg"])


def test_bgr_sources_are_swapped_before_detection(tiny_checkpoint, weights, photos, mtcnn_run, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    rgb = np.asarray(Image.open(photos / "astronaut.png"))
    Image.fromarray(rgb[..., ::-1].copy()).save(swapped / "astronaut.png")
    b_out, b_crops = tmp_path / "b.csv", tmp_path / "b_crops"
    argv = [*_mtcnn_argv(swapped, weights, b_out), "--color", "bgr", "--save-aligned", str(b_crops)]
    assert _run(tiny_checkpoint, *argv) == 0
    # The same face as the RGB run's, detected in another batch: the same crop, scored the same.
    (b_crop,) = [np.asarray(Image.open(p)) for p in b_crops.glob("*.png")]
    assert_same_crop(b_crop, np.asarray(Image.open(mtcnn_run[1] / "00000000_astronaut.png")))
    b = {r[0]: r[1] for r in _read(b_out)[1:]}
    assert b["astronaut.png"] != ""
    config, variables = checkpoint.load(tiny_checkpoint)
    assert_same_quality(float(b["astronaut.png"]), Scorer(config, variables, SETTINGS)(b_crop[None])["quality"][0])


def test_resume_with_mtcnn_neither_loses_nor_duplicates_rows(tiny_checkpoint, weights, photos, mtcnn_run, tmp_path):
    full = _read(mtcnn_run[0])
    out = tmp_path / "s.csv"
    with open(out, "w", newline="") as f:  # as if interrupted after two rows
        csv.writer(f, lineterminator="\n").writerows(full[:3])
    assert _run(tiny_checkpoint, *_mtcnn_argv(photos, weights, out), "--batch-size", "2", "--resume") == 0
    assert _read(out) == full


def test_tfds_lfw_defaults_to_mtcnn_and_converts_weights_once(tiny_checkpoint, detector, tmp_path, monkeypatch, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path / "cache"))
    astronaut = _photo("scikit-image", "skimage/data/astronaut.png")
    face = np.asarray(Image.fromarray(astronaut[0:300, 80:380]).resize((250, 250), Image.BILINEAR))  # LFW framing
    noise = np.random.default_rng(1).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    examples = [{"image": face, "label": b"Eileen_Collins"}, {"image": noise, "label": b"Nobody"}]
    out = tmp_path / "lfw.csv"
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, *args, **kwargs: examples):
        argv = ["--tfds", "lfw", "--out", str(out), "--batch-size", "3", "--save-aligned", str(tmp_path / "crops")]
        assert _run(tiny_checkpoint, *argv) == 0
    err = capsys.readouterr().err
    assert "align mtcnn" in err and "converting facenet-pytorch's MTCNN weights" in err
    cached = tmp_path / "cache" / mtcnn.WEIGHTS_NAME
    assert cached.is_file()
    rows = _read(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert rows[2] == ["lfw/train/1", "", "Nobody", "no face found"]
    # The face row holds the score of the crop that the library's detector and alignment give. The run
    # detects in a batch, where landmarks may move by float32 ulps (AVX2 and AVX-512 round differently):
    # a warped pixel then rounds the other way at most. The saved crop is what was scored.
    assert rows[1][0] == "lfw/train/0" and rows[1][2:] == ["Eileen_Collins", ""]
    (saved,) = [np.asarray(Image.open(p)) for p in (tmp_path / "crops").glob("*.png")]
    faces = detector.detect(face)
    crop = align(face, faces.landmarks[mtcnn.select_face(faces, 250, 250)], 32)
    assert_same_crop(saved, crop)
    config, variables = checkpoint.load(tiny_checkpoint)
    assert_same_quality(float(rows[1][1]), Scorer(config, variables, SETTINGS)(saved[None])["quality"][0])
    # Converted once: the next resolution reuses the cached file without converting again.
    monkeypatch.setattr(converter, "convert", lambda *a, **k: pytest.fail("converted a second time"))
    assert models.mtcnn_weights() == cached


def test_missing_facenet_is_one_sentence(tiny_checkpoint, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(converter, "installed_facenet_weights", lambda: None)
    assert _run(tiny_checkpoint, "--images", str(photos), "--out", str(tmp_path / "s.csv"), "--align", "mtcnn") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: alignment with MTCNN needs MTCNN weights") and "\n" not in err
    assert "pip install --no-deps facenet-pytorch==2.6.0" in err and "python -m converters.mtcnn" in err
    assert err.endswith("written by `python -m converters.mtcnn` as --mtcnn-weights.")  # the flag that takes it
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


def test_damaged_weights_are_one_line_in_the_cli(tiny_checkpoint, weights, photos, tmp_path, monkeypatch, capsys):
    half = tmp_path / "half.npz"
    half.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _run(tiny_checkpoint, *_mtcnn_argv(photos, half, tmp_path / "s.csv")) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: MTCNN weights {half} are damaged or unreadable (BadZipFile); "
        "convert them again with `python -m converters.mtcnn`."
    )
    # A damaged cached conversion (NaN weights would otherwise find no face anywhere): delete it.
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path / "cache"))
    with np.load(weights) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["pnet/params/conv1/kernel"][0, 0, 0, 0] = np.nan
    cached = tmp_path / "cache" / mtcnn.WEIGHTS_NAME
    cached.parent.mkdir()
    with open(cached, "wb") as f:
        np.savez(f, **arrays)
    argv = ["--images", str(photos), "--out", str(tmp_path / "s.csv"), "--align", "mtcnn"]
    assert _run(tiny_checkpoint, *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the weights in {cached} are not MTCNN weights: pnet/params/conv1/kernel holds NaN")
    assert "\n" not in err
    assert err.endswith(f"; delete {cached} so that it is converted again on the next run.")
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
    assert pipeline.crop_name(3, "b/deep/d.png") == "00000003_b_deep_d.png"
    assert pipeline.crop_name(12, "../../etc/passwd") == "00000012_etc_passwd.png"
    assert pipeline.crop_name(5, "lfw/train/5") == "00000005_lfw_train_5.png"
    assert pipeline.crop_name(7, "???") == "00000007_image.png"
    assert pipeline.crop_name(123456789, "x" * 300) == "123456789_" + "x" * 100 + ".png"
    assert pipeline.crop_name(1, "a b") != pipeline.crop_name(2, "a_b")
