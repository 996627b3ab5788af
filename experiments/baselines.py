"""Score images with a training-free FIQA baseline (SER-FIQ, GraFIQs, ATTN-FIQA, embedding norm).

    python -m experiments.baselines serfiq --bin data/lfw.bin --out scores/serfiq_lfw.csv

The images come from the scorer's sources (`--images | --list | --bin | --tfds`), the rows go
through the scorer's pipeline and writer (`vitnt_jax.pipeline.score_source`): the same score CSV
(id, quality, error) as `python -m vitnt_jax.score`, one row per image, ready for
`experiments.evaluate`. The methods themselves live in `experiments.baseline_methods` (their
names are importable from here too); this module imports JAX only after the flags are read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments import harness
from vitnt_jax import cli

# The methods of experiments.baseline_methods.BASELINES (tests check the two agree).
METHODS = ("attn_fiqa", "embedding_norm", "grafiqs", "serfiq")
SERFIQ_PASSES = 100


def __getattr__(name: str):
    # The methods and their registry load with JAX on first use, so `--help` answers at once.
    if name.startswith("__"):  # the import system asks for __path__ and the like
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from experiments import baseline_methods

    try:
        return getattr(baseline_methods, name)
    except AttributeError as error:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from error


def build_parser() -> cli.Parser:
    """Returns the command-line parser."""
    p = harness.Parser(prog="python -m experiments.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=METHODS, help="the baseline")
    harness.add_input_flags(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads (default: 4)")
    p.add_argument(
        "--passes", type=int, default=SERFIQ_PASSES, help=f"serfiq: stochastic passes (default: {SERFIQ_PASSES})"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="serfiq: dropout seed; an image's key is fold_in(seed, CRC-32 of its pixels)",
    )
    p.add_argument(
        "--precision",
        choices=["highest", "default"],
        default="highest",
        help="matmul precision: 'highest' = exact fp32, as the ViTNT-FIQA scorer (default: highest)",
    )
    p.add_argument("--out", type=Path, required=True, help="score CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Writes one baseline's qualities as a score CSV; returns the exit status (0 ok, 1 user error)."""
    args = build_parser().parse_args(argv)
    return cli.run_command(lambda: _run(args), debug=args.debug, errors=(ValueError,))


def _run(args) -> int:
    from vitnt_jax.output import OutputError

    if args.batch_size < 1 or args.workers < 1:
        raise ValueError("--batch-size and --workers must be at least 1.")
    if args.passes < 2:
        raise ValueError("--passes must be at least 2.")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; pass a .csv file path.")
    if args.out.exists() and not args.overwrite:  # before the model loads; the writer checks again
        raise OutputError(
            f"{args.out} already exists; pass " + "{overwrite} to replace it, or choose another {out}.",
            field="out",
            also=("overwrite",),
        )
    source, config, variables = harness.open_inputs(args)

    from experiments.baseline_methods import BaselineScorer
    from vitnt_jax import pipeline

    options = {"passes": args.passes} if args.method == "serfiq" else {}
    options["precision"] = None if args.precision == "default" else args.precision
    scorer = BaselineScorer(args.method, config, variables, seed=args.seed, **options)
    progress = pipeline.Progress(len(source))
    try:
        summary = pipeline.score_source(
            scorer,
            source,
            args.out,
            batch_size=args.batch_size,
            color=args.color,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=progress,
        )
    finally:
        progress.close()
    print(f"wrote {summary.scored + summary.failed} rows to {args.out} ({summary.rate:.1f} img/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
