"""Sanity demonstration of the ViTNT stability signal on a real trained model (NOT a face result).

    python -m experiments.demo_digits [--out DIR] [--seeds 0] [--steps 1200] [--batch-size 64]
        [--alpha 8] [--overwrite]

Offline, CPU, one seed by default (about a minute of training on a free core of a current x86 CPU):
scikit-learn's bundled 8x8 handwritten digits (`sklearn.datasets.load_digits`, 1,797 images, no
download) train a small `vitnt_jax.model.FaceViT` in the face-ViT layout (ReLU6 MLP, no qkv bias, no
class token; 4x4 grid of 2x2-pixel patches, 8 blocks, width 32) with a mean-pool -> Dense(10)
classifier on its final-normed tokens (`experiments.digits_vit`), by optax AdamW on a stratified
train split of 1,400 images. Plain training: no augmentation, no degraded image is ever seen.

The 397 held-out images are degraded at growing severity (level 0 = clean) and scored with the
library's own scorer (`vitnt_jax.scorer.Scorer`: uint8 RGB in, streaming score over all 8 blocks,
uniform mean over patches, alpha = 8 as in the paper). Degradations: Gaussian blur, additive
Gaussian noise, a square occluder set to the background (0), and a square occluder in ink colour
(16, the digits' stroke value). Two claims are measured:

  (a) mean quality falls as severity grows. Per degradation: `strictly_decreasing` (every step
      down), `heaviest_below_clean` and `spearman_severity_quality` (rank correlation of level and
      mean quality). Uniform background or ink patches are familiar token content: a background
      square on the 2x2 patch grid scores higher than the same square one pixel off it
      (`occlusion_grid_alignment`);
  (b) an error-versus-discard curve (EDC) on classification: pool the clean set once and every
      degraded copy, sort by quality, discard the lowest fraction f (0 .. 0.9); the error of the
      rest falls (error at f=0.5 below f=0, Spearman(f, error) <= -0.8) and lies below a random-
      order discard, which stays flat at the overall error (mean of 100 random orders).

The classifier's own confidence (max softmax) is drawn as a reference ordering: it reads the
trained head, which the stability score never does. Alpha does not decide these claims: q_p is
monotone in d_p (`alpha_1` in the output compares the rankings at alpha 1 and 8). Digits are not
faces and this model is no face recogniser: the demonstration shows that the signal behaves as the
method claims on a real trained ViT, nothing about face quality.

Writes DIR/demo_digits.json (every figure of every seed, the settings, the date and the machine)
and DIR/demo_digits.png/.pdf (the first seed's figure); refuses to replace them without --overwrite.
Training is deterministic for a given machine and thread count, but not across them: see
docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

TITLE = "Sanity demonstration on 8\u00d78 digits (not a face result)"
OUTPUTS = ("demo_digits.json", "demo_digits.png", "demo_digits.pdf")
PATCH_SIZE = 2  # experiments.digits_vit.CONFIG.patch_size (tested equal); here so --help needs no JAX

# Level 0 is the clean image. Units: blur sigma in pixels; noise std in grey levels of the
# dataset's 0..16 range; occlusion side of the square in pixels (of 8).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "blur": (0.0, 0.5, 0.75, 1.0, 1.5),
    "noise": (0.0, 1.5, 3.0, 4.5, 6.0),
    "occlusion": (0, 2, 3, 4, 5),  # square set to the background (0)
    "occlusion_ink": (0, 2, 3, 4, 5),  # square set to the stroke colour (16)
}
LABELS = {"occlusion": "occlusion, background fill", "occlusion_ink": "occlusion, ink fill"}
UNITS = {"blur": "\u03c3 px", "noise": "std /16", "occlusion": "side px", "occlusion_ink": "side px"}
FILL = {"occlusion": 0.0, "occlusion_ink": 16.0}
DISCARD = tuple(round(0.05 * i, 2) for i in range(19))  # 0.00 .. 0.90


def load_split(seed: int, test_size: int = 397) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (train images, test images, train labels, test labels); images (B, 8, 8) float32 in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images.astype(np.float32),
        digits.target.astype(np.int32),
        test_size=test_size,
        random_state=seed,
        stratify=digits.target,
    )
    return x_train, x_test, y_train, y_test


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """Returns (B, 8, 8, 3) uint8 RGB (grey replicated) from (B, 8, 8) grey levels 0..16."""
    grey = np.rint(np.clip(images, 0.0, 16.0) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def degrade(images: np.ndarray, kind: str, severity: float, seed: int) -> np.ndarray:
    """Returns a degraded copy of (B, 8, 8) grey images in 0..16; severity 0 returns them unchanged.

    Common random numbers: for one seed, every severity of a degradation uses the same noise field
    (scaled by the std) and the same occluder centre per image, so levels differ only in strength.
    """
    from scipy.ndimage import gaussian_filter

    out = images.astype(np.float32, copy=True)
    if severity == 0:
        return out
    rng = np.random.default_rng(seed)
    if kind == "blur":
        # Zero padding: the digits' own background is 0.
        return gaussian_filter(out, sigma=(0, severity, severity), mode="constant", cval=0.0)
    if kind == "noise":
        return np.clip(out + severity * rng.standard_normal(out.shape, dtype=np.float32), 0.0, 16.0)
    if kind in FILL:
        side, size = int(severity), images.shape[1]
        # Centre uniform over the image; the square is shifted to lie inside it.
        corners = np.clip(np.floor(rng.uniform(0, size, (len(out), 2)) - side / 2).astype(int), 0, size - side)
        for i, (r, c) in enumerate(corners):
            out[i, r : r + side, c : c + side] = FILL[kind]
        return out
    raise ValueError(f"unknown degradation {kind!r}; choose one of {', '.join(SEVERITIES)}.")


def edc(quality: np.ndarray, error: np.ndarray, fractions=DISCARD) -> np.ndarray:
    """Returns, per fraction f, the mean error of the samples left after discarding the lowest-quality f.

    Stable ascending sort by quality; exactly round(f * n) samples are discarded.
    """
    sorted_error = np.asarray(error, np.float64)[np.argsort(quality, kind="stable")]
    n = len(sorted_error)
    return np.array([sorted_error[int(round(f * n)) :].mean() for f in fractions])


def aligned_squares(images: np.ndarray, side: int, aligned: bool, seed: int) -> np.ndarray:
    """Returns images with a background square whose corner is on (or off) the 2x2 patch grid."""
    rng = np.random.default_rng(seed)
    out = images.astype(np.float32, copy=True)
    size, p = images.shape[1], PATCH_SIZE
    # Aligned corners: multiples of the patch size; misaligned: one pixel past them.
    corners = rng.integers(0, (size - side) // p + (1 if aligned else 0), (len(out), 2)) * p + (0 if aligned else 1)
    for i, (r, c) in enumerate(corners):
        out[i, r : r + side, c : c + side] = 0.0
    return out


def check_claims(result: dict[str, Any]) -> dict[str, Any]:
    """Returns the claim checks (see the module docstring) computed from a `run` result."""
    from scipy.stats import spearmanr

    per_degradation = {}
    for kind, q in result["mean_quality"].items():
        q = np.asarray(q)
        per_degradation[kind] = {
            "strictly_decreasing": bool(np.all(np.diff(q) < 0)),
            "heaviest_below_clean": bool(q[-1] < q[0]),
            "rises_at_levels": [i + 1 for i in np.flatnonzero(np.diff(q) >= 0).tolist()],
            "spearman_severity_quality": float(spearmanr(np.arange(len(q)), q).statistic),
        }
    f = np.asarray(result["discard_fractions"])
    curve, rand = np.asarray(result["edc_quality"]), np.asarray(result["edc_random_mean"])
    half = int(np.flatnonzero(np.isclose(f, 0.5))[0])
    later = f >= 0.1 - 1e-9
    return {
        "a_quality_falls_with_severity": per_degradation,
        "b_error_at_half_below_all": bool(curve[half] < curve[0]),
        "b_spearman_fraction_error": float(spearmanr(f, curve).statistic),
        "b_below_random_from_10pct": bool(np.all(curve[later] < rand[later])),
        "b_random_flat_max_abs_dev": float(np.max(np.abs(rand - rand[0]))),
    }


def run(
    seed: int = 0, steps: int = 1200, batch_size: int = 64, alpha: float = 8.0, random_orders: int = 100
) -> dict[str, Any]:
    """Returns every figure of the demonstration for one seed, as plain Python values (JSON-ready)."""
    import jax

    from experiments.digits_vit import CONFIG, classifier, train
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.stability import ScoreSettings, aggregate, patch_quality

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_split(seed)
    variables = train(to_uint8_rgb(x_train), y_train, seed=seed, steps=steps, batch_size=batch_size)
    train_seconds = time.perf_counter() - start

    probabilities = classifier(variables)
    blocks = tuple(range(CONFIG.depth))
    scorer = Scorer(
        CONFIG,
        {"params": variables["params"]["vit"]},
        ScoreSettings(blocks, alpha=alpha, aggregation="mean"),
        outputs=("quality", "patch_distance"),
        devices=jax.local_devices()[:1],
    )

    mean_quality: dict[str, list[float]] = {}
    accuracy: dict[str, list[float]] = {}
    pool: dict[str, list[np.ndarray]] = {"quality": [], "quality_alpha_1": [], "error": [], "confidence": []}
    clean_quality = None
    for k, (kind, levels) in enumerate(SEVERITIES.items()):
        mean_quality[kind], accuracy[kind] = [], []
        for level in levels:
            u8 = to_uint8_rgb(degrade(x_test, kind, level, seed=1000 * seed + k))
            scored = scorer(u8)
            quality = scored["quality"]
            probs = probabilities(u8)
            error = (probs.argmax(-1) != y_test).astype(np.float64)
            mean_quality[kind].append(float(quality.mean()))
            accuracy[kind].append(float(1.0 - error.mean()))
            if level == 0:
                if clean_quality is not None:
                    continue  # the clean set enters the pool once
                clean_quality, clean_error = quality, error
            pool["quality"].append(quality)
            # The same distances through the library's q_p and mean at alpha = 1 (sensitivity check).
            pool["quality_alpha_1"].append(np.asarray(aggregate(patch_quality(scored["patch_distance"], 1.0), None)))
            pool["error"].append(error)
            pool["confidence"].append(probs.max(-1))
    pool = {key: np.concatenate(value) for key, value in pool.items()}
    # Why background squares can score as well as clean: whole-patch squares leave only ordinary
    # background tokens, squares off the patch grid leave half-erased patches.
    grid = {
        f"side_{side}_{'aligned' if aligned else 'misaligned'}": float(
            scorer(to_uint8_rgb(aligned_squares(x_test, side, aligned, seed)))["quality"].mean()
        )
        for side in (2, 4)
        for aligned in (True, False)
    }

    curve = edc(pool["quality"], pool["error"])
    orders = np.random.default_rng(seed + 7)
    random_curves = np.stack([edc(orders.permutation(len(pool["error"])), pool["error"]) for _ in range(random_orders)])
    rank_8 = np.argsort(np.argsort(pool["quality"]))
    rank_1 = np.argsort(np.argsort(pool["quality_alpha_1"]))
    result = {
        "title": TITLE,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "alpha": alpha,
        "blocks": list(blocks),
        "aggregation": "mean",
        "config": json.loads(CONFIG.to_json()),
        "num_train": len(x_train),
        "num_test": len(x_test),
        "train_seconds": train_seconds,
        "clean_accuracy": accuracy["blur"][0],
        "severities": {kind: [float(s) for s in levels] for kind, levels in SEVERITIES.items()},
        "units": UNITS,
        "mean_quality": mean_quality,
        "accuracy": accuracy,
        "pool_size": len(pool["error"]),
        "pool_error": float(pool["error"].mean()),
        "discard_fractions": list(DISCARD),
        "edc_quality": curve.tolist(),
        "edc_random_mean": random_curves.mean(0).tolist(),
        "edc_random_std": random_curves.std(0).tolist(),
        "edc_confidence": edc(pool["confidence"], pool["error"]).tolist(),
        "edc_reversed_quality": edc(-pool["quality"], pool["error"]).tolist(),
        "edc_clean_only": edc(clean_quality, clean_error).tolist(),
        "occlusion_grid_alignment": {"clean": mean_quality["occlusion"][0], **grid},
        "alpha_1": {
            "edc_quality": edc(pool["quality_alpha_1"], pool["error"]).tolist(),
            "rank_correlation_with_alpha": float(np.corrcoef(rank_8, rank_1)[0, 1]),
        },
    }
    result["claims"] = check_claims(result)
    result["total_seconds"] = time.perf_counter() - start
    return result


def plot(result: dict[str, Any], path_stem: Path) -> list[Path]:
    """Writes the two-panel figure as PNG and PDF next to `path_stem`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, quality in result["mean_quality"].items():
        levels = ", ".join(f"{s:g}" for s in result["severities"][kind])
        label = f"{LABELS.get(kind, kind)} ({result['units'][kind]}: {levels})"
        left.plot(range(len(quality)), quality, marker="o", label=label)
    left.set_xlabel("severity level (0 = clean)")
    left.set_ylabel(f"mean stability quality Q (alpha = {result['alpha']:g})")
    left.set_title("(a) quality vs degradation severity")
    left.set_xticks(range(len(next(iter(result["severities"].values())))))
    left.legend(fontsize=7)

    f = np.asarray(result["discard_fractions"])
    mean, std = np.asarray(result["edc_random_mean"]), np.asarray(result["edc_random_std"])
    right.plot(f, result["edc_quality"], marker="o", ms=3, label="ViTNT stability (mean, all blocks)")
    right.plot(f, mean, color="grey", label="random discard (mean of 100 orders)")
    right.fill_between(f, mean - std, mean + std, color="grey", alpha=0.25)
    right.plot(f, result["edc_confidence"], ls="--", color="black", lw=1, label="classifier confidence (reference)")
    right.set_xlabel("fraction of lowest-quality images discarded")
    right.set_ylabel("classification error of the rest")
    right.set_title(f"(b) classification EDC, {result['pool_size']} pooled images")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    fig.suptitle(f"{TITLE}: seed {result['seed']}, clean accuracy {result['clean_accuracy']:.1%}")
    fig.tight_layout()
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def machine() -> dict[str, Any]:
    """Returns where and when the demonstration ran: date, CPU, threads, load, versions, XLA flags."""
    import importlib.metadata as metadata

    import jax

    cpu, isa = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
        isa = [name for name in ("avx2", "avx512f") if name in flags]
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu,
        "isa": isa,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # Other jobs on the machine slow training down (train_seconds), not change its figures.
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def summary(result: dict[str, Any]) -> str:
    """Returns a few lines for a person: accuracy, quality per severity, the EDC at 0, 50 and 90%."""
    f = result["discard_fractions"]
    at = {p: result["edc_quality"][f.index(p)] for p in (0.0, 0.5, 0.9)}
    lines = [
        f"seed {result['seed']}: clean accuracy {result['clean_accuracy']:.1%} "
        f"({result['steps']} training steps, {result['train_seconds']:.0f} s)",
        "  mean quality from clean to the heaviest level:",
    ]
    for kind, quality in result["mean_quality"].items():
        claim = result["claims"]["a_quality_falls_with_severity"][kind]
        trend = (
            "falls at every level" if claim["strictly_decreasing"] else f"rises at level(s) {claim['rises_at_levels']}"
        )
        lines.append(f"    {kind:<14} {' '.join(f'{q:.4f}' for q in quality)}  {trend}")
    lines.append(
        f"  error after discarding the lowest-quality images: {at[0.0]:.1%} (none), {at[0.5]:.1%} (50%), "
        f"{at[0.9]:.1%} (90%); random discard stays at {result['edc_random_mean'][f.index(0.5)]:.1%}; "
        f"classifier confidence: {result['edc_confidence'][f.index(0.5)]:.1%} at 50%"
    )
    return "\n".join(lines)


def spread(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the min and max over seeds of the headline figures."""
    half = results[0]["discard_fractions"].index(0.5)
    figures = {
        "clean_accuracy": [r["clean_accuracy"] for r in results],
        "edc_at_0": [r["edc_quality"][0] for r in results],
        "edc_at_50": [r["edc_quality"][half] for r in results],
    }
    return {"seeds": [r["seed"] for r in results], **{k: {"min": min(v), "max": max(v)} for k, v in figures.items()}}


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} must name at least one seed, each once")
    return seeds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser (building it imports no JAX)."""
    from vitnt_jax import cli  # the shared parser and error style; imports no JAX

    parser = cli.Parser(prog="python -m experiments.demo_digits", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_digits"),
        metavar="DIR",
        help="folder for demo_digits.json, .png and .pdf, created if needed (default: ./demo_digits)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=[0],
        metavar="LIST",
        help="comma-separated seeds, about a minute each; the figure shows the first (default: 0)",
    )
    parser.add_argument("--steps", type=_positive, default=1200, help="training steps (default: 1200)")
    parser.add_argument("--batch-size", type=_positive, default=64, help="training batch size (default: 64)")
    parser.add_argument("--alpha", type=float, default=8.0, help="q = 2/(1+exp(alpha*d)) (default: 8)")
    cli.add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the demonstration for each seed, writes the results, prints a short summary."""
    from vitnt_jax import cli

    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: _run(args), debug=args.debug, interrupted="interrupted; no result was written")


def _run(args: argparse.Namespace) -> int:
    from vitnt_jax.errors import UserError

    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite or choose another --out.")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out} is not a folder; choose another --out.")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        print(f"seed {seed}: training {args.steps} steps and scoring ...", file=sys.stderr, flush=True)
        results.append(run(seed=seed, steps=args.steps, batch_size=args.batch_size, alpha=args.alpha))
        print(summary(results[-1]), flush=True)
    document = {"title": TITLE, "machine": machine(), "runs": results}
    if len(results) > 1:
        document["spread"] = spread(results)
        s = document["spread"]
        print(
            f"over seeds {','.join(map(str, s['seeds']))}: clean accuracy {s['clean_accuracy']['min']:.1%} to "
            f"{s['clean_accuracy']['max']:.1%}; error at 50% discarded {s['edc_at_50']['min']:.1%} to "
            f"{s['edc_at_50']['max']:.1%} (none discarded: {s['edc_at_0']['min']:.1%} to {s['edc_at_0']['max']:.1%})"
        )
    (args.out / "demo_digits.json").write_text(json.dumps(document, indent=1) + "\n")
    paths = [args.out / "demo_digits.json", *plot(results[0], args.out / "demo_digits")]
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
