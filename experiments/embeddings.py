"""Face embeddings from a converted backbone, for the comparison scores of an EDC evaluation.

    python -m experiments.embeddings --bin data/lfw.bin --flip --out emb/lfw.npy

writes ``emb/lfw.npy`` (n, E) float32, rows in source order, and ``emb/lfw.ids.txt`` (one id per line), the
pair that ``python -m experiments.evaluate --embeddings NAME=emb/{benchmark}.npy`` reads. With ``--flip`` the
embedding of the horizontally flipped image is concatenated to the original's (n, 2E), each half L2-normalised
first, as the evaluation scripts of CR-FIQA (which the paper's protocol follows) do; without it the raw
embedding is written. An image that cannot be read gets a row of NaN, so rows never shift; the evaluation counts
such an image as a failure to compare (a non-match).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from experiments import harness
from vitnt_jax import cli, pipeline

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser."""
    p = harness.Parser(prog="python -m experiments.embeddings", description=__doc__.split("\n\n")[0])
    harness.add_input_flags(p)
    p.add_argument("--flip", action="store_true", help="concatenate the horizontally flipped image's embedding")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument(
        "--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding threads (default: min(16, cores))"
    )
    p.add_argument("--out", type=Path, required=True, help="embedding file (.npy); ids go to <out>.ids.txt")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its ids file) if they exist")
    cli.add_debug_flag(p)
    return p


def ids_path(out: Path) -> Path:
    """Returns the ids file written next to an embedding file: `x.npy` -> `x.ids.txt`."""
    return out.with_suffix(".ids.txt")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Flipped:
    """A batch scorer (see vitnt_jax.pipeline) whose embedding joins the image's and its mirror image's.

    Each half is L2-normalised before joining, as CR-FIQA's extract_emb.py does (FaceModel normalises).
    """

    def __init__(self, scorer):
        self.scorer, self.config = scorer, scorer.config

    def padded_size(self, n: int) -> int:
        return self.scorer.padded_size(n)

    def dispatch(self, images: np.ndarray):
        return self.scorer.dispatch(images), self.scorer.dispatch(np.ascontiguousarray(images[:, :, ::-1]))

    def fetch(self, pending) -> dict[str, np.ndarray]:
        plain, mirrored = (self.scorer.fetch(p)["embedding"] for p in pending)
        return {"embedding": np.concatenate([_unit(plain), _unit(mirrored)], axis=1)}


def embed_source(scorer, source, *, flip: bool, batch_size: int, workers: int, color: str | None = None) -> np.ndarray:
    """Returns (len(source), E or 2E) float32 embeddings in source order; NaN rows for unreadable images."""
    rows = None
    scorer = Flipped(scorer) if flip else scorer
    for item in pipeline.scored_batches(scorer, source, batch_size=batch_size, workers=workers, color=color):
        got = item.result["embedding"]
        if rows is None:
            rows = np.full((len(source), got.shape[1]), np.nan, np.float32)
        keep = item.batch.valid[: item.rows]
        rows[np.asarray(item.batch.indices)[keep]] = got[: item.rows][keep]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 user error, 2 bad flags)."""
    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: _run(args), debug=args.debug, errors=(_UserError,))


class _UserError(Exception):
    pass


def _make_parent(path: Path) -> None:
    """Creates the output's folder before any work, so a bad --out costs nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _UserError(
            f"cannot create the folder of --out {path} ({error.strerror}); choose another --out."
        ) from error
    if path.is_dir():
        raise _UserError(f"--out {path} is a folder; pass a .npy file path.")


def _run(args: argparse.Namespace) -> int:
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.stability import ScoreSettings

    if args.out.suffix != ".npy":
        raise _UserError(f"--out {args.out} must end in .npy.")
    if args.batch_size < 1:
        raise _UserError("--batch-size must be at least 1.")
    if args.workers < 1:
        raise _UserError("--workers must be at least 1.")
    for path in (args.out, ids_path(args.out)):
        if path.exists() and not args.overwrite:
            raise _UserError(f"{path} already exists; pass --overwrite to replace it, or choose another --out.")
    _make_parent(args.out)
    try:
        source, config, variables = harness.open_inputs(args)
    except ValueError as error:
        raise _UserError(str(error)) from error
    if config.head == "none":
        raise _UserError(f"model {config.name} has no embedding head; choose a face recognition model.")
    settings = ScoreSettings(blocks=(0, 1))  # unused: only the embedding is read
    scorer = Scorer(config, variables, settings, embed=True, outputs=("embedding",))
    rows = embed_source(
        scorer, source, flip=args.flip, batch_size=args.batch_size, workers=args.workers, color=args.color
    )
    failed = int(np.isnan(rows).any(axis=1).sum())
    np.save(args.out, rows)
    ids_path(args.out).write_text("".join(f"{i}\n" for i in source.ids), encoding="utf-8")
    log.info(f"wrote {rows.shape[0]} embeddings of width {rows.shape[1]} to {args.out} ({failed} unreadable: NaN rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
