"""The batch scorer over devices: 8 fake CPU devices, pmap, micro-batches, padding, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import SETTINGS, assert_same_floats

from vitnt_jax import checkpoint
from vitnt_jax.scorer import Scorer

from helpers import smooth_faces


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoint.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def eight(model):
    """The default Scorer on all 8 devices, shared by the tests that use these settings."""
    return Scorer(*model, SETTINGS)


@pytest.fixture(scope="module")
def one(model):
    """The default Scorer on one device."""
    return Scorer(*model, SETTINGS, devices=jax.local_devices()[:1])


def test_eight_devices_equal_one_device(eight, one):
    assert jax.local_device_count() == 8
    images = np.stack(smooth_faces(13, seed=3))
    a, b = eight(images), one(images)
    for key in ("quality", "patch_quality"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0)
    # With the same per-device batch (one image per device), the numbers agree to the ulp.
    same_shape_eight = eight(images[:8])["quality"]
    per_image = np.concatenate([one(images[i : i + 1])["quality"] for i in range(8)])
    assert_same_floats(same_shape_eight, per_image)


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
        compiled = steps.cache_size()
        steps(images[::-1].copy())
        assert steps.cache_size() == compiled


def test_sharded_scoring_moves_no_data_between_devices(model):
    # Data parallel: each device scores its own share; the compiled program gathers nothing.
    for micro_batch in (None, 2):
        scorer = Scorer(*model, SETTINGS, micro_batch=micro_batch)
        hlo = scorer.lower(64).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" not in hlo


def test_micro_batched_puts_every_row_back_in_place():
    from vitnt_jax.scorer import micro_batched

    seen = []

    def fn(variables, x):
        seen.append(x.shape)
        return {"row": x[:, 0] + variables}

    rows = jnp.arange(24.0)[:, None] * jnp.ones((1, 3))
    out = micro_batched(fn, 100.0, rows, size=3, shards=2)  # two shares of 12: 4 steps of 3 + 3
    np.testing.assert_array_equal(out["row"], np.arange(24.0) + 100.0)  # integers: exact on every CPU
    assert seen == [(6, 3)]  # traced once by lax.map, one chunk from each share per step
    with pytest.raises(ValueError, match="does not split into 2 shares of whole 5-image steps"):
        micro_batched(fn, 100.0, rows, size=5, shards=2)


def test_micro_batch_must_be_positive(model):
    with pytest.raises(ValueError, match="micro_batch must be a positive number"):
        Scorer(*model, SETTINGS, micro_batch=0)


def test_padding_is_dropped_and_never_changes_real_rows(eight):
    images = np.stack(smooth_faces(9, seed=5))
    full = eight(images)["quality"]
    assert full.shape == (9,)
    for n in (1, 7):
        np.testing.assert_allclose(eight(images[:n])["quality"], full[:n], atol=1e-6, rtol=0)


def test_padding_rows_never_change_real_rows_exactly(eight):
    # Same program, same batch positions: only the content of the padding rows differs, so exact.
    images = np.stack(smooth_faces(8, seed=6))
    five = eight(images[:5])  # padded with three zero images
    noisy = images.copy()
    noisy[5:] = 255 - noisy[5:]  # other content in the same three rows
    full = eight(noisy)
    for key in five:
        np.testing.assert_array_equal(five[key], full[key][:5])


def test_no_recompilation_over_many_batches(model):
    # Scorers with equal settings may share one compiled function: count what this test adds.
    scorer = Scorer(*model, SETTINGS)
    rng = np.random.default_rng(0)
    before = scorer.cache_size()
    scorer(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))  # padded to 16
    first = scorer.cache_size()
    assert first - before <= 1
    for _ in range(3):
        scorer(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))  # padded to 16 every time
    assert scorer.cache_size() == first


def test_scorer_refuses_float_input(eight):
    with pytest.raises(ValueError, match="uint8 RGB images"):
        eight(np.zeros((2, 32, 32, 3), np.float32))
