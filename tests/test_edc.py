"""EDC curves, pAUC and FNMR@FMR: hand-computed cases, input errors, and a loop oracle written from the spec."""

import numpy as np
import pytest

from experiments.edc import RECOMPUTED_DISCARD, edc_curve, fnmr_at_fmr, pair_quality, pauc, threshold_at_fmr

# Fixed-protocol hand case: 4 genuine + 6 impostor comparisons.
# Impostor scores 0.1 0.2 0.3 0.3 0.5 0.6; FMR (share >= t) at each: 6/6 5/6 4/6 4/6 2/6 1/6.
# Target 0.4: the lowest observed score with FMR <= 0.4 is 0.5 (2/6 = 0.33), so t = 0.5.
IMPOSTOR = [0.1, 0.2, 0.3, 0.3, 0.5, 0.6]
# Genuine (similarity, quality): errors are similarity < 0.5, i.e. 0.4 and 0.3 (0.5 itself is accepted).
GENUINE = [(0.4, 1.0), (0.5, 2.0), (0.9, 2.0), (0.3, 3.0)]


def fixed_case(impostor_quality=0.0):
    similarity = np.array([s for s, _ in GENUINE] + IMPOSTOR)
    genuine = np.array([True] * 4 + [False] * 6)
    quality = np.array([q for _, q in GENUINE] + [impostor_quality] * 6)
    return similarity, genuine, quality


def test_fixed_protocol_by_hand():
    curve = edc_curve(*fixed_case(), fmr=0.4, protocol="fixed")
    # Quality runs: {1: 0.4}, {2: 0.5, 0.9} (discarded together), {3: 0.3}.
    # discard 0: errors 0.4, 0.3 of 4      -> 2/4
    # discard 1/4 (quality 1 gone): 0.3 of 3 -> 1/3
    # discard 3/4 (both quality-2 pairs gone): 0.3 of 1 -> 1
    # then the closing point (1, 0).
    np.testing.assert_allclose(curve.discard, [0.0, 0.25, 0.75, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve.fnmr, [0.5, 1 / 3, 1.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve.threshold, [0.5] * 4)
    np.testing.assert_allclose(curve.threshold_fmr, [2 / 6] * 4)
    assert curve.protocol == "fixed" and curve.fmr == 0.4


def test_fixed_protocol_ignores_impostor_quality_and_input_order():
    base = edc_curve(*fixed_case(0.0), fmr=0.4, protocol="fixed")
    similarity, genuine, quality = fixed_case(5.0)
    order = np.random.default_rng(0).permutation(similarity.size)
    other = edc_curve(similarity[order], genuine[order], quality[order], fmr=0.4, protocol="fixed")
    np.testing.assert_array_equal(base.fnmr, other.fnmr)
    np.testing.assert_array_equal(base.discard, other.discard)


def test_curve_arrays_are_read_only():
    curve = edc_curve(*fixed_case(), fmr=0.4, protocol="fixed")
    with pytest.raises(ValueError):
        curve.fnmr[0] = 0.0


# Recomputed-protocol hand case: 10 pairs with distinct qualities, listed in ascending quality
# (rank r = quality r + 1). P = 10, so int(f * 10) keeps ranks from 0,0,1,1,2,2,...,9,9 on.
RECOMPUTED_PAIRS = [  # (genuine, similarity)
    (False, 0.8),  # rank 0: a low-quality impostor with a high score
    (True, 0.2),  # rank 1: a low-quality genuine pair with a low score (tied with rank 7)
    (False, 0.1),
    (True, 0.7),
    (False, 0.3),
    (False, 0.4),
    (True, 0.9),
    (False, 0.2),
    (True, 0.6),
    (False, 0.5),  # rank 9
]


def test_recomputed_protocol_by_hand():
    genuine = np.array([g for g, _ in RECOMPUTED_PAIRS])
    similarity = np.array([s for _, s in RECOMPUTED_PAIRS])
    quality = np.arange(1.0, 11.0)
    curve = edc_curve(similarity, genuine, quality, fmr=0.2, protocol="recomputed")
    # Target 0.2; candidates are the distinct kept scores; FMR = kept impostors >= t / kept impostors;
    # FNMR = kept genuine <= t / kept genuine.
    # from 0: imp .1 .2 .3 .4 .5 .8, gen .2 .6 .7 .9. FMR 1/6 at .6 .7 .8 is closest (|1/6-.2|
    #   < |2/6-.2| at .5) -> lowest t = .6; gen <= .6: .2 .6 -> 2/4.
    # from 1 (imp .8 gone): imp .1-.5 (5); FMR at .5 = 1/5 = target -> t .5; gen <= .5: .2 -> 1/4.
    # from 2 (gen .2 gone): t .5 (1/5); gen .6 .7 .9 -> 0.
    # from 3 (imp .1 gone): imp .2-.5 (4): FMR .25 at .5 beats 0 at .6 -> t .5; FNMR 0.
    # from 4 (gen .7 gone): same t .5; gen .6 .9 -> 0.
    # from 5 (imp .3 gone): imp .2 .4 .5: 1/3 at .5 (|.133|) beats 0 (|.2|) -> t .5; FNMR 0.
    # from 6 (imp .4 gone): imp .2 .5: .5 at .5 (|.3|) loses to 0 at .6 (|.2|) -> t .6; gen .6 .9 -> 1/2.
    # from 7 (gen .9 gone): t .6 again; gen .6 -> 1.
    # from 8 (imp .2 gone): imp .5: 1 at .5, 0 at .6 -> t .6; gen .6 -> 1.
    # from 9: only imp .5 is left, no genuine pair -> NaN.
    np.testing.assert_array_equal(curve.discard, np.arange(0, 0.98, 0.05))
    expected_fnmr = [0.5, 0.5, 0.25, 0.25, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1, np.nan, np.nan]
    expected_threshold = [0.6, 0.6] + [0.5] * 10 + [0.6] * 6 + [np.nan] * 2
    np.testing.assert_allclose(curve.fnmr, expected_fnmr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve.threshold, expected_threshold)
    np.testing.assert_allclose(curve.threshold_fmr[[0, 2, 6, 10, 12]], [1 / 6, 1 / 5, 1 / 4, 1 / 3, 0.0])
    # Only points within the limit count, so the NaN points at 0.9 and 0.95 do not spoil pAUC@0.3:
    # step: 0.5 * 0.1 + 0.25 * 0.1 + 0 * 0.1 = 0.075.
    assert curve.pauc(0.3) == pytest.approx(0.075, abs=1e-15)


def test_recomputed_cut_splits_a_run_of_equal_quality():
    # Two impostor pairs of score 0.8 share the lowest quality. At f = 0.1 of 10 pairs, one pair is
    # dropped, so one 0.8 stays: imp .1 .2 .3 .8, gen .5 .6 .7 .85 .95. Target 0.25: FMR 1/4 from
    # t = .5 up to .8 -> t = .5, gen <= .5 -> 1/5. (Dropping both, as "fixed" would, gives t = .3.)
    similarity = np.array([0.8, 0.8, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.85, 0.95])
    genuine = np.array([False] * 5 + [True] * 5)
    quality = np.array([1.0, 1.0, 2, 3, 4, 5, 6, 7, 8, 9])
    curve = edc_curve(similarity, genuine, quality, fmr=0.25, protocol="recomputed")
    assert curve.threshold[2] == 0.5
    assert curve.threshold_fmr[2] == 0.25
    assert curve.fnmr[2] == pytest.approx(0.2, abs=1e-15)


def test_recomputed_counts_genuine_at_threshold_as_rejected_and_prefers_lowest_tie():
    # Impostors .1 .2 .3 .4; genuine .25 .3 .9. Target .5: FMR 2/4 (exactly the target) at both .25
    # and .3 -> the lowest, .25, a genuine score. Genuine .25 equals t and counts as a false
    # non-match (<= t): FNMR 1/3 (it would be 0 with < t).
    similarity = np.array([0.1, 0.2, 0.3, 0.4, 0.25, 0.3, 0.9])
    genuine = np.array([False] * 4 + [True] * 3)
    curve = edc_curve(similarity, genuine, np.arange(7.0), fmr=0.5, protocol="recomputed")
    assert curve.threshold[0] == 0.25
    assert curve.fnmr[0] == pytest.approx(1 / 3, abs=1e-15)


def test_pauc_step_and_trapezoid_by_hand():
    discard = np.array([0.0, 0.25, 0.75, 1.0])
    fnmr = np.array([0.5, 1 / 3, 1.0, 0.0])
    # step to 0.3: 0.5 * 0.25 + (1/3) * 0.05 = 0.125 + 0.0166667
    assert pauc(discard, fnmr, 0.3) == pytest.approx(0.125 + 0.05 / 3, abs=1e-15)
    # trapezoid to 0.3: (0.5 + 1/3) / 2 * 0.25, then the curve at 0.3 is 1/3 + (0.05 / 0.5) * (2/3)
    # = 0.4, so (1/3 + 0.4) / 2 * 0.05 is added.
    assert pauc(discard, fnmr, 0.3, method="trapezoid") == pytest.approx(
        (0.5 + 1 / 3) / 2 * 0.25 + (1 / 3 + 0.4) / 2 * 0.05, abs=1e-15
    )
    # A limit on a point: step stops there; 0.25 * 0.5.
    assert pauc(discard, fnmr, 0.25) == pytest.approx(0.125, abs=1e-15)
    # The whole curve: step 0.125 + (1/3) * 0.5 + 1 * 0.25; trapezoid over widths 1/4, 1/2, 1/4:
    # 0.1041667 + 0.3333333 + 0.125.
    assert pauc(discard, fnmr, 1.0) == pytest.approx(0.125 + 0.5 / 3 + 0.25, abs=1e-15)
    assert pauc(discard, fnmr, 1.0, method="trapezoid") == pytest.approx(
        (0.5 + 1 / 3) / 8 + (1 / 3 + 1) / 4 + 1 / 8, abs=1e-15
    )
    # Beyond the last point both hold the last value: 0.5 * 0.5 from 0.5.
    assert pauc([0.0, 0.5], [0.2, 0.5], 1.0) == pytest.approx(0.1 + 0.25, abs=1e-15)
    assert pauc([0.0, 0.5], [0.2, 0.5], 1.0, method="trapezoid") == pytest.approx(0.175 + 0.25, abs=1e-15)


def test_pauc_of_curve_matches_function():
    curve = edc_curve(*fixed_case(), fmr=0.4, protocol="fixed")
    assert curve.pauc(0.2) == pauc(curve.discard, curve.fnmr, 0.2)
    assert curve.pauc(0.2) == pytest.approx(0.5 * 0.2, abs=1e-15)


def test_threshold_and_fnmr_at_fmr_by_hand():
    assert threshold_at_fmr(np.array(IMPOSTOR), 0.4) == 0.5
    # FMR exactly the target is allowed: at 0.3, 4/6.
    assert threshold_at_fmr(np.array(IMPOSTOR), 4 / 6) == 0.3
    # Ties at the top: at 0.3 FMR is 4/5 (> 0.3), at 0.9 it is 1/5.
    assert threshold_at_fmr(np.array([0.1, 0.3, 0.3, 0.3, 0.9]), 0.3) == 0.9
    # No observed score qualifies (FMR at the maximum is 2/2): just above the maximum.
    t = threshold_at_fmr(np.array([0.5, 0.5]), 0.4)
    assert t > 0.5 and t == np.nextafter(0.5, 1.0)
    similarity, genuine, _ = fixed_case()
    # t = 0.5; genuine .4 .5 .9 .3 -> .4 and .3 are below: 2/4.
    assert fnmr_at_fmr(similarity, genuine, 0.4) == 0.5


def test_pair_quality_is_elementwise_min():
    np.testing.assert_array_equal(pair_quality([1.0, 5.0, 2.0], [3.0, 4.0, 2.0]), [1.0, 4.0, 2.0])
    with pytest.raises(ValueError, match="same shape"):
        pair_quality([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(similarity=np.zeros(3)), "same length"),
        (dict(genuine=np.ones(10)), "boolean mask"),
        (dict(genuine=np.zeros(10, bool)), "no genuine"),
        (dict(genuine=np.ones(10, bool)), "no impostor"),
        (dict(similarity=np.r_[np.nan, np.zeros(9)]), "NaN"),
        (dict(pair_quality=np.r_[np.nan, np.zeros(9)]), "NaN"),
        (dict(fmr=0.0), "strictly between 0 and 1"),
        (dict(fmr=1.0), "strictly between 0 and 1"),
        (dict(protocol="iso"), "protocol must be one of"),
    ],
)
def test_edc_curve_input_errors(change, message):
    similarity, genuine, quality = fixed_case()
    kwargs = dict(similarity=similarity, genuine=genuine, pair_quality=quality, fmr=0.1, protocol="fixed")
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        edc_curve(**kwargs)


def test_pauc_and_threshold_input_errors():
    with pytest.raises(ValueError, match=r"limit must lie in \(0, 1\]"):
        pauc([0.0, 1.0], [0.1, 0.0], 0.0)
    with pytest.raises(ValueError, match=r"limit must lie in \(0, 1\]"):
        pauc([0.0, 1.0], [0.1, 0.0], 1.5)
    with pytest.raises(ValueError, match="method"):
        pauc([0.0, 1.0], [0.1, 0.0], 0.2, method="simpson")
    with pytest.raises(ValueError, match="same length"):
        pauc([0.0, 1.0], [0.1], 0.2)
    with pytest.raises(ValueError, match="ascending"):
        pauc([0.5, 0.0], [0.1, 0.2], 0.2)
    with pytest.raises(ValueError, match="strictly between"):
        threshold_at_fmr([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="NaN"):
        fnmr_at_fmr(np.array([0.1, np.nan]), np.array([True, False]), 0.1)


# Oracles: slow, written from the protocol text (not from experiments/edc.py).


def oracle_fixed(similarity, genuine, quality, fmr):
    impostors = [s for s, g in zip(similarity, genuine, strict=True) if not g]
    threshold = None
    for t in sorted(set(impostors)):
        if sum(s >= t for s in impostors) / len(impostors) <= fmr:
            threshold = t
            break
    if threshold is None:
        threshold = np.nextafter(max(impostors), np.inf)
    mated = [(q, s) for s, g, q in zip(similarity, genuine, quality, strict=True) if g]
    discard, fnmr = [], []
    for level in sorted({q for q, _ in mated}):
        kept = [s for q, s in mated if q >= level]
        discard.append((len(mated) - len(kept)) / len(mated))
        fnmr.append(sum(s < threshold for s in kept) / len(kept))
    return np.array(discard + [1.0]), np.array(fnmr + [0.0]), threshold


def oracle_recomputed(similarity, genuine, quality, fmr):
    count = len(similarity)
    order = np.argsort(quality)  # "the ascending pair-quality order", ties as numpy orders them
    fnmrs, thresholds = [], []
    for i in range(20):  # f = i * 0.05; i * P // 20 is floor(f * P) in exact arithmetic
        kept = order[i * count // 20 :]
        mated = [similarity[k] for k in kept if genuine[k]]
        impostors = [similarity[k] for k in kept if not genuine[k]]
        if not mated or not impostors:
            fnmrs.append(np.nan)
            thresholds.append(np.nan)
            continue
        best, best_gap = None, np.inf
        for t in sorted({similarity[k] for k in kept}):
            gap = abs(sum(s >= t for s in impostors) / len(impostors) - fmr)
            if gap < best_gap:  # strict: the lowest t wins ties
                best, best_gap = t, gap
        thresholds.append(best)
        fnmrs.append(sum(s <= best for s in mated) / len(mated))
    return np.array(fnmrs), np.array(thresholds)


def random_case(seed, pairs, quality_levels, score_levels):
    rng = np.random.default_rng(seed)
    genuine = rng.random(pairs) < 0.4
    genuine[:2] = [True, False]
    similarity = np.where(genuine, rng.normal(0.6, 0.2, pairs), rng.normal(0.2, 0.2, pairs))
    if score_levels:
        similarity = np.round(similarity * score_levels) / score_levels  # many tied scores
    quality_a, quality_b = rng.random(pairs), rng.random(pairs)
    if quality_levels:
        quality_a, quality_b = (np.floor(q * quality_levels) for q in (quality_a, quality_b))  # many ties
    return similarity, genuine, pair_quality(quality_a, quality_b)


# (pairs, quality levels, score levels); 0 = continuous, no ties
CASES = [
    (seed, pairs, quality_levels, score_levels)
    for seed, (pairs, quality_levels, score_levels) in enumerate([(60, 0, 0), (120, 4, 10), (200, 0, 5), (300, 12, 0)])
]


@pytest.mark.parametrize("seed, pairs, quality_levels, score_levels", CASES)
@pytest.mark.parametrize("fmr", [0.01, 0.1, 0.3])
def test_fixed_matches_oracle(seed, pairs, quality_levels, score_levels, fmr):
    similarity, genuine, quality = random_case(seed, pairs, quality_levels, score_levels)
    discard, fnmr, threshold = oracle_fixed(similarity, genuine, quality, fmr)
    curve = edc_curve(similarity, genuine, quality, fmr=fmr, protocol="fixed")
    np.testing.assert_array_equal(curve.discard, discard)
    np.testing.assert_array_equal(curve.fnmr, fnmr)
    assert curve.threshold[0] == threshold
    assert fnmr_at_fmr(similarity, genuine, fmr) == fnmr[0]


@pytest.mark.parametrize("seed, pairs, quality_levels, score_levels", CASES)
@pytest.mark.parametrize("fmr", [0.01, 0.1, 0.3])
def test_recomputed_matches_oracle(seed, pairs, quality_levels, score_levels, fmr):
    similarity, genuine, quality = random_case(seed, pairs, quality_levels, score_levels)
    fnmr, threshold = oracle_recomputed(similarity, genuine, quality, fmr)
    curve = edc_curve(similarity, genuine, quality, fmr=fmr, protocol="recomputed")
    np.testing.assert_array_equal(curve.discard, RECOMPUTED_DISCARD)
    np.testing.assert_array_equal(curve.threshold, threshold)
    # edc.py computes 1 - accepted / n (as erc.py does), the oracle rejected / n: equal up to rounding.
    np.testing.assert_allclose(curve.fnmr, fnmr, rtol=0, atol=1e-12)


def test_recomputed_fractions_cut_like_exact_arithmetic():
    # int(f * P) with the float fractions of np.arange(0, 0.98, 0.05) equals floor(i * P / 20) for
    # every P up to 20000, which is what the oracle relies on.
    for count in range(1, 20001, 7):
        cuts = (RECOMPUTED_DISCARD * count).astype(np.int64)
        np.testing.assert_array_equal(cuts, np.arange(20) * count // 20)
