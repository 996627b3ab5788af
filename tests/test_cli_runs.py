"""`python -m vitnt_jax.score` end to end in this process: every source, batch sizes, pmap, bfloat16, embeddings."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import SETTINGS, assert_same_floats, faces_folder, read_csv, run, scores

from vitnt_jax import checkpoint
from vitnt_jax.data import center_crop
from vitnt_jax.scorer import Scorer

from helpers import smooth_faces


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoint.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def want(model):
    """The library's qualities and embeddings of the 13 faces of `faces_folder`, in one batch."""
    scorer = Scorer(*model, SETTINGS, embed=True)
    return scorer(np.stack(smooth_faces(13, seed=21)))


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


@pytest.mark.parametrize("batch", ["1", "7", "9"])
def test_cli_batch_sizes_around_the_device_count(tiny_checkpoint, folder, tmp_path, want, batch):
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--batch-size", batch) == 0
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(13)]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want["quality"], atol=1e-6, rtol=0)


def test_cli_pmap_and_bfloat16(tiny_checkpoint, folder, tmp_path):
    outs = {}
    for name, extra in {"jit": [], "pmap": ["--parallel", "pmap"], "bf16": ["--dtype", "bfloat16"]}.items():
        outs[name] = tmp_path / f"{name}.csv"
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(outs[name]), *extra) == 0
    jit, pmap, bf16 = (scores(read_csv(outs[k])) for k in ("jit", "pmap", "bf16"))
    assert jit.keys() == pmap.keys() == bf16.keys()
    for k in jit:
        assert abs(jit[k] - pmap[k]) <= 1e-6
        assert abs(jit[k] - bf16[k]) <= 0.05


def test_list_source_with_reference_format(tiny_checkpoint, folder, tmp_path):
    listing = tmp_path / "image_path_list.txt"
    listing.write_text("faces/03.png\nfaces/01.png\nfaces/absent.png\n")
    out = tmp_path / "scores.txt"
    argv = ["--list", str(listing), "--root", str(tmp_path), "--out", str(out), "--format", "reference"]
    assert run(tiny_checkpoint, *argv) == 0
    lines = out.read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["faces/03.png", "faces/01.png", "faces/absent.png"]
    assert lines[2].endswith(" nan")
    csv_out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(csv_out)) == 0
    by_id = scores(read_csv(csv_out))
    # 03.png sits at another batch position in the two runs; '%.15f' keeps every float32 digit.
    got = [float(lines[k].split()[-1]) for k in (0, 1)]
    assert_same_floats(got, [by_id["03.png"], by_id["01.png"]])


def test_bin_source_scores_like_the_same_files(tiny_checkpoint, folder, tmp_path):
    # Pickled by Python 3 at protocol 2: bytes go through _codecs.encode (experiments.evaluate reads it too).
    blobs = [(folder / f"{i:02d}.png").read_bytes() for i in range(4)]
    pack = tmp_path / "lfw.bin"
    pack.write_bytes(pickle.dumps((blobs, [True, False]), protocol=2))
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--bin", str(pack), "--out", str(out)) == 0
    rows = read_csv(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert [(r[0], r[2]) for r in rows[1:]] == [("0", "1"), ("1", "1"), ("2", "0"), ("3", "0")]
    ref = tmp_path / "ref.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(ref)) == 0
    by_id = scores(read_csv(ref))
    # Same batch shape and positions in both runs (only the padding differs): exactly the same numbers.
    assert [float(r[1]) for r in rows[1:]] == [by_id[f"{i:02d}.png"] for i in range(4)]


def test_crafted_bin_is_refused_by_the_cli(tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    pack = tmp_path / "evil.bin"
    pack.write_bytes(pickle.dumps(([b"x", Exploit()], [True])))
    assert run(tiny_checkpoint, "--bin", str(pack), "--out", str(tmp_path / "s.csv")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --bin") and "refusing it" in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "s.csv").exists()


def test_tfds_lfw_end_to_end_with_mock_data(tiny_checkpoint, tmp_path, model):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "lfw.csv"
    with tfds.testing.mock_data(num_examples=5):
        argv = ["--tfds", "lfw", "--align", "center", "--out", str(out), "--batch-size", "3"]
        assert run(tiny_checkpoint, *argv) == 0
        data = tfds.data_source("lfw", split="train")
        photos = [data[i]["image"] for i in range(5)]
        labels = [data[i]["label"] for i in range(5)]
    rows = read_csv(out)
    assert rows[0] == ["id", "quality", "label", "error"]
    assert [r[0] for r in rows[1:]] == [f"lfw/train/{i}" for i in range(5)]
    assert [r[2] for r in rows[1:]] == [x.decode() if isinstance(x, bytes) else x for x in labels]
    # --align center: the fixed centre face box, then a bilinear resize to the model's size.
    crops = np.stack([np.asarray(Image.fromarray(center_crop(p)).resize((32, 32), Image.BILINEAR)) for p in photos])
    expected = Scorer(*model, SETTINGS)(crops)["quality"]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], expected, atol=1e-6, rtol=0)


def test_embeddings_match_the_model(tiny_checkpoint, folder, tmp_path, want):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--save-embeddings", str(emb)) == 0
    np.testing.assert_allclose(np.load(emb), want["embedding"], atol=1e-5, rtol=0)


def test_array_files_in_new_folders_are_created(tiny_checkpoint, folder, tmp_path):
    emb = tmp_path / "new" / "deeper" / "e.npy"
    argv = ["--images", str(folder), "--out", str(tmp_path / "s.csv"), "--save-embeddings", str(emb)]
    assert run(tiny_checkpoint, *argv) == 0
    assert np.load(emb).shape == (13, 8)


def test_cli_micro_batch_flag(tiny_checkpoint, folder, tmp_path, model):
    expected = Scorer(*model, SETTINGS, micro_batch=None)(np.stack(smooth_faces(13, seed=21)))["quality"]
    for flag in ("1", "0", "auto"):  # batch 128 on 8 devices: shares of 16, so auto (8) loops too
        out = tmp_path / f"s{flag}.csv"
        argv = ["--images", str(folder), "--out", str(out), "--micro-batch", flag, "--batch-size", "128"]
        assert run(tiny_checkpoint, *argv) == 0
        got = scores(read_csv(out))
        np.testing.assert_allclose([got[f"{i:02d}.png"] for i in range(13)], expected, atol=1e-6, rtol=0)


def test_one_compilation_for_a_whole_cli_run(tiny_checkpoint, folder, tmp_path, monkeypatch):
    import vitnt_jax.scorer as scorer_module

    made = []

    class Recording(scorer_module.Scorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, self.cache_size()))  # Scorer.cache_size() once it is public

    monkeypatch.setattr(scorer_module, "Scorer", Recording)
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--batch-size", "4") == 0
    assert len(read_csv(out)) == 14  # 13 images over two batches of 8 (4 rounded up to the 8 devices)
    # One Scorer, and at most one new compilation (Scorers of equal settings may share compiled shapes).
    assert len(made) == 1 and made[0][0].cache_size() - made[0][1] <= 1


def test_folder_links_are_reported_not_followed(tiny_checkpoint, folder, tmp_path, capsys):
    root = tmp_path / "linked"
    (root / "own").mkdir(parents=True)
    Image.fromarray(smooth_faces(1)[0]).save(root / "own" / "a.png")
    (root / "people").symlink_to(folder, target_is_directory=True)  # leads out of --images
    (root / "own" / "back").symlink_to(root, target_is_directory=True)  # a cycle through a link
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(root), "--out", str(out)) == 0
    assert [r[0] for r in read_csv(out)[1:]] == ["own/a.png"]
    err = capsys.readouterr().err
    assert "warning: folder link people is not followed" in err and "warning: folder link own/back" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any folder")
def test_unlistable_folder_is_reported(tiny_checkpoint, folder, tmp_path, capsys):
    locked = folder / "locked"
    locked.mkdir()
    Image.fromarray(smooth_faces(1)[0]).save(locked / "hidden.png")
    locked.chmod(0)
    try:
        out = tmp_path / "s.csv"
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
        assert "warning: cannot list folder" in capsys.readouterr().err
        argv = ["--images", str(folder), "--out", str(tmp_path / "t.csv"), "--on-error", "fail"]
        assert run(tiny_checkpoint, *argv) == 1
    finally:
        locked.chmod(0o755)


def test_list_with_a_byte_order_mark(tiny_checkpoint, folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeff00.png\n01.png\n".encode())
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--list", str(listing), "--root", str(folder), "--out", str(out)) == 0
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == ["00.png", "01.png"] and all(r[1] for r in rows[1:])
