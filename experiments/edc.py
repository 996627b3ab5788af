"""Error-versus-discard curves (EDC/ERC), their partial areas (pAUC) and FNMR at a fixed FMR.

A quality assessment is judged by how fast the verification error falls when the comparisons of the
lowest quality are discarded. Each comparison (pair) has a similarity score (higher = more similar),
a genuine/impostor label and a pair quality, usually the lower of its two samples' qualities
(`pair_quality`). Two protocols are in use; they differ in where the decision threshold comes from
and in what is discarded, and they give different curves on the same data.

``protocol="fixed"`` (ISO/IEC 29794-1 style; the curve part follows dasec
``quality-assessment-evaluation/edc.py``, ``_compute_edc``)
    One threshold ``t`` is set once from all impostor comparisons: the lowest observed impostor
    similarity whose FMR (share of impostor scores ``>= t``) is at most the target (`threshold_at_fmr`).
    The curve then runs over the genuine comparisons only, in ascending pair quality. Comparisons of
    equal quality are discarded together, so there is one point per distinct quality level: its
    discard fraction is (genuine comparisons discarded) / (all genuine comparisons) and its FNMR is the
    share of the remaining genuine comparisons with similarity ``< t``. A last point (discard 1, FNMR 0)
    closes the curve, as in dasec's code. ``EdcCurve.threshold`` repeats ``t`` at every point.

``protocol="recomputed"`` (the ERC protocol of CR-FIQA, github.com/fdbtrs/CR-FIQA ``ERC/erc.py``
``getFNMRFixedTH`` with ``ERC/roc.py``)
    For each discard fraction ``f`` of ``np.arange(0, 0.98, 0.05)`` (0, 0.05, ..., 0.95) all pairs,
    genuine and impostor together, are put in ascending pair-quality order with ``np.argsort`` and the
    pairs from position ``int(f * P)`` on are kept (``P`` pairs in all). Equal qualities are *not* kept
    together: a cut may fall inside a run of equal quality, and the pairs of that run are then ordered
    as numpy's default argsort orders them (as in ``erc.py``). That order is deterministic for a given
    numpy build and input but not specified by numpy, so with tied pair qualities the curve may change
    between numpy builds or CPUs, in the reference code and here alike. Among the kept pairs the
    candidate thresholds are the distinct similarity scores (genuine and impostor); the one whose
    impostor FMR (share of kept impostor scores ``>= t``) is closest to the target is taken, the lowest
    on ties; FNMR is the share of kept genuine scores ``<= t`` (note ``<=``: the published code accepts
    a genuine comparison only when its distance is strictly below the threshold distance). A point
    whose kept pairs lack genuine or impostor comparisons has FNMR and threshold NaN (the reference code
    divides by zero there). ``EdcCurve.discard`` holds the nominal fractions ``f``. CR-FIQA scores
    pairs by the cosine distance ``arccos(cos) / pi``; pass its negation as similarity to reproduce its
    numbers bit for bit (the cosine itself gives the same curve up to ties that arccos creates).

`pauc` integrates a curve from discard 0 to a limit (0.2, 0.25 and 0.3 are the limits we report), as
the stepwise area of dasec's ``compute_edc_pauc`` or as the trapezoidal area that CR-FIQA reports
(``sklearn.metrics.auc`` over all ERC points, i.e. ``limit`` = the last discard fraction). Areas are
not normalised and no "theoretical best" area is subtracted.

Numpy only. ``python -m experiments.edc_reference_check`` runs the published codes beside these
functions and records their differences in ``experiments/results/edc_reference_check.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Protocol = Literal["fixed", "recomputed"]
PaucMethod = Literal["step", "trapezoid"]

PROTOCOLS: tuple[str, ...] = ("fixed", "recomputed")
PAUC_LIMITS: tuple[float, ...] = (0.2, 0.25, 0.3)
# Exactly the fractions of CR-FIQA's erc.py (`np.arange(0, 0.98, 0.05)`), float rounding included,
# so that int(f * P) cuts the same pairs as the published script.
RECOMPUTED_DISCARD = np.arange(0, 0.98, 0.05)
RECOMPUTED_DISCARD.setflags(write=False)


@dataclass(frozen=True)
class EdcCurve:
    """One error-versus-discard curve; all arrays have one entry per point and are read-only.

    Attributes:
      discard: fraction of comparisons discarded, ascending from 0. "fixed": genuine comparisons
        discarded / all genuine comparisons, one point per distinct pair quality plus a final 1.
        "recomputed": the nominal fractions 0, 0.05, ..., 0.95 of all pairs.
      fnmr: false non-match rate among the comparisons kept at that point (NaN where, under
        "recomputed", the kept pairs lack genuine or impostor comparisons).
      threshold: similarity threshold used at that point; under "fixed" the one global threshold
        repeated, under "recomputed" the threshold chosen from the kept pairs.
      threshold_fmr: impostor FMR (share of impostor scores >= threshold) at that threshold; over all
        impostors under "fixed", over the kept impostors under "recomputed", where it may exceed the
        target because the closest FMR is taken.
      protocol: "fixed" or "recomputed".
      fmr: the target FMR.
    """

    discard: np.ndarray
    fnmr: np.ndarray
    threshold: np.ndarray
    threshold_fmr: np.ndarray
    protocol: str
    fmr: float

    def __post_init__(self) -> None:
        for name in ("discard", "fnmr", "threshold", "threshold_fmr"):
            array = np.array(getattr(self, name), dtype=np.float64)
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    def pauc(self, limit: float, *, method: PaucMethod = "step") -> float:
        """Returns the area under this curve from discard 0 to `limit` (see `pauc`)."""
        return pauc(self.discard, self.fnmr, limit, method=method)


def pair_quality(quality_a: np.ndarray, quality_b: np.ndarray) -> np.ndarray:
    """Returns the quality of each comparison: the elementwise minimum of its two samples' qualities.

    Args:
      quality_a: (P,) quality of the first sample of each pair (higher = better).
      quality_b: (P,) quality of the second sample of each pair.
    """
    quality_a = np.asarray(quality_a, dtype=np.float64)
    quality_b = np.asarray(quality_b, dtype=np.float64)
    if quality_a.shape != quality_b.shape:
        raise ValueError(
            f"quality_a and quality_b must have the same shape; got {quality_a.shape} and {quality_b.shape}."
        )
    # The weaker sample limits the comparison: discarding samples by quality discards their pairs in
    # the order of this minimum.
    return np.minimum(quality_a, quality_b)


def _check_fmr(fmr: float) -> float:
    fmr = float(fmr)
    if not 0.0 < fmr < 1.0:
        raise ValueError(f"fmr must lie strictly between 0 and 1; got {fmr}.")
    return fmr


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {scores.shape}.")
    if np.isnan(scores).any():
        raise ValueError(f"{name} contains NaN; remove or fix those comparisons first.")
    return scores


def threshold_at_fmr(impostor_scores: np.ndarray, fmr: float) -> float:
    """Returns the lowest observed impostor similarity t whose FMR (share of impostor scores >= t) is <= fmr.

    When even the highest impostor score has a larger FMR (fewer than 1/fmr impostor comparisons, or
    ties at the top), no observed score qualifies; the threshold is then the next float above the
    highest impostor score, where the FMR is 0.

    Args:
      impostor_scores: (N,) similarity scores of impostor comparisons, higher = more similar.
      fmr: target false match rate, strictly between 0 and 1.
    """
    fmr = _check_fmr(fmr)
    scores = np.sort(_check_scores(impostor_scores, "impostor_scores"))
    values, first = np.unique(scores, return_index=True)
    # first[i] impostor scores lie below values[i], so the rest are >= it. FMR falls as t rises: the
    # first value that meets the target is the lowest.
    meets = (scores.size - first) / scores.size <= fmr
    if not meets.any():
        return float(np.nextafter(scores[-1], np.inf))
    return float(values[np.argmax(meets)])


def _check_pairs(
    similarity: np.ndarray, genuine: np.ndarray, quality: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    similarity = np.asarray(similarity)
    genuine = np.asarray(genuine)
    quality = np.asarray(quality)
    if not (
        similarity.ndim == genuine.ndim == quality.ndim == 1 and similarity.shape == genuine.shape == quality.shape
    ):
        raise ValueError(
            "similarity, genuine and pair_quality must be 1-D arrays of the same length; got shapes "
            f"{similarity.shape}, {genuine.shape} and {quality.shape}."
        )
    if genuine.dtype != np.bool_:
        raise ValueError(
            f"genuine must be a boolean mask (True for genuine pairs); got dtype {genuine.dtype}, "
            "convert labels with `labels == 1`."
        )
    if not genuine.any():
        raise ValueError("There are no genuine comparisons (genuine is all False); an FNMR needs some.")
    if genuine.all():
        raise ValueError("There are no impostor comparisons (genuine is all True); a threshold at an FMR needs some.")
    similarity = _check_scores(similarity, "similarity")
    quality = np.asarray(quality, dtype=np.float64)
    if np.isnan(quality).any():
        raise ValueError("pair_quality contains NaN; give those comparisons a quality or drop them.")
    return similarity, genuine, quality


def fnmr_at_fmr(similarity: np.ndarray, genuine: np.ndarray, fmr: float) -> float:
    """Returns the FNMR (share of genuine scores < t) at t = `threshold_at_fmr` of the impostor scores.

    This is the "fixed" curve's value at discard 0.

    Args:
      similarity: (P,) similarity score of each comparison, higher = more similar.
      genuine: (P,) bool, True for genuine (mated) comparisons.
      fmr: target false match rate, strictly between 0 and 1.
    """
    similarity, genuine, _ = _check_pairs(similarity, genuine, np.zeros(np.shape(similarity)))
    threshold = threshold_at_fmr(similarity[~genuine], fmr)
    return float(np.count_nonzero(similarity[genuine] < threshold) / np.count_nonzero(genuine))


def _fixed_curve(similarity: np.ndarray, genuine: np.ndarray, quality: np.ndarray, fmr: float) -> EdcCurve:
    impostors = similarity[~genuine]
    threshold = threshold_at_fmr(impostors, fmr)
    threshold_fmr = np.count_nonzero(impostors >= threshold) / impostors.size
    # The order inside a run of equal quality does not matter: runs are discarded whole.
    order = np.argsort(quality[genuine], kind="stable")
    scores, levels = similarity[genuine][order], quality[genuine][order]
    count = scores.size
    # errors_from[i]: false non-matches among the comparisons at sorted positions i, i+1, ...
    errors_from = np.cumsum((scores < threshold)[::-1])[::-1]
    starts = np.concatenate(([0], np.flatnonzero(levels[1:] != levels[:-1]) + 1))
    discard = starts / count
    fnmr = errors_from[starts] / (count - starts)
    # The last run always remains at its own start, so discard 1 is never reached; close the curve.
    discard = np.append(discard, 1.0)
    fnmr = np.append(fnmr, 0.0)
    return EdcCurve(
        discard=discard,
        fnmr=fnmr,
        threshold=np.full(discard.shape, threshold),
        threshold_fmr=np.full(discard.shape, threshold_fmr),
        protocol="fixed",
        fmr=fmr,
    )


def _recomputed_curve(similarity: np.ndarray, genuine: np.ndarray, quality: np.ndarray, fmr: float) -> EdcCurve:
    count = similarity.size
    # The default (unstable) argsort, as in erc.py: it decides which of several equal-quality pairs
    # fall on either side of a cut.
    rank = np.empty(count, dtype=np.int64)
    rank[np.argsort(quality)] = np.arange(count)
    # Sort by similarity once; each kept subset is then a mask of this order and stays sorted.
    by_score = np.argsort(similarity, kind="stable")
    scores, is_genuine, score_rank = similarity[by_score], genuine[by_score], rank[by_score]
    starts = (RECOMPUTED_DISCARD * count).astype(np.int64)  # int(f * P) of erc.py
    fnmr = np.full(starts.shape, np.nan)
    threshold = np.full(starts.shape, np.nan)
    threshold_fmr = np.full(starts.shape, np.nan)
    for i, start in enumerate(starts):
        kept = score_rank >= start
        kept_scores, kept_genuine = scores[kept], is_genuine[kept]
        genuine_scores, impostor_scores = kept_scores[kept_genuine], kept_scores[~kept_genuine]
        if genuine_scores.size == 0 or impostor_scores.size == 0:
            continue
        candidates = kept_scores[np.concatenate(([True], kept_scores[1:] != kept_scores[:-1]))]
        false_matches = impostor_scores.size - np.searchsorted(impostor_scores, candidates, side="left")
        rates = false_matches / impostor_scores.size
        best = np.argmin(np.abs(rates - fmr))  # first = lowest threshold on ties, as roc.py's argmin
        threshold[i], threshold_fmr[i] = candidates[best], rates[best]
        accepted = genuine_scores.size - np.searchsorted(genuine_scores, candidates[best], side="right")
        # 1 - accepted / n rather than rejected / n: the same float operations as erc.py.
        fnmr[i] = 1 - accepted / genuine_scores.size
    return EdcCurve(
        discard=RECOMPUTED_DISCARD,
        fnmr=fnmr,
        threshold=threshold,
        threshold_fmr=threshold_fmr,
        protocol="recomputed",
        fmr=fmr,
    )


def edc_curve(
    similarity: np.ndarray,
    genuine: np.ndarray,
    pair_quality: np.ndarray,
    *,
    fmr: float,
    protocol: Protocol,
) -> EdcCurve:
    """Returns the error-versus-discard curve (FNMR against discarded fraction) of one quality measure.

    See the module docstring for the two protocols.

    Args:
      similarity: (P,) similarity score of each comparison, higher = more similar (negate distances).
      genuine: (P,) bool, True for genuine (mated) comparisons, False for impostor ones.
      pair_quality: (P,) quality of each comparison, higher = better; usually `pair_quality(q_a, q_b)`.
        Only the genuine comparisons' qualities matter under "fixed".
      fmr: target false match rate, strictly between 0 and 1 (e.g. 1e-3 or 1e-4).
      protocol: "fixed" (one threshold from all impostors) or "recomputed" (CR-FIQA's ERC: a threshold
        per discard fraction from the kept pairs).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}.")
    fmr = _check_fmr(fmr)
    similarity, genuine, quality = _check_pairs(similarity, genuine, pair_quality)
    if protocol == "fixed":
        return _fixed_curve(similarity, genuine, quality, fmr)
    return _recomputed_curve(similarity, genuine, quality, fmr)


def pauc(discard: np.ndarray, fnmr: np.ndarray, limit: float, *, method: PaucMethod = "step") -> float:
    """Returns the area under an error-versus-discard curve from its first point to discard `limit`.

    "step" (default; dasec's ``compute_edc_pauc``): each point's FNMR holds until the next point's
    discard fraction, and the last point's holds up to `limit`. "trapezoid": straight lines between
    points, the curve being cut at `limit` by linear interpolation; beyond the last point it is flat.
    With `limit` equal to the last discard fraction this is ``sklearn.metrics.auc`` of all points, the
    ERC AUC that CR-FIQA reports. The area is not normalised: divide by `limit` for the mean FNMR over
    [0, limit]. Points beyond `limit` are ignored, so NaN points there do not matter.

    Args:
      discard: (K,) discard fractions, non-decreasing, starting at 0 for curves from `edc_curve`.
      fnmr: (K,) error at each point.
      limit: upper end of the integral, in (0, 1]; 0.2, 0.25 and 0.3 are usual.
      method: "step" or "trapezoid".
    """
    discard = np.asarray(discard, dtype=np.float64)
    fnmr = np.asarray(fnmr, dtype=np.float64)
    if discard.ndim != 1 or discard.shape != fnmr.shape or discard.size == 0:
        raise ValueError(
            f"discard and fnmr must be non-empty 1-D arrays of the same length; got {discard.shape} and {fnmr.shape}."
        )
    if np.any(np.diff(discard) < 0):
        raise ValueError("discard must be sorted in ascending order.")
    limit = float(limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"limit must lie in (0, 1]; got {limit}.")
    if method == "step":
        # The point whose step reaches the limit: the first whose successor lies at or beyond it.
        last = min(int(np.searchsorted(discard[1:], limit, side="left")), discard.size - 1)
        widths = np.append(discard[1 : last + 1] - discard[:last], limit - discard[last])
        # cumsum adds left to right like dasec's loop (np.sum would add pairwise and may differ in the
        # last bit).
        return float(np.cumsum(fnmr[: last + 1] * widths)[-1])
    if method == "trapezoid":
        inside = discard < limit
        x = np.append(discard[inside], limit)
        y = np.append(fnmr[inside], np.interp(limit, discard, fnmr))
        # The expression of np.trapezoid (used by sklearn.metrics.auc), so full-curve areas agree bitwise.
        return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())
    raise ValueError(f"method must be 'step' or 'trapezoid'; got {method!r}.")
