"""Helpers of the scoring-pipeline tests (test_devices, test_cli_runs, test_resume, test_multiprocess, ...)."""

import csv
import socket

import numpy as np
from PIL import Image

from vitnt_jax import score
from vitnt_jax.stability import ScoreSettings

from helpers import smooth_faces

SETTINGS = ScoreSettings((0, 1, 2))  # the testing preset's defaults: all blocks, attention/last, alpha 8
FACES_SEED = 21  # the 13 faces of `faces_folder`


def faces_folder(root, n=13, seed=FACES_SEED):
    """Returns `root`, now holding n smooth faces 00.png, 01.png, ..."""
    root.mkdir()
    for i, face in enumerate(smooth_faces(n, seed=seed)):
        Image.fromarray(face).save(root / f"{i:02d}.png")
    return root


def read_csv(path):
    """Returns every row of a CSV, header first, as lists of strings."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def scores(rows):
    """Returns {id: quality or None} of read_csv rows."""
    return {r[0]: (float(r[1]) if r[1] else None) for r in rows[1:]}


def run(ckpt, *argv):
    """Runs `python -m vitnt_jax.score` in this process with the checkpoint `ckpt`; returns the exit status."""
    return score.main([*argv, "--model", str(ckpt)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_floats(a, b, maxulp=4):
    """Float32 results computed at other batch positions, on other devices or in other packings agree to a
    few ulps (AVX2 and AVX-512 CPUs round differently there), NaN where the other has NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    np.testing.assert_array_max_ulp(a[ok], b[ok], maxulp=maxulp)


def assert_same_rows(got, want):
    """Two score CSVs (read_csv rows) hold the same ids, labels and errors exactly, and the same qualities to a
    few ulps (see assert_same_floats)."""
    assert got[0] == want[0]
    assert [r[:1] + r[2:] for r in got[1:]] == [r[:1] + r[2:] for r in want[1:]]
    assert [bool(r[1]) for r in got[1:]] == [bool(r[1]) for r in want[1:]]
    assert_same_floats([float(r[1]) for r in got[1:] if r[1]], [float(r[1]) for r in want[1:] if r[1]])
