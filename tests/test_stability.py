"""Hand-checkable cases for every formula of the scoring maths (vitnt_jax.stability)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from vitnt_jax import stability as st


def _toy_states():
    # K=3 blocks, B=1 image, N=2 patches, D=2. Patch 0 turns by 90 degrees once, patch 1 never moves.
    s = np.zeros((3, 1, 2, 2), np.float32)
    s[:, 0, 0] = [[1, 0], [0, 1], [0, 1]]
    s[:, 0, 1] = [[1, 0], [1, 0], [1, 0]]
    return jnp.asarray(s)


def test_toy_uniform_quality_matches_hand_computation():
    out = st.quality_from_states(_toy_states(), None, st.ScoreSettings((0, 1, 2), alpha=8.0, aggregation="mean"))
    d0 = (math.sqrt(2) + 0.0) / 2  # distances sqrt(2) then 0, mean over K-1 = 2 steps
    q0 = 2 / (1 + math.exp(8 * d0))
    np.testing.assert_allclose(out["patch_distance"][0], [d0, 0.0], atol=1e-7)
    np.testing.assert_allclose(out["patch_quality"][0], [q0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["quality"], [(q0 + 1) / 2], rtol=1e-6)


def test_toy_attention_weighting_last_and_all():
    # Attention received per selected block (K, B, N): last block favours patch 1 three to one.
    received = jnp.asarray([[[1.0, 1.0]], [[1.0, 1.0]], [[0.5, 1.5]]])
    q0 = 2 / (1 + math.exp(8 * math.sqrt(2) / 2))
    last = st.quality_from_states(_toy_states(), received, st.ScoreSettings((0, 1, 2), attention="last"))
    np.testing.assert_allclose(last["patch_weight"], [[0.25, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(last["quality"], [0.25 * q0 + 0.75], rtol=1e-6)
    every = st.quality_from_states(_toy_states(), received, st.ScoreSettings((0, 1, 2), attention="all"))
    # mean over blocks: (2.5/3, 3.5/3) -> weights (2.5/6, 3.5/6)
    np.testing.assert_allclose(every["patch_weight"], [[2.5 / 6, 3.5 / 6]], rtol=1e-6)
    np.testing.assert_allclose(every["quality"], [2.5 / 6 * q0 + 3.5 / 6], rtol=1e-6)


def test_attention_received_is_head_mean_then_query_sum():
    # B=1, H=2 heads, 2 queries x 2 keys; rows are softmax rows (sum to 1).
    a = jnp.asarray([[[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.0, 1.0]]]])
    # head mean: [[0.7, 0.3], [0.3, 0.7]] -> key column sums [1.0, 1.0]
    np.testing.assert_allclose(st.attention_received(a), [[1.0, 1.0]], atol=1e-7)
    b = jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    # head mean: [[0.5, 0.5], [1.0, 0.0]] -> [1.5, 0.5]
    np.testing.assert_allclose(st.attention_received(b), [[1.5, 0.5]], atol=1e-7)
    np.testing.assert_allclose(st.normalize_weights(st.attention_received(b)), [[0.75, 0.25]])


@pytest.mark.parametrize(
    "metric, expected",
    [("euclidean", math.sqrt(2)), ("cosine", 1.0), ("angular", 0.5), ("l1", 2.0)],
)
def test_metrics_on_orthogonal_unit_vectors(metric, expected):
    a, b = jnp.asarray([[1.0, 0.0]]), jnp.asarray([[0.0, 1.0]])
    np.testing.assert_allclose(st.METRICS[metric](a, b), [expected], rtol=1e-6)


@pytest.mark.parametrize("metric", sorted(st.METRICS))
def test_metrics_are_zero_for_identical_vectors_and_symmetric(metric):
    rng = np.random.default_rng(0)
    a = st.l2_normalize(jnp.asarray(rng.normal(size=(5, 7)), jnp.float32))
    b = st.l2_normalize(jnp.asarray(rng.normal(size=(5, 7)), jnp.float32))
    fn = st.METRICS[metric]
    np.testing.assert_allclose(fn(a, a), 0.0, atol=1e-3 if metric == "angular" else 1e-6)
    np.testing.assert_allclose(fn(a, b), fn(b, a), rtol=1e-6)
    assert np.all(np.asarray(fn(a, b)) > 0)


@pytest.mark.parametrize("metric", sorted(st.METRICS))
@pytest.mark.parametrize("aggregation", ["mean", "attention"])
def test_identical_states_give_quality_one(metric, aggregation):
    rng = np.random.default_rng(1)
    one = st.l2_normalize(jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32))
    states = jnp.stack([one] * 4)
    received = jnp.asarray(rng.uniform(0.1, 2.0, size=(4, 2, 5)), jnp.float32)
    settings = st.ScoreSettings((0, 1, 2, 3), metric=metric, aggregation=aggregation)
    out = st.quality_from_states(states, received, settings)
    np.testing.assert_allclose(out["quality"], 1.0, atol=1e-3 if metric == "angular" else 1e-6)


def test_patch_quality_in_zero_one_and_decreasing():
    d = jnp.asarray([0.0, 1e-4, 0.1, 0.5, 1.0, 2.0, 50.0, 1e4])
    q = np.asarray(st.patch_quality(d, 8.0))
    assert q[0] == 1.0
    assert np.all(q >= 0) and np.all(q <= 1)
    # Strictly positive for every Euclidean distance of unit vectors (d <= 2, so alpha*d <= 16);
    # only far outside that range does float32 underflow to 0.
    assert np.all(q[:-2] > 0)
    assert np.all(np.diff(q) <= 0)
    np.testing.assert_allclose(q[3], 2 / (1 + math.exp(4.0)), rtol=1e-6)


def test_weights_sum_to_one():
    rng = np.random.default_rng(2)
    w = st.normalize_weights(jnp.asarray(rng.uniform(0.01, 3, size=(6, 49)), jnp.float32))
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("metric", sorted(st.METRICS))
def test_zero_vectors_give_no_nan(metric):
    z = st.l2_normalize(jnp.zeros((3, 1, 4, 8)))
    assert np.all(np.asarray(z) == 0)
    states = z.at[1, 0, 0, 0].set(1.0)  # one patch jumps from zero to a unit vector
    out = st.quality_from_states(states, None, st.ScoreSettings((0, 1, 2), metric=metric, aggregation="mean"))
    for value in out.values():
        assert np.all(np.isfinite(np.asarray(value)))


def _run_tap(tap, normed, attention, blocks_run):
    state = tap.init(normed[0])
    for i in range(blocks_run):
        state, _ = tap.step(state, jnp.asarray(i), normed[i], normed[i], st.attention_received(attention[i]))
    return tap.finish(state)


@pytest.mark.parametrize("blocks", [(0, 1, 2, 3, 4), (1, 3, 4), (0, 4), (2, 3)])
@pytest.mark.parametrize("aggregation, attention", [("mean", "last"), ("attention", "last"), ("attention", "all")])
@pytest.mark.parametrize("metric", sorted(st.METRICS))
def test_streaming_tap_equals_states_maths(blocks, aggregation, attention, metric):
    rng = np.random.default_rng(3)
    normed = jnp.asarray(rng.normal(size=(5, 2, 6, 4)), jnp.float32)
    attn = jnp.asarray(rng.dirichlet(np.ones(6), size=(5, 2, 3, 6)), jnp.float32)  # (L, B, H, N, N)
    settings = st.ScoreSettings(blocks, metric=metric, aggregation=aggregation, attention=attention)
    streamed = _run_tap(st.StreamingTap(settings), normed, attn, blocks[-1] + 1)
    idx = np.asarray(blocks)
    states = st.l2_normalize(normed)[idx]
    received = jnp.stack([st.attention_received(attn[i]) for i in idx])
    direct = st.quality_from_states(states, received, settings)
    for key in direct:
        np.testing.assert_allclose(streamed[key], direct[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(blocks=(3,)), "at least two blocks"),
        (dict(blocks=(2, 1)), "sorted"),
        (dict(blocks=(0, 1), metric="chebyshev"), "unknown metric"),
        (dict(blocks=(0, 1), alpha=-8.0), "alpha must be a positive number"),
        (dict(blocks=(0, 1), alpha=float("nan")), "alpha must be a positive number"),
        (dict(blocks=(0, 1), aggregation="max"), "unknown aggregation"),
        (dict(blocks=(0, 1), attention="first"), "unknown attention"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        st.ScoreSettings(**kwargs)
