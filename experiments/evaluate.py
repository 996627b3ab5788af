"""EDC evaluation from files alone: quality files x embeddings x benchmark protocols -> tables and figures.

    python -m experiments.evaluate \\
        --benchmark lfw=bin:data/lfw.bin --benchmark adience=identities:data/adience.txt \\
        --quality ViTNT-FIQA=scores/{benchmark}.csv --quality CR-FIQA=crfiqa/CRFIQAL_{benchmark}.txt \\
        --embeddings ArcFace=emb/{benchmark}_arcface.npy \\
        --out results/edc

For every benchmark, FR model (embeddings), quality method, EDC protocol and FMR this writes one curve and
its pAUC values to ``results.json`` and ``results.csv``, and one figure per FR model, protocol and FMR
(``edc_<model>_<protocol>_fmr<fmr>.png`` and ``.pdf``): a panel per benchmark, a line per method, the pAUC at
``--figure-limit`` in the legend, laid out like the paper's figures.

Quality files: our CSV (``python -m vitnt_jax.score``: columns id, quality, ..., error; rows with an error have
no quality) or the text format of the authors' and CR-FIQA's scripts (``<image path> <quality>`` per line,
also our ``--format reference``). Embedding files: ``.npy`` of shape (n, E) with its ids in ``<file>.ids.txt``
(as ``python -m experiments.embeddings`` writes) or given as ``FILE.npy@IDS`` (a text file of ids, or our
score CSV whose rows the ``.npy`` follows, as ``--save-embeddings`` writes); without ids the rows must follow
the benchmark's own image order. A folder instead holds one ``<image stem>.npy`` per image (CR-FIQA's layout).
Images are matched by id, file name, file stem or number (see ``experiments.protocols``). An image without a
quality counts as the lowest quality; an image without an embedding as a failed comparison (non-match).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import edc, protocols
from experiments.protocols import Protocol, ProtocolError
from vitnt_jax import cli, output

log = logging.getLogger(__name__)

DEFAULT_FMRS = (1e-3, 1e-4)
RESULT_FILES = ("results.json", "results.csv")
DEFAULT_LIMITS = (0.2, 0.25, 0.3)


class EvaluationError(ValueError):
    """A user-supplied file or flag is wrong; the message is one sentence naming it and the fix."""


# ------------------------------------------------------------------------------------------------ input files


def read_quality(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Returns (keys, qualities) from a quality file: our score CSV or `<path> <quality>` text lines.

    Read by `vitnt_jax.output.read_results` (the scorer's own formats). Rows of our CSV that carry
    an error (no quality) and values written as `nan` give NaN.
    """
    path = Path(path)
    try:
        rows = output.read_results(path)
    except output.OutputError as error:
        if not path.exists():
            raise EvaluationError(f"quality file {path} does not exist; check the --quality pattern.") from error
        raise EvaluationError(f"quality file {error.render({'out': 'path'})}") from error
    keys = [r.id for r in rows]
    if not keys:
        raise EvaluationError(f"quality file {path} holds no qualities.")
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"quality file {path} names an image twice; each image must appear once.")
    return keys, np.asarray([math.nan if r.quality is None else r.quality for r in rows], np.float64)


def align_quality(protocol: Protocol, keys: list[str], values: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Returns (per-image qualities in protocol order, NaN where missing; number of file rows matching nothing)."""
    where = protocols.match_ids(protocol, keys)
    hit = where >= 0
    if not hit.any():
        raise EvaluationError(
            f"{what} names none of the {len(protocol.ids)} images of benchmark {protocol.name}; "
            "it belongs to another benchmark, or its ids differ."
        )
    if len(np.unique(where[hit])) != hit.sum():
        raise EvaluationError(f"{what} names some image of benchmark {protocol.name} twice (under different names).")
    out = np.full(len(protocol.ids), np.nan)
    out[where[hit]] = values[hit]
    return out, int((~hit).sum())


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise EvaluationError(f"ids file {path} does not exist; check the @IDS part of --embeddings.") from error
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise EvaluationError(f"ids file {path} is not a text file; pass a list of ids or our score CSV.") from error
    if output.CSV.matches(text):
        try:
            return [row.id for row in output.read_results(path, "csv")]
        except output.OutputError as error:
            raise EvaluationError(f"ids file {error.render({'out': 'path'})}") from error
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise EvaluationError(f"embedding file {path} does not exist; check the --embeddings pattern.") from error
    except (ValueError, EOFError, OSError) as error:
        raise EvaluationError(f"embedding file {path} is not a plain .npy array; save it with numpy.save.") from error


@dataclass(frozen=True)
class Embeddings:
    """Returns nothing: (n_images, E) embeddings in protocol order (NaN rows where missing), rows matching nothing."""

    array: np.ndarray
    unmatched_rows: int


def _place(protocol: Protocol, keys: list[str], rows: np.ndarray, what: str) -> Embeddings:
    where = protocols.match_ids(protocol, keys)
    hit = where >= 0
    if not hit.any():
        raise EvaluationError(f"{what} names none of the images of benchmark {protocol.name}; check its ids.")
    if len(np.unique(where[hit])) != hit.sum():
        raise EvaluationError(f"{what} names some image of benchmark {protocol.name} twice (under different names).")
    out = np.full((len(protocol.ids), rows.shape[1]), np.nan)
    out[where[hit]] = rows[hit]
    return Embeddings(out, int((~hit).sum()))


def read_embeddings(spec: str, protocol: Protocol) -> Embeddings:
    """Returns the embeddings of `spec` in protocol order (NaN rows where an image has none).

    spec: `FILE.npy`, `FILE.npy@IDS` or a folder of `<name>.npy` files, matched like ids (see the module
    docstring).
    """
    path_text, _, ids_text = spec.partition("@")
    path = Path(path_text)
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise EvaluationError(f"embedding folder {path} holds no .npy files.")
        rows = [_load_npy(f).reshape(-1) for f in files]
        if len({len(r) for r in rows}) != 1:
            raise EvaluationError(f"embedding folder {path} mixes embedding widths; one model per folder.")
        return _place(protocol, [f.stem for f in files], np.stack(rows).astype(np.float64), f"embedding folder {path}")
    array = _load_npy(path)
    if array.ndim != 2 or array.shape[0] == 0:
        raise EvaluationError(f"embedding file {path} has shape {array.shape}; it must be (images, width).")
    ids_file = Path(ids_text) if ids_text else path.with_suffix(".ids.txt")
    if ids_file.exists() or ids_text:
        keys = _read_ids(ids_file)
        if len(keys) != len(array):
            raise EvaluationError(f"{ids_file} lists {len(keys)} ids but {path} has {len(array)} rows; pair them up.")
        return _place(protocol, keys, array.astype(np.float64), f"ids file {ids_file}")
    if len(array) != len(protocol.ids):
        raise EvaluationError(
            f"embedding file {path} has {len(array)} rows but benchmark {protocol.name} has {len(protocol.ids)} "
            f"images; add ids as {path}@IDS or {ids_file.name}."
        )
    return Embeddings(array.astype(np.float64), 0)


# --------------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Curve:
    """Returns nothing: one EDC with its identifying labels and summary numbers."""

    benchmark: str
    model: str
    method: str
    protocol: str
    fmr: float
    discard: np.ndarray
    fnmr: np.ndarray
    threshold: np.ndarray
    threshold_fmr: np.ndarray
    pauc: dict[float, float]
    pairs: int
    genuine: int
    missing_quality: int
    missing_embedding: int
    unmatched_quality_rows: int
    unmatched_embedding_rows: int

    def row(self) -> dict:
        """Returns the table row (no curve arrays)."""
        out = {
            "benchmark": self.benchmark,
            "model": self.model,
            "method": self.method,
            "protocol": self.protocol,
            "fmr": self.fmr,
            "threshold_fmr_at_0": float(self.threshold_fmr[0]),
            "fnmr_at_0": float(self.fnmr[0]),
        }
        out.update({f"pauc_{limit:g}": value for limit, value in self.pauc.items()})
        out.update(
            pairs=self.pairs,
            genuine=self.genuine,
            missing_quality=self.missing_quality,
            missing_embedding=self.missing_embedding,
            unmatched_quality_rows=self.unmatched_quality_rows,
            unmatched_embedding_rows=self.unmatched_embedding_rows,
        )
        return out


def evaluate_one(
    comparisons: protocols.Comparisons,
    *,
    labels: dict,
    fmrs: tuple[float, ...],
    edc_protocols: tuple[str, ...],
    limits: tuple[float, ...],
    pauc_method: str = "step",
    unmatched: tuple[int, int] = (0, 0),
) -> list[Curve]:
    """Returns one Curve per EDC protocol and FMR for one (benchmark, model, method) combination.

    unmatched: (quality-file rows, embedding rows) that named no image of the benchmark, for the table.
    """
    curves = []
    for edc_protocol in edc_protocols:
        for fmr in fmrs:
            got = edc.edc_curve(
                comparisons.similarity,
                comparisons.genuine,
                comparisons.pair_quality,
                fmr=fmr,
                protocol=edc_protocol,
            )
            curves.append(
                Curve(
                    **labels,
                    protocol=edc_protocol,
                    fmr=fmr,
                    discard=np.asarray(got.discard),
                    fnmr=np.asarray(got.fnmr),
                    threshold=np.broadcast_to(np.asarray(got.threshold, np.float64), np.shape(got.discard)),
                    threshold_fmr=np.broadcast_to(np.asarray(got.threshold_fmr, np.float64), np.shape(got.discard)),
                    pauc={limit: float(edc.pauc(got.discard, got.fnmr, limit, method=pauc_method)) for limit in limits},
                    pairs=len(comparisons.similarity),
                    genuine=int(comparisons.genuine.sum()),
                    missing_quality=comparisons.missing_quality,
                    missing_embedding=comparisons.missing_embedding,
                    unmatched_quality_rows=unmatched[0],
                    unmatched_embedding_rows=unmatched[1],
                )
            )
    return curves


def _named(specs: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not (sep and name and pattern):
            raise EvaluationError(f"{flag} {spec!r} must read NAME=PATH (PATH may contain {{benchmark}}).")
        if name in out:
            raise EvaluationError(f"{flag} names {name!r} twice; give each one a distinct name.")
        out[name] = pattern
    return out


def _fill(pattern: str, benchmark: str) -> str:
    return pattern.replace("{benchmark}", benchmark)


def _warn(message: str) -> None:
    log.warning("%s", message)


def _check_missing(what: str, missing: int, unmatched: int, total: int, limit: float) -> None:
    """Warns about images without a value and rows naming nothing; stops when too many images lack one."""
    if missing:
        _warn(f"{what}: {missing} of {total} images have no value ({missing / total:.1%}).")
    if unmatched:
        _warn(f"{what}: {unmatched} rows name no image of the benchmark and were ignored.")
    if missing > limit * total:
        raise EvaluationError(
            f"{what} lacks {missing} of {total} images, more than --max-missing {limit:g} allows; "
            "it is probably for another benchmark or incomplete (raise --max-missing to accept it)."
        )


def run(args: argparse.Namespace) -> list[Curve]:
    """Returns every curve the arguments ask for, after writing the tables and figures to `args.out`."""
    if args.out.exists() and not args.out.is_dir():
        raise EvaluationError(f"--out {args.out} is a file; pass a folder for the tables and figures.")
    taken = [name for name in RESULT_FILES if (args.out / name).exists()]
    if taken and not args.overwrite:
        raise EvaluationError(
            f"--out {args.out} already holds results ({', '.join(taken)}); pass --overwrite to replace them, "
            "or choose another folder."
        )
    benches = [protocols.load(spec) for spec in args.benchmark]
    if len({b.name for b in benches}) != len(benches):
        raise EvaluationError("two --benchmark specs share a name; give each benchmark its own NAME.")
    methods = _named(args.quality, "--quality")
    models = _named(args.embeddings, "--embeddings")
    if len(benches) > 1:
        for flag, named in (("--quality", methods), ("--embeddings", models)):
            for name, pattern in named.items():
                if "{benchmark}" not in pattern:
                    _warn(f"{flag} {name} has no {{benchmark}} in its path: every benchmark reads the same file.")
    args.out.mkdir(parents=True, exist_ok=True)
    curves: list[Curve] = []
    skipped: list[str] = []
    for bench in benches:
        pair_cache: dict[str, tuple[np.ndarray, int, int]] = {}
        for model, epattern in models.items():
            espec = _fill(epattern, bench.name)
            if args.skip_missing and not Path(espec.partition("@")[0]).exists():
                skipped.append(f"{bench.name}/{model}")
                continue
            embeddings = read_embeddings(espec, bench)
            where = f"benchmark {bench.name}, embeddings {model}"
            missing = int((~np.isfinite(embeddings.array).all(axis=1)).sum())
            _check_missing(where, missing, embeddings.unmatched_rows, len(bench.ids), args.max_missing)
            _progress(f"{bench.name} / {model}: {bench.num_pairs} comparisons")
            sims = protocols.similarities(bench, embeddings.array)  # once per benchmark and FR model
            impostors = int((~sims.genuine).sum())
            for fmr in args.fmr:
                if impostors and fmr * impostors < 1:
                    _warn(
                        f"{where}: FMR {fmr:g} is below 1/{impostors} impostor comparisons; the threshold "
                        "cannot resolve it (see threshold_fmr in the table)."
                    )
            for method, qpattern in methods.items():
                qpath = Path(_fill(qpattern, bench.name))
                if args.skip_missing and not qpath.exists():
                    skipped.append(f"{bench.name}/{model}/{method}")
                    continue
                if method not in pair_cache:  # read and pair each quality file once per benchmark, not per model
                    keys, values = read_quality(qpath)
                    quality, unmatched = align_quality(bench, keys, values, f"quality file {qpath}")
                    _check_missing(
                        f"benchmark {bench.name}, quality {method}",
                        int(np.isnan(quality).sum()),
                        unmatched,
                        len(bench.ids),
                        args.max_missing,
                    )
                    pair_cache[method] = (*protocols.pair_qualities(bench, quality), unmatched)
                pair_quality, missing_quality, unmatched = pair_cache[method]
                comparisons = protocols.Comparisons(
                    sims.similarity, sims.genuine, pair_quality, missing_quality, sims.missing_embedding
                )
                curves += evaluate_one(
                    comparisons,
                    labels={"benchmark": bench.name, "model": model, "method": method},
                    fmrs=tuple(args.fmr),
                    edc_protocols=tuple(args.protocol),
                    limits=tuple(args.pauc_limit),
                    pauc_method=args.pauc_method,
                    unmatched=(unmatched, embeddings.unmatched_rows),
                )
    for item in skipped:
        _warn(f"skipped {item}: its file does not exist (--skip-missing)")
    if not curves:
        raise EvaluationError("no benchmark had both an embedding file and a quality file; nothing to evaluate.")
    write(curves, args.out, figure_limit=args.figure_limit, settings=_settings(args))
    return curves


def _settings(args: argparse.Namespace) -> dict:
    return {
        "benchmarks": args.benchmark,
        "quality": args.quality,
        "embeddings": args.embeddings,
        "fmr": list(args.fmr),
        "protocols": list(args.protocol),
        "pauc_limits": list(args.pauc_limit),
        "pauc_method": args.pauc_method,
        "max_missing": args.max_missing,
    }


def _progress(message: str) -> None:
    log.info("%s", message)


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def write(curves: list[Curve], out: Path, *, figure_limit: float, settings: dict) -> None:
    """Writes results.json (curves and settings), results.csv (one row per curve) and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [c.row() for c in curves]
    payload = {
        "settings": settings,
        "results": [
            dict(
                row,
                discard=c.discard.tolist(),
                fnmr=c.fnmr.tolist(),
                threshold=c.threshold.tolist(),
                threshold_fmr=c.threshold_fmr.tolist(),
            )
            for row, c in zip(rows, curves, strict=True)
        ],
    }
    # Strict JSON: a recomputed point without genuine or impostor pairs is NaN; write it as null.
    text = json.dumps(_nan_to_none(payload), indent=1, allow_nan=False)
    (out / "results.json").write_text(text + "\n", encoding="utf-8")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    from experiments import figures

    for path in figures.edc_figures(curves, out, limit=figure_limit):
        _progress(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ command line


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must lie strictly between 0 and 1")
    return value


def _limit(text: str) -> float:
    value = _fraction(text) if text.strip() != "1" else 1.0
    return value


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser."""
    p = cli.Parser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME=KIND:PATH",
        help="benchmark protocol (repeatable): bin:FILE.bin, pairs:IMAGE_LIST,PAIR_LIST, identities:LIST, ijbc:META",
    )
    p.add_argument(
        "--quality",
        action="append",
        required=True,
        metavar="METHOD=PATTERN",
        help="quality file of a method (repeatable); {benchmark} in PATTERN is replaced by the benchmark's NAME",
    )
    p.add_argument(
        "--embeddings",
        action="append",
        required=True,
        metavar="MODEL=PATTERN",
        help="embeddings of an FR model (repeatable): FILE.npy[@IDS] or a folder of <stem>.npy; {benchmark} allowed",
    )
    p.add_argument(
        "--fmr",
        type=_fraction,
        action="append",
        help="false match rate of the threshold (repeatable; default: 1e-3 and 1e-4)",
    )
    p.add_argument(
        "--protocol",
        choices=["recomputed", "fixed"],
        action="append",
        help="EDC protocol (repeatable; default: recomputed, the CR-FIQA ERC scripts' protocol the paper uses)",
    )
    p.add_argument(
        "--pauc-limit",
        type=_limit,
        action="append",
        help="discard fraction pAUC-EDC integrates up to (repeatable; default: 0.2, 0.25, 0.3)",
    )
    p.add_argument("--pauc-method", choices=["step", "trapezoid"], default="step", help="pAUC rule (default: step)")
    p.add_argument(
        "--figure-limit", type=_limit, default=0.25, help="pAUC shown in the figures' legends (default: 0.25)"
    )
    p.add_argument("--skip-missing", action="store_true", help="skip combinations whose file does not exist")
    p.add_argument(
        "--max-missing",
        type=float,
        default=0.05,
        help="largest share of a benchmark's images allowed to lack a quality or an embedding (default: 0.05)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for results.json/csv and figures")
    p.add_argument("--overwrite", action="store_true", help="replace the results and figures already in --out")
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 user error, 2 bad flags)."""
    args = build_parser().parse_args(argv)
    args.fmr = args.fmr or list(DEFAULT_FMRS)
    args.protocol = list(dict.fromkeys(args.protocol or ["recomputed"]))
    args.pauc_limit = args.pauc_limit or list(DEFAULT_LIMITS)

    def body() -> int:
        for c in run(args):
            paucs = "  ".join(f"pAUC@{k:g}={v:.4f}" for k, v in c.pauc.items())
            print(f"{c.benchmark:10s} {c.model:12s} {c.method:16s} {c.protocol:10s} FMR={c.fmr:g}  {paucs}")
        return 0

    return cli.run_command(body, debug=args.debug, errors=(EvaluationError, ProtocolError))


if __name__ == "__main__":
    sys.exit(main())
