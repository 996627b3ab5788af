"""The batch scorer at scale: devices, pmap, every source through main(argv), resume, multi-process."""

import csv
import io
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vitnt_jax import checkpoint, score
from vitnt_jax.data import center_crop
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

from helpers import smooth_faces

SETTINGS = ScoreSettings((0, 1, 2))  # the testing preset's defaults: all blocks, attention/last, alpha 8


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _scores(rows):
    return {r[0]: (float(r[1]) if r[1] else None) for r in rows[1:]}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoint.load(tiny_checkpoint)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    for i, face in enumerate(smooth_faces(13, seed=21)):
        Image.fromarray(face).save(root / f"{i:02d}.png")
    return root


def _run(ckpt, *argv):
    return score.main([*argv, "--model", str(ckpt)])


def test_eight_devices_equal_one_device(model):
    config, variables = model
    assert jax.local_device_count() == 8
    images = np.stack(smooth_faces(13, seed=3))
    eight = Scorer(config, variables, SETTINGS)(images)
    one = Scorer(config, variables, SETTINGS, devices=jax.local_devices()[:1])(images)
    for key in ("quality", "patch_quality"):
        np.testing.assert_allclose(eight[key], one[key], atol=1e-6, rtol=0)
    # With the same per-device batch, the numbers are bit-identical.
    same_shape_eight = Scorer(config, variables, SETTINGS)(images[:8])["quality"]  # 1 image per device
    per_image = np.concatenate(
        [
            Scorer(config, variables, SETTINGS, devices=jax.local_devices()[:1])(images[i : i + 1])["quality"]
            for i in range(8)
        ]
    )
    np.testing.assert_array_equal(same_shape_eight, per_image)


def test_pmap_equals_jit(model):
    config, variables = model
    images = np.stack(smooth_faces(11, seed=4))
    jit = Scorer(config, variables, SETTINGS, embed=True)(images)
    pmap = Scorer(config, variables, SETTINGS, embed=True, parallel="pmap")(images)
    for key in jit:
        assert pmap[key].shape == jit[key].shape
        np.testing.assert_allclose(pmap[key], jit[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_micro_batches_equal_one_piece(model, parallel):
    config, variables = model
    images = np.stack(smooth_faces(37, seed=8))
    whole = Scorer(config, variables, SETTINGS, embed=True, micro_batch=None, parallel=parallel)
    steps = Scorer(config, variables, SETTINGS, embed=True, micro_batch=2, parallel=parallel)
    assert (whole.padded_size(37), steps.padded_size(37)) == (40, 48)  # shares of 5 images, or 3 steps of 2
    a, b = whole(images), steps(images)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0)
    if parallel == "jit":
        steps(images[::-1].copy())
        assert steps._fn._cache_size() == 1


def test_chunked_attention_sums_only_on_one_device(model):
    # Chunks split the batch axis: on several devices they would make each one gather the batch.
    config, variables = model
    images = np.stack(smooth_faces(64, seed=9))
    eight = Scorer(config, variables, SETTINGS, micro_batch=None)
    assert eight.received_chunk is None
    hlo = eight._fn.lower(eight.variables, jax.device_put(images, eight._data)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    one = Scorer(config, variables, SETTINGS, micro_batch=None, devices=jax.local_devices()[:1])
    assert one.received_chunk == 8
    np.testing.assert_allclose(one(images)["quality"], eight(images)["quality"], atol=1e-6, rtol=0)


def test_micro_batched_puts_every_row_back_in_place():
    from vitnt_jax.scorer import micro_batched

    seen = []

    def fn(variables, x):
        seen.append(x.shape)
        return {"row": x[:, 0] + variables}

    rows = jnp.arange(24.0)[:, None] * jnp.ones((1, 3))
    out = micro_batched(fn, 100.0, rows, size=3, shards=2)  # two shares of 12: 4 steps of 3 + 3
    np.testing.assert_array_equal(out["row"], np.arange(24.0) + 100.0)
    assert seen == [(6, 3)]  # traced once by lax.map, one chunk from each share per step
    with pytest.raises(ValueError, match="does not split into 2 shares of whole 5-image steps"):
        micro_batched(fn, 100.0, rows, size=5, shards=2)


def test_micro_batch_must_be_positive(model):
    config, variables = model
    with pytest.raises(ValueError, match="micro_batch must be a positive number"):
        Scorer(config, variables, SETTINGS, micro_batch=0)


def test_padding_is_dropped_and_never_changes_real_rows(model):
    config, variables = model
    images = np.stack(smooth_faces(9, seed=5))
    scorer = Scorer(config, variables, SETTINGS)
    full = scorer(images)["quality"]
    assert full.shape == (9,)
    for n in (1, 7):
        np.testing.assert_allclose(scorer(images[:n])["quality"], full[:n], atol=1e-6, rtol=0)


def test_no_recompilation_over_many_batches(model):
    config, variables = model
    scorer = Scorer(config, variables, SETTINGS)
    rng = np.random.default_rng(0)
    for _ in range(4):
        scorer(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))  # padded to 16 every time
    assert scorer._fn._cache_size() == 1


@pytest.mark.parametrize("batch", ["1", "7", "9"])
def test_cli_batch_sizes_around_the_device_count(tiny_checkpoint, folder, tmp_path, model, batch):
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--batch-size", batch) == 0
    rows = _read(out)
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(13)]
    config, variables = model
    want = Scorer(config, variables, SETTINGS)(np.stack(smooth_faces(13, seed=21)))["quality"]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want, atol=1e-6, rtol=0)


def test_cli_pmap_and_bfloat16(tiny_checkpoint, folder, tmp_path):
    outs = {}
    for name, extra in {"jit": [], "pmap": ["--parallel", "pmap"], "bf16": ["--dtype", "bfloat16"]}.items():
        outs[name] = tmp_path / f"{name}.csv"
        assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(outs[name]), *extra) == 0
    jit, pmap, bf16 = (_scores(_read(outs[k])) for k in ("jit", "pmap", "bf16"))
    assert jit.keys() == pmap.keys() == bf16.keys()
    for k in jit:
        assert abs(jit[k] - pmap[k]) <= 1e-6
        assert abs(jit[k] - bf16[k]) <= 0.05


def _bad_folder(root: Path) -> Path:
    root.mkdir()
    faces = smooth_faces(6, seed=8)
    Image.fromarray(faces[0]).save(root / "a_good.png")
    buffer = io.BytesIO()
    Image.fromarray(faces[1]).save(buffer, format="JPEG")
    (root / "b_truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "c_empty.png").write_bytes(b"")
    (root / "d_text.png").write_text("no pixels here")
    Image.fromarray(faces[2]).convert("CMYK").save(root / "e_cmyk.jpg")
    Image.fromarray(faces[3][..., 0].astype(np.uint16) * 257).save(root / "f_16bit.png")
    Image.fromarray(faces[4]).resize((45, 37)).save(root / "g_odd_size.png")
    Image.fromarray(faces[5]).convert("P").save(root / "h_palette.png")
    return root


def test_bad_inputs_keep_their_rows(tiny_checkpoint, tmp_path, capsys):
    root = _bad_folder(tmp_path / "mixed")
    out = tmp_path / "s.csv"
    emb, pq = tmp_path / "e.npy", tmp_path / "pq.npy"
    assert (
        _run(
            tiny_checkpoint,
            "--images",
            str(root),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--save-embeddings",
            str(emb),
            "--save-patch-quality",
            str(pq),
        )
        == 0
    )
    rows = _read(out)
    assert rows[0] == ["id", "quality", "error"]
    by_id = {r[0]: r for r in rows[1:]}
    assert sorted(by_id) == sorted(p.name for p in root.iterdir()) and len(rows) == 9
    bad = {"b_truncated.jpg", "c_empty.png", "d_text.png"}
    for name, row in by_id.items():
        assert (row[1] == "") == (name in bad) and bool(row[2]) == (name in bad), row
    err = capsys.readouterr().err
    assert "scored 5, failed 3" in err and err.count("warning:") == 1
    embeddings, maps = np.load(emb), np.load(pq)
    assert embeddings.shape == (8, 8) and maps.shape == (8, 4, 4)
    failed = np.asarray([r[0] in bad for r in rows[1:]])
    assert np.isnan(embeddings[failed]).all() and np.isfinite(embeddings[~failed]).all()
    assert np.isnan(maps[failed]).all() and ((maps[~failed] > 0) & (maps[~failed] <= 1)).all()


def test_on_error_fail_then_resume(tiny_checkpoint, folder, tmp_path, capsys):
    reference, emb_ref = tmp_path / "ref.csv", tmp_path / "ref.npy"
    assert (
        _run(
            tiny_checkpoint,
            "--images",
            str(folder),
            "--out",
            str(reference),
            "--batch-size",
            "2",
            "--save-embeddings",
            str(emb_ref),
        )
        == 0
    )
    good = (folder / "10.png").read_bytes()
    (folder / "10.png").write_bytes(b"broken")
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    argv = ["--images", str(folder), "--out", str(out), "--batch-size", "8", "--save-embeddings", str(emb)]
    assert _run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 10.png: not a readable image") and "--resume" in err
    partial = _read(out)
    assert partial == _read(reference)[:11]  # header + every row before the bad input
    assert not emb.exists() and (tmp_path / "e.npy.partial").exists()
    assert _run(tiny_checkpoint, *argv) == 1  # exists: refuses without --resume or --overwrite
    (folder / "10.png").write_bytes(good)
    assert _run(tiny_checkpoint, *argv, "--resume") == 0
    assert "skipping 10 already written" in capsys.readouterr().err
    assert _read(out) == _read(reference)
    np.testing.assert_array_equal(np.load(emb), np.load(emb_ref))
    assert not (tmp_path / "e.npy.partial").exists()
    assert _run(tiny_checkpoint, *argv, "--resume") == 0  # nothing left to do, nothing changes
    assert _read(out) == _read(reference)
    np.testing.assert_array_equal(np.load(emb), np.load(emb_ref))


def test_resume_after_a_crash_mid_row(tiny_checkpoint, folder, tmp_path):
    reference = tmp_path / "ref.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(reference)) == 0
    out = tmp_path / "s.csv"
    text = reference.read_text()
    cut = text.index("05.png") + 8  # a crash left half of row 05 behind
    out.write_text(text[:cut])
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--resume") == 0
    assert out.read_text() == text


def test_list_source_with_reference_format(tiny_checkpoint, folder, tmp_path):
    listing = tmp_path / "image_path_list.txt"
    listing.write_text("faces/03.png\nfaces/01.png\nfaces/absent.png\n")
    out = tmp_path / "scores.txt"
    assert (
        _run(
            tiny_checkpoint, "--list", str(listing), "--root", str(tmp_path), "--out", str(out), "--format", "reference"
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["faces/03.png", "faces/01.png", "faces/absent.png"]
    assert lines[2].endswith(" nan")
    csv_out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(csv_out)) == 0
    by_id = _scores(_read(csv_out))
    assert abs(float(lines[0].split()[-1]) - by_id["03.png"]) < 1e-12


def test_bin_source_scores_like_the_same_files(tiny_checkpoint, folder, tmp_path):
    blobs = [(folder / f"{i:02d}.png").read_bytes() for i in range(4)]
    pack = tmp_path / "lfw.bin"
    pack.write_bytes(pickle.dumps((blobs, [True, False]), protocol=2))
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--bin", str(pack), "--out", str(out)) == 0
    rows = _read(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert [(r[0], r[2]) for r in rows[1:]] == [("0", "1"), ("1", "1"), ("2", "0"), ("3", "0")]
    ref = tmp_path / "ref.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(ref)) == 0
    by_id = _scores(_read(ref))
    for i in range(4):
        assert abs(float(rows[i + 1][1]) - by_id[f"{i:02d}.png"]) < 1e-12


def test_crafted_bin_is_refused_by_the_cli(tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    pack = tmp_path / "evil.bin"
    pack.write_bytes(pickle.dumps(([b"x", Exploit()], [True])))
    assert _run(tiny_checkpoint, "--bin", str(pack), "--out", str(tmp_path / "s.csv")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --bin") and "refusing it" in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "s.csv").exists()


def test_tfds_lfw_end_to_end_with_mock_data(tiny_checkpoint, tmp_path, model):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "lfw.csv"
    with tfds.testing.mock_data(num_examples=5):
        argv = ["--tfds", "lfw", "--align", "center", "--out", str(out), "--batch-size", "3"]
        assert _run(tiny_checkpoint, *argv) == 0
        data = tfds.data_source("lfw", split="train")
        photos = [data[i]["image"] for i in range(5)]
        labels = [data[i]["label"] for i in range(5)]
    rows = _read(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert [r[0] for r in rows[1:]] == [f"lfw/train/{i}" for i in range(5)]
    assert [r[2] for r in rows[1:]] == [x.decode() if isinstance(x, bytes) else x for x in labels]
    # --align center: the fixed centre face box, then a bilinear resize to the model's size.
    config, variables = model
    crops = np.stack([np.asarray(Image.fromarray(center_crop(p)).resize((32, 32), Image.BILINEAR)) for p in photos])
    want = Scorer(config, variables, SETTINGS)(crops)["quality"]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want, atol=1e-6, rtol=0)


def test_embeddings_match_the_model(tiny_checkpoint, folder, tmp_path, model):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--save-embeddings", str(emb)) == 0
    config, variables = model
    want = Scorer(config, variables, SETTINGS, embed=True)(np.stack(smooth_faces(13, seed=21)))["embedding"]
    np.testing.assert_allclose(np.load(emb), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--alpha", "-1"], "--alpha must be a positive number"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--root", "."], "--root only applies to the list source"),
        (["--num-processes", "2"], "need all of --num-processes"),
        (["--save-embeddings", "e.csv"], "must end in .npy"),
    ],
)
def test_flag_errors_are_one_line(tiny_checkpoint, folder, tmp_path, capsys, argv, message):
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv"), *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_to_the_single_process_result(tiny_checkpoint, folder, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    common = [
        sys.executable,
        "-m",
        "vitnt_jax.score",
        "--images",
        str(folder),
        "--model",
        str(tiny_checkpoint),
        "--batch-size",
        "4",
    ]
    single = subprocess.run(
        [*common, "--out", str(tmp_path / "single.csv"), "--save-embeddings", str(tmp_path / "single.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *common,
                "--out",
                str(tmp_path / "multi.csv"),
                "--save-embeddings",
                str(tmp_path / "multi.npy"),
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--coordinator",
                f"127.0.0.1:{port}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert (tmp_path / "multi.csv").read_bytes() == (tmp_path / "single.csv").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy"))
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == []


def test_distributed_without_a_cluster_is_one_line(tiny_checkpoint, folder, tmp_path, capsys):
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv"), "--distributed") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --distributed found no cluster") and "\n" not in err


def test_unprepared_tfds_dataset_says_what_is_missing(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from vitnt_jax import sources

    def not_prepared(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format TFRECORD is not supported")

    class Builder:
        def download_and_prepare(self, **kwargs):
            assert kwargs == {"file_format": "array_record"}
            raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds, "data_source", not_prepared)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    with pytest.raises(
        sources.SourceError, match="needs TensorFlow .*--file_format=array_record.*pass data_dir"
    ) as got:
        sources.tfds_source("lfw")
    assert got.value.field == "data_dir" and got.value.render(sources.flag_names()).endswith("pass --data-dir.")


def test_plain_progress_lines_when_not_on_a_terminal(monkeypatch, capsys):
    from vitnt_jax import cli, pipeline

    cli.configure_logging()
    clock = iter([0.0, 10.0, 31.0, 40.0])
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    progress = pipeline.Progress(100)  # stderr is captured: not a terminal
    progress.update(20)  # t = 10 s: too soon for a line
    progress.update(42)  # t = 31 s: 62 images in 31 s
    progress.update(10)  # t = 40 s: 9 s after the last line
    progress.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["62/100 images, 2.0 images/s, ETA 19 s"]


def test_padding_rows_never_change_real_rows_exactly(model):
    config, variables = model
    images = np.stack(smooth_faces(8, seed=6))
    scorer = Scorer(config, variables, SETTINGS)
    five = scorer(images[:5])  # padded with three zero images
    noisy = images.copy()
    noisy[5:] = 255 - noisy[5:]  # other content in the same three rows
    eight = scorer(noisy)
    for key in five:
        np.testing.assert_array_equal(five[key], eight[key][:5])


def test_one_compilation_for_a_whole_cli_run(tiny_checkpoint, folder, tmp_path, monkeypatch):
    import vitnt_jax.scorer as scorer_module

    made = []

    class Recording(scorer_module.Scorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(scorer_module, "Scorer", Recording)
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--batch-size", "4") == 0
    assert len(_read(out)) == 14  # 13 images over two batches of 8 (4 rounded up to the 8 devices)
    assert len(made) == 1 and made[0]._fn._cache_size() == 1


def test_batches_pad_the_tail_and_mark_it_invalid(folder):
    from vitnt_jax.data import batches
    from vitnt_jax.sources import image_folder

    src = image_folder(folder)
    got = list(batches(src.load, list(range(13)), 8, 32, workers=2))
    assert [b.indices for b in got] == [list(range(8)), list(range(8, 13))]
    assert got[1].images.shape == (8, 32, 32, 3)
    assert got[1].valid.tolist() == [True] * 5 + [False] * 3
    assert not got[1].images[5:].any()


def test_scorer_refuses_float_input(model):
    config, variables = model
    with pytest.raises(ValueError, match="uint8 RGB images"):
        Scorer(config, variables, SETTINGS)(np.zeros((2, 32, 32, 3), np.float32))


def test_linked_folders_are_followed_once(tiny_checkpoint, folder, tmp_path):
    root = tmp_path / "linked"
    root.mkdir()
    (root / "people").symlink_to(folder, target_is_directory=True)
    (folder / "back").symlink_to(root, target_is_directory=True)  # a cycle through the link
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--images", str(root), "--out", str(out)) == 0
    ids = [r[0] for r in _read(out)[1:]]
    assert ids == [f"people/{i:02d}.png" for i in range(13)]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any folder")
def test_unlistable_folder_is_reported(tiny_checkpoint, folder, tmp_path, capsys):
    locked = folder / "locked"
    locked.mkdir()
    Image.fromarray(smooth_faces(1)[0]).save(locked / "hidden.png")
    locked.chmod(0)
    try:
        out = tmp_path / "s.csv"
        assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
        assert "warning: cannot list folder" in capsys.readouterr().err
        assert (
            _run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "t.csv"), "--on-error", "fail") == 1
        )
    finally:
        locked.chmod(0o755)


def test_output_path_problems_are_caught_before_work(tiny_checkpoint, folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "afile" / "s.csv", "which is a file")):
        assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 1
        assert message in capsys.readouterr().err


def test_flag_errors_from_argparse_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        score.main(["--images", "x", "--model", "m", "--block", "-2:"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unrecognized arguments: --block") and "\n" not in err
    with pytest.raises(SystemExit) as stop:
        score.main(["--images", "x", "--model", "m", "--micro-batch", "some"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--micro-batch: expected a number of images (0 = off) or auto" in err
    assert "\n" not in err


def test_cli_micro_batch_flag(tiny_checkpoint, folder, tmp_path, model):
    config, variables = model
    expected = Scorer(config, variables, SETTINGS, micro_batch=None)(np.stack(smooth_faces(13, seed=21)))["quality"]
    for flag in ("1", "0", "auto"):  # batch 128 on 8 devices: shares of 16, so auto (8) loops too
        out = tmp_path / f"s{flag}.csv"
        argv = ["--images", str(folder), "--out", str(out), "--micro-batch", flag, "--batch-size", "128"]
        assert _run(tiny_checkpoint, *argv) == 0
        got = _scores(_read(out))
        np.testing.assert_allclose([got[f"{i:02d}.png"] for i in range(13)], expected, atol=1e-6, rtol=0)


def test_resume_never_changes_a_foreign_file(tiny_checkpoint, folder, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 10 + b"no newline at the end")
    text = tmp_path / "notes.csv"
    text.write_text("name,age\nada,36\nalan,41")
    for path in (binary, text):
        before = path.read_bytes()
        assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(path), "--resume") == 1
        assert path.read_bytes() == before
        assert "choose a new --out" in capsys.readouterr().err


def test_reference_resume_refuses_a_csv(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
    before = out.read_bytes()
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--format", "reference", "--resume") == 1
    assert "is a CSV, not a reference-format file" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_output_and_array_paths_must_differ(tiny_checkpoint, folder, tmp_path, capsys):
    same = tmp_path / "x.npy"
    assert (
        _run(
            tiny_checkpoint,
            "--images",
            str(folder),
            "--out",
            str(same),
            "--save-embeddings",
            str(tmp_path / "." / "x.npy"),
        )
        == 1
    )
    assert "three different files" in capsys.readouterr().err and not same.exists()


def test_resume_of_an_empty_or_headerless_file_starts_afresh(tiny_checkpoint, folder, tmp_path):
    reference = tmp_path / "ref.csv"
    assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(reference)) == 0
    for content in (b"", b"id,qual"):
        out = tmp_path / "s.csv"
        out.write_bytes(content)
        assert _run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--resume") == 0
        assert out.read_bytes() == reference.read_bytes()


def test_array_files_in_new_folders_are_created(tiny_checkpoint, folder, tmp_path):
    emb = tmp_path / "new" / "deeper" / "e.npy"
    assert (
        _run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "s.csv"), "--save-embeddings", str(emb))
        == 0
    )
    assert np.load(emb).shape == (13, 8)


def test_list_with_a_byte_order_mark(tiny_checkpoint, folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeff00.png\n01.png\n".encode())
    out = tmp_path / "s.csv"
    assert _run(tiny_checkpoint, "--list", str(listing), "--root", str(folder), "--out", str(out)) == 0
    rows = _read(out)
    assert [r[0] for r in rows[1:]] == ["00.png", "01.png"] and all(r[1] for r in rows[1:])


def test_grey_and_alpha_arrays_become_rgb():
    from vitnt_jax.data import prepare

    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for array in (grey, grey[..., None]):
        out = prepare(array, 8).image
        assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    rgba = np.dstack([np.stack([grey] * 3, -1), np.zeros((8, 8), np.uint8)])
    assert np.array_equal(prepare(rgba, 8).image, np.stack([grey] * 3, -1))


def _multi(tmp_path, folder, ckpt, out, extra_per_process=None, *extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = []
    for i in range(2):
        argv = [
            sys.executable,
            "-m",
            "vitnt_jax.score",
            "--images",
            str(folder),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--coordinator",
            f"127.0.0.1:{port}",
            *extra,
            *((extra_per_process or {}).get(i, [])),
        ]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def test_a_failing_process_stops_the_merge_with_one_line(tiny_checkpoint, folder, tmp_path):
    (folder / "12.png").write_bytes(b"broken")  # in process 1's share
    out = tmp_path / "m.csv"
    (rc0, err0), (rc1, err1) = _multi(tmp_path, folder, tiny_checkpoint, out, None, "--on-error", "fail")
    assert rc1 == 1 and "12.png: not a readable image" in err1
    assert rc0 == 1 and "process 1 failed: 12.png" in err0.strip().splitlines()[-1]
    assert not out.exists()  # nothing merged; the parts are kept for --resume
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == [
        "m.csv.part00000-of-00002",
        "m.csv.part00001-of-00002",
    ]


def test_resume_of_a_finished_multi_process_run_changes_nothing(tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "m.csv"
    results = _multi(tmp_path, folder, tiny_checkpoint, out)
    assert all(rc == 0 for rc, _ in results), results
    before = out.read_bytes()
    results = _multi(tmp_path, folder, tiny_checkpoint, out, None, "--resume")
    assert all(rc == 0 for rc, _ in results), results
    assert out.read_bytes() == before and len(_read(out)) == 14


def test_exif_orientation_is_applied_like_opencv(tmp_path):
    from vitnt_jax.data import read_image

    upright = smooth_faces(1, size=32, seed=8)[0][:, :24]  # 32 rows x 24 columns
    # Stored rotated, with Orientation=6 ("rotate 90 CW to view"): viewers and OpenCV show it upright.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    got = read_image(tmp_path / "phone.png")
    assert got.shape == upright.shape
    np.testing.assert_array_equal(got, upright)
