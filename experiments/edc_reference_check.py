"""Run the published EDC/ERC codes beside `experiments.edc` on the same inputs and record the differences.

    python -m experiments.edc_reference_check --mirror /work/.mirror [--out PATH] [--large 100000]

MIRROR is a folder holding git snapshots of github.com/fdbtrs/CR-FIQA and
github.com/dasec/quality-assessment-evaluation (as `fdbtrs+CR-FIQA/repo` and
`dasec+quality-assessment-evaluation/repo`, the layout of the `fetch` tool; plain clones named
`CR-FIQA` and `quality-assessment-evaluation` work too). At run time we extract their
`ERC/erc.py`, `ERC/roc.py` and `edc.py` with `git show` into a temporary folder and import them as
they are; nothing of them is copied here. One patch: roc.py compares dtypes with `np.int`, which
NumPy 1.24 removed, so we set `numpy.int = int` (what it was, an alias of the builtin) before
importing it.

- "recomputed": CR-FIQA's `getFNMRFixedTH` gets embeddings and computes cosine distances itself;
  we give `edc_curve` the negated distances of its own `distance_` as similarities (negation is
  exact), and record the thresholds it picks by wrapping its `get_eer_threshold`. Their ERC AUC is
  `sklearn.metrics.auc` over the curve as in their `save_pdf`.
- "fixed": dasec's `compute_edc` has no FMR threshold search (it takes a threshold or a quantile), so
  it gets the threshold from our `threshold_at_fmr`; its FMR curve (`EdcErrorType.FMR`) at discard 0
  checks that this threshold meets the target and that the next lower impostor score would not.
  pAUC: dasec's `compute_edc_pauc` on both protocols' curves.

Cases mix random and adversarial inputs: few quality levels (many ties, runs cut by the recomputed
protocol), few distinct embeddings (many tied similarities), small and 1e5 pairs, FMR 1e-3 and 1e-4.
Prints and writes the largest absolute differences (0 means bitwise equal).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.edc import PAUC_LIMITS, edc_curve, pair_quality, pauc

CRFIQA_NAMES = ("fdbtrs+CR-FIQA/repo", "CR-FIQA")
DASEC_NAMES = ("dasec+quality-assessment-evaluation/repo", "quality-assessment-evaluation")
FMRS = (1e-3, 1e-4)  # erc.py computes 1e-2, 1e-3 and 1e-4 together; these are the ones we report


def _git_dir(mirror: Path, names: tuple[str, ...], source: str) -> Path:
    for name in names:
        path = mirror / name
        if (path / ".git").is_dir():  # a plain clone
            return path / ".git"
        if path.is_dir():
            return path
    raise SystemExit(f"No snapshot of {source} under {mirror}: fetch or clone it there (as {names[0]}) first.")


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def _load_references(mirror: Path, workdir: Path) -> tuple[object, object, dict]:
    crfiqa, dasec = _git_dir(mirror, CRFIQA_NAMES, "CR-FIQA"), _git_dir(mirror, DASEC_NAMES, "dasec EDC")
    (workdir / "ERC").mkdir()
    for name in ("ERC/erc.py", "ERC/roc.py"):
        (workdir / name).write_text(_git(crfiqa, "show", f"HEAD:{name}"))
    (workdir / "dasec_edc.py").write_text(_git(dasec, "show", "HEAD:edc.py"))
    np.int = int  # roc.py lines 25/28 use the alias NumPy 1.24 removed
    import matplotlib

    matplotlib.use("Agg")  # erc.py imports pyplot at module level
    sys.path.insert(0, str(workdir))  # erc.py imports `ERC.roc`
    erc = importlib.import_module("ERC.erc")
    spec = importlib.util.spec_from_file_location("dasec_edc", workdir / "dasec_edc.py")
    dasec_edc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dasec_edc)
    commits = {
        "fdbtrs/CR-FIQA": _git(crfiqa, "rev-parse", "HEAD").strip(),
        "dasec/quality-assessment-evaluation": _git(dasec, "rev-parse", "HEAD").strip(),
    }
    return erc, dasec_edc, commits


def _make_case(rng: np.random.Generator, pairs: int, samples: int, quality_levels: int | None, embeddings: int | None):
    """Returns sample embeddings/qualities and pairs (a, b, genuine): genuine pairs share an identity, impostors not."""
    dim = 16
    identities = rng.integers(0, max(samples // 4, 2), samples)
    if embeddings is None:
        centres = rng.normal(size=(identities.max() + 1, dim))
        features = centres[identities] + 0.9 * rng.normal(size=(samples, dim))
        vector = np.arange(samples)
    else:
        # Few distinct vectors, so pairs share exactly the same distance: an identity mostly keeps
        # its vector (genuine distance ~0, all bitwise equal), sometimes takes the next one.
        prototypes = rng.normal(size=(embeddings, dim))
        vector = (identities + (rng.random(samples) < 0.25)) % embeddings
        features = prototypes[vector]
    if quality_levels is None:
        quality = rng.random(samples)
    else:
        quality = rng.integers(0, quality_levels, samples).astype(np.float64)
    by_identity = {i: np.flatnonzero(identities == i) for i in np.unique(identities)}
    a = rng.integers(0, samples, pairs)
    genuine = (rng.random(pairs) < 0.3) & np.array([by_identity[identities[i]].size > 1 for i in a])
    # With few vectors, 5e-4 of the impostor pairs share a vector (tied with many genuine pairs): an
    # FMR between the two targets, so neither threshold is trivial.
    colliding = ~genuine & (rng.random(pairs) < (5e-4 if embeddings else 0.0))
    b = np.empty_like(a)
    for k in range(pairs):
        if genuine[k]:
            mates = by_identity[identities[a[k]]]
            b[k] = rng.choice(mates[mates != a[k]])
            continue
        while True:
            b[k] = rng.integers(0, samples)
            if identities[b[k]] != identities[a[k]] and (vector[b[k]] == vector[a[k]]) == colliding[k]:
                break
    return features, quality, a, b, genuine


def _dasec_fmr(dasec_edc, impostor_scores: np.ndarray, threshold: float) -> float:
    """Returns the FMR at `threshold` by dasec's FMR-EDC at discard 0 (its share of impostor scores >= threshold)."""
    unused = {"quality_score": 0.0}
    impostors = [{"samples": (unused, unused), "similarity_score": s} for s in impostor_scores]
    curve = dasec_edc.compute_edc(dasec_edc.EdcErrorType.FMR, impostors, similarity_score_threshold=threshold)
    return float(curve["error_fractions"][0])


def _run_case(erc, dasec_edc, rng, *, pairs, samples, quality_levels, embeddings) -> dict:
    features, quality, a, b, genuine = _make_case(rng, pairs, samples, quality_levels, embeddings)
    # erc.py reads the pair quality as min(quality_a, quality_b) in load_quality_pair
    qlts = [min(float(quality[i]), float(quality[j])) for i, j in zip(a, b, strict=True)]
    feat_pairs = {k: [features[a[k]], features[b[k]], int(genuine[k])] for k in range(pairs)}
    distance = erc.distance_(features[a].astype(np.float64), features[b].astype(np.float64), dist="cosine")
    similarity = -distance
    ours_quality = pair_quality(quality[a], quality[b])

    # CR-FIQA records the distance thresholds it picks at each discard fraction.
    picked = []
    original = erc.get_eer_threshold

    def recording(gen_scores, imp_scores, *args, **kwargs):
        thresholds = original(gen_scores, imp_scores, *args, **kwargs)
        picked.append(thresholds)
        return thresholds

    erc.get_eer_threshold = recording
    try:
        start = time.perf_counter()
        _, fnmr3, fnmr4, rates = erc.getFNMRFixedTH(feat_pairs, qlts, dist_type="cosine", desc=True)
        reference_seconds = time.perf_counter() - start
    finally:
        erc.get_eer_threshold = original
    picked = np.array(picked, dtype=np.float64)  # (20, 3): FMR 1e-2, 1e-3, 1e-4
    theirs = {1e-3: (np.array(fnmr3), -picked[:, 1]), 1e-4: (np.array(fnmr4), -picked[:, 2])}

    from sklearn import metrics

    result = {
        "pairs": pairs,
        "genuine": int(genuine.sum()),
        "distinct_pair_qualities": int(np.unique(ours_quality).size),
        "distinct_similarities": int(np.unique(similarity).size),
        "reference_seconds": round(reference_seconds, 3),
    }
    for fmr in FMRS:
        start = time.perf_counter()
        ours = edc_curve(similarity, genuine, ours_quality, fmr=fmr, protocol="recomputed")
        ours_seconds = time.perf_counter() - start
        ref_fnmr, ref_threshold = theirs[fmr]
        # save_pdf: x = (100 * np.arange(0, 0.98, 0.05)) / 100, y = the FNMR list
        ref_auc = metrics.auc(np.array(100 * rates / 100), ref_fnmr)
        our_auc = pauc(ours.discard, ours.fnmr, ours.discard[-1], method="trapezoid")
        ref_curve = {"discard_fractions": np.asarray(rates), "error_fractions": ref_fnmr}
        recomputed = {
            "seconds": round(ours_seconds, 4),
            "max_abs_diff_fnmr": float(np.max(np.abs(ours.fnmr - ref_fnmr))),
            "max_abs_diff_threshold": float(np.max(np.abs(ours.threshold - ref_threshold))),
            "max_abs_diff_discard": float(np.max(np.abs(ours.discard - rates))),
            "abs_diff_erc_auc_vs_sklearn": abs(our_auc - float(ref_auc)),
            # Their x is 100 * f / 100, which is not always f in floats; on the same x the areas agree.
            "abs_diff_erc_auc_vs_sklearn_same_x": abs(
                pauc(100 * rates / 100, ours.fnmr, (100 * rates / 100)[-1], method="trapezoid") - float(ref_auc)
            ),
            "max_abs_diff_pauc_step_vs_dasec": max(
                abs(ours.pauc(limit) - float(dasec_edc.compute_edc_pauc(ref_curve, limit))) for limit in PAUC_LIMITS
            ),
            "fnmr_at_0": float(ours.fnmr[0]),
        }
        # Not a comparison: how much the protocol itself depends on the order of equal-quality pairs
        # (the same pairs listed backwards reorder numpy's argsort ties). 0 when pair qualities are distinct.
        backwards = edc_curve(similarity[::-1], genuine[::-1], ours_quality[::-1], fmr=fmr, protocol="recomputed")
        recomputed["input_order_sensitivity_max_abs_fnmr"] = float(np.nanmax(np.abs(backwards.fnmr - ours.fnmr)))

        fixed = edc_curve(similarity, genuine, ours_quality, fmr=fmr, protocol="fixed")
        threshold = float(fixed.threshold[0])
        mated = [
            {
                "samples": ({"quality_score": quality[a[k]]}, {"quality_score": quality[b[k]]}),
                "similarity_score": similarity[k],
            }
            for k in np.flatnonzero(genuine)
        ]
        reference = dasec_edc.compute_edc(dasec_edc.EdcErrorType.FNMR, mated, similarity_score_threshold=threshold)
        impostors = np.sort(similarity[~genuine])

        fmr_at_threshold = _dasec_fmr(dasec_edc, impostors, threshold)
        lower = impostors[impostors < threshold]
        same_shape = reference["discard_fractions"].shape == fixed.discard.shape
        fixed_result = {
            "points": int(fixed.discard.size),
            "threshold": threshold,
            "threshold_is_impostor_score": bool(np.isin(threshold, impostors)),
            "threshold_fmr_dasec": fmr_at_threshold,
            "threshold_meets_target": fmr_at_threshold <= fmr,
            "next_lower_impostor_score_fails": bool(
                lower.size == 0 or _dasec_fmr(dasec_edc, impostors, lower[-1]) > fmr
            ),
            # A different number of points is a difference too; it shows as inf.
            "max_abs_diff_fnmr": float(np.max(np.abs(fixed.fnmr - reference["error_fractions"])))
            if same_shape
            else np.inf,
            "max_abs_diff_discard": (
                float(np.max(np.abs(fixed.discard - reference["discard_fractions"]))) if same_shape else np.inf
            ),
            "max_abs_diff_pauc_step_vs_dasec": max(
                abs(fixed.pauc(limit) - float(dasec_edc.compute_edc_pauc(reference, limit))) for limit in PAUC_LIMITS
            ),
        }
        result[f"fmr={fmr:g}"] = {"recomputed": recomputed, "fixed": fixed_result}
    return result


CASES = {
    "random_small": dict(pairs=3000, samples=1500, quality_levels=None, embeddings=None),
    "quality_ties": dict(pairs=6000, samples=2000, quality_levels=7, embeddings=None),
    "similarity_ties": dict(pairs=6000, samples=2000, quality_levels=None, embeddings=12),
    "both_ties": dict(pairs=8000, samples=3000, quality_levels=4, embeddings=9),
    "tiny_both_ties": dict(pairs=200, samples=60, quality_levels=3, embeddings=5),
}


def _worst(results: dict, key: str) -> float:
    values = []
    for case in results.values():
        for name, entry in case.items():
            if name.startswith("fmr="):
                for protocol in entry.values():
                    if key in protocol:
                        values.append(protocol[key])
    return max(values)


class _UserError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    """Runs the check; returns the exit status (0 ok, 1 user error, 2 bad flags)."""
    from vitnt_jax import cli

    parser = cli.Parser(prog="python -m experiments.edc_reference_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, required=True, help="folder with the CR-FIQA and dasec snapshots")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "edc_reference_check.json",
        help="the JSON record (default: experiments/results/edc_reference_check.json)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (the committed record)")
    parser.add_argument("--large", type=int, default=100_000, help="pairs in the large case (0 to skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases (default: 0)")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run_command(lambda: _check(args), debug=args.debug, errors=(_UserError,))


def _check(args: argparse.Namespace) -> int:
    if not args.mirror.is_dir():
        raise _UserError(f"--mirror {args.mirror} is not a folder; fetch the CR-FIQA and dasec repositories there.")
    if args.out.exists() and not args.overwrite:
        raise _UserError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out.")

    cases = dict(CASES)
    if args.large:
        cases["large_quality_ties"] = dict(
            pairs=args.large, samples=args.large // 2, quality_levels=50, embeddings=None
        )
    with tempfile.TemporaryDirectory() as workdir:
        erc, dasec_edc, commits = _load_references(args.mirror, Path(workdir))
        rng = np.random.default_rng(args.seed)
        results = {}
        for name, spec in cases.items():
            results[name] = _run_case(erc, dasec_edc, rng, **spec)
            print(name, json.dumps(results[name]))

    # Speed of the vectorised recomputed protocol on 1e6 pairs (no reference run: theirs takes minutes).
    rng = np.random.default_rng(args.seed + 1)
    genuine = rng.random(1_000_000) < 0.1
    similarity = np.where(genuine, rng.normal(0.6, 0.15, genuine.size), rng.normal(0.0, 0.1, genuine.size))
    start = time.perf_counter()
    edc_curve(similarity, genuine, rng.random(genuine.size), fmr=1e-4, protocol="recomputed")
    seconds_1e6 = time.perf_counter() - start

    summary = {
        "max_abs_diff_fnmr": _worst(results, "max_abs_diff_fnmr"),
        "max_abs_diff_threshold": _worst(results, "max_abs_diff_threshold"),
        "max_abs_diff_discard": _worst(results, "max_abs_diff_discard"),
        "max_abs_diff_pauc_step_vs_dasec": _worst(results, "max_abs_diff_pauc_step_vs_dasec"),
        "max_abs_diff_erc_auc_vs_sklearn": _worst(results, "abs_diff_erc_auc_vs_sklearn"),
        "max_abs_diff_erc_auc_vs_sklearn_same_x": _worst(results, "abs_diff_erc_auc_vs_sklearn_same_x"),
        "fixed_threshold_checks_pass": all(
            entry["fixed"]["threshold_meets_target"] and entry["fixed"]["next_lower_impostor_score_fails"]
            for case in results.values()
            for name, entry in case.items()
            if name.startswith("fmr=")
        ),
        "recomputed_input_order_sensitivity_max_abs_fnmr": _worst(results, "input_order_sensitivity_max_abs_fnmr"),
        "recomputed_seconds_1e6_pairs": round(seconds_1e6, 3),
    }
    report = {
        "references": commits,
        "numpy": np.__version__,
        "summary": summary,
        "cases": results,
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
