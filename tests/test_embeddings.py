"""The embedding extractor: the backbone's own embedding, flip concatenation, failed rows kept."""

import numpy as np
import pytest

from experiments import embeddings
from vitnt_jax import checkpoint
from vitnt_jax.scorer import Scorer
from vitnt_jax.stability import ScoreSettings

from helpers import smooth_faces, write_pack_with_a_bad_image


@pytest.fixture(scope="module")
def faces():
    return smooth_faces(6, size=32, seed=5)


@pytest.fixture
def pack(tmp_path, faces):
    return write_pack_with_a_bad_image(tmp_path / "tiny.bin", faces)


def test_embeddings_rows_flip_and_failures(tiny_checkpoint, pack, faces, tmp_path):
    out = tmp_path / "emb" / "tiny.npy"
    args = ["--bin", str(pack), "--model", str(tiny_checkpoint), "--batch-size", "4", "--out", str(out)]
    assert embeddings.main([*args, "--flip"]) == 0
    got = np.load(out)
    assert embeddings.ids_path(out).read_text().split() == [str(i) for i in range(6)]
    config, variables = checkpoint.load(tiny_checkpoint)
    scorer = Scorer(config, variables, ScoreSettings((0, 1)), embed=True, outputs=("embedding",))
    good = [0, 1, 2, 4, 5]
    stack = np.stack([faces[i] for i in good])
    plain = scorer(stack)["embedding"]
    flipped = scorer(np.ascontiguousarray(stack[:, :, ::-1]))["embedding"]
    width = plain.shape[1]
    assert got.shape == (6, 2 * width)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(got[good, :width], unit(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[good, width:], unit(flipped), rtol=1e-5, atol=1e-6)
    assert np.isnan(got[3]).all()  # the unreadable image keeps its row
    assert not np.allclose(got[good, :width], got[good, width:])  # flipping changes the embedding


def test_embeddings_refuse_to_overwrite(tiny_checkpoint, pack, tmp_path, capsys):
    out = tmp_path / "e.npy"
    out.write_bytes(b"")
    assert embeddings.main(["--bin", str(pack), "--model", str(tiny_checkpoint), "--out", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err


def test_unaligned_sources_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):  # LFW holds unaligned photos
        argv = ["--tfds", "lfw", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "e.npy")]
        assert embeddings.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tfds lfw:train holds unaligned photos") and "--align mtcnn" in err
    assert "\n" not in err and not (tmp_path / "e.npy").exists()
