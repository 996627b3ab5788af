"""Ablations of ViTNT-FIQA from ONE forward pass per image: number of blocks, alpha, aggregation, metric.

    python -m experiments.ablations --model cvlface_vit_base --bin data/lfw.bin --out ablations/lfw
    python -m experiments.ablations ... --benchmark lfw=bin:data/lfw.bin --embeddings ArcFace=emb/lfw.npy

Every variant's quality is computed from the same per-block states (the first `max(depths)` blocks and the
attention each patch receives in each of them), so a sweep costs one forward pass, not one per variant. The
images come from the scorer's sources and go through its pipeline (`vitnt_jax.pipeline.score_source`); each
variant is written as a score CSV (``<out>/<variant>.csv``, the format of ``python -m vitnt_jax.score``, written
by `vitnt_jax.output`), so any variant can be evaluated like any other quality file. ``<out>/qualities.npy``
holds every variant's qualities, (rows, variants) float32 in the order of ``<out>/variants.json``. With
``--benchmark`` and ``--embeddings`` the EDC tables and figures are produced as well (``<out>/edc/``, via
``experiments.evaluate``). Existing files are replaced only with ``--overwrite``.

The default sweep changes one factor at a time around the paper's setting (blocks 0..19 of 24, alpha 8,
last-block attention, Euclidean distance); ``--grid full`` crosses every factor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import harness
from vitnt_jax import cli

AGGREGATIONS = {
    "mean": ("mean", "last"),
    "attention-last": ("attention", "last"),
    "attention-all": ("attention", "all"),
}


@dataclass(frozen=True)
class Variant:
    """Returns nothing: one scoring setting; `name` is its file stem."""

    depth: int
    alpha: float
    aggregation: str
    metric: str

    @property
    def name(self) -> str:
        """Returns the variant's label, e.g. `blocks20_alpha8_attention-last_euclidean`."""
        return f"blocks{self.depth}_alpha{self.alpha:g}_{self.aggregation}_{self.metric}"

    def settings(self):
        """Returns the ScoreSettings of this variant (blocks 0..depth-1)."""
        from vitnt_jax.stability import ScoreSettings

        aggregation, attention = AGGREGATIONS[self.aggregation]
        return ScoreSettings(tuple(range(self.depth)), self.alpha, self.metric, aggregation, attention)


def variants(
    depths: list[int],
    alphas: list[float],
    aggregations: list[str],
    metrics: list[str],
    *,
    base: Variant,
    grid: str = "one-at-a-time",
) -> list[Variant]:
    """Returns the sweep: every factor changed alone around `base`, or (grid='full') every combination."""
    if grid == "full":
        combos = itertools.product(depths, alphas, aggregations, metrics)
        return [Variant(*c) for c in combos]
    out = [base]
    out += [Variant(d, base.alpha, base.aggregation, base.metric) for d in depths]
    out += [Variant(base.depth, a, base.aggregation, base.metric) for a in alphas]
    out += [Variant(base.depth, base.alpha, g, base.metric) for g in aggregations]
    out += [Variant(base.depth, base.alpha, base.aggregation, m) for m in metrics]
    return list(dict.fromkeys(out))


def sweep_fn(config, sweep: list[Variant], precision="highest"):
    """Returns a jitted `(variables, uint8 images (B,H,W,3)) -> {variant name: (B,) quality}` over one forward pass."""
    import jax

    from vitnt_jax.scorer import compute_states, preprocess
    from vitnt_jax.stability import ScoreSettings, quality_from_states

    deepest = max(v.depth for v in sweep)
    states_settings = ScoreSettings(tuple(range(deepest)), aggregation="attention", attention="all")

    @jax.jit
    def run(variables, images):
        got = compute_states(config, variables, preprocess(images, config), states_settings, precision=precision)
        out = {}
        for v in sweep:
            s = v.settings()
            received = got["received"][: v.depth] if s.uses_attention else None
            out[v.name] = quality_from_states(got["states"][: v.depth], received, s)["quality"]
        return out

    return run


class AblationScorer:
    """The sweep as a `vitnt_jax.pipeline.BatchScorer`: {'quality': the first variant, 'variants': (B, V)}."""

    def __init__(self, config, variables, sweep: list[Variant], precision="highest"):
        import jax

        self.config, self.names = config, [v.name for v in sweep]
        self.variables = jax.device_put(variables)
        self._run = sweep_fn(config, sweep, precision)

    def padded_size(self, n: int) -> int:
        """Returns n: the sweep runs on one device, at any batch size."""
        return n

    def dispatch(self, images: np.ndarray):
        """Starts scoring uint8 images; returns (B, device results) without waiting."""
        return len(images), self._run(self.variables, np.asarray(images))

    def fetch(self, pending) -> dict[str, np.ndarray]:
        """Waits for a `dispatch` result; returns the first variant's quality and every variant's, (B, V)."""
        b, got = pending
        table = np.stack([np.asarray(got[name], np.float32) for name in self.names], axis=1)[:b]
        return {"quality": table[:, 0], "variants": table}


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from error

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser."""
    p = harness.Parser(prog="python -m experiments.ablations", description=__doc__.split("\n\n")[0])
    harness.add_input_flags(p)
    p.add_argument("--depths", type=_list(int), help="numbers of blocks 0..k-1 (default: 4, 8, ... up to depth)")
    p.add_argument("--alphas", type=_list(float), default=[2.0, 4.0, 8.0, 16.0], help="alphas (default: 2,4,8,16)")
    p.add_argument(
        "--aggregations",
        type=lambda t: t.split(","),
        default=list(AGGREGATIONS),
        help="subset of mean,attention-last,attention-all (default: all three)",
    )
    p.add_argument(
        "--metrics",
        type=lambda t: t.split(","),
        default=["euclidean", "cosine", "angular", "l1"],
        help="subset of euclidean,cosine,angular,l1 (default: all four)",
    )
    p.add_argument("--grid", choices=["one-at-a-time", "full"], default="one-at-a-time", help="sweep layout")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads (default: 4)")
    p.add_argument("--benchmark", action="append", metavar="NAME=KIND:PATH", help="evaluate on this protocol too")
    p.add_argument("--embeddings", action="append", metavar="MODEL=PATTERN", help="with --benchmark: FR embeddings")
    p.add_argument("--fmr", type=float, action="append", help="with --benchmark: FMR (default: 1e-3 and 1e-4)")
    p.add_argument("--out", type=Path, required=True, help="output folder (one <variant>.csv per variant)")
    p.add_argument("--overwrite", action="store_true", help="replace the sweep's files already in --out")
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 user error)."""
    args = build_parser().parse_args(argv)
    # ValueError: ProtocolError, EvaluationError and setting errors, one sentence each.
    return cli.run_command(lambda: _run(args), debug=args.debug, errors=(ValueError,))


def _run(args: argparse.Namespace) -> int:
    from vitnt_jax import pipeline
    from vitnt_jax.output import OutputError, ResultWriter, Row, read_results, write_results
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import METRICS

    if bool(args.benchmark) != bool(args.embeddings):
        raise ValueError("--benchmark and --embeddings go together; give both or neither.")
    if args.batch_size < 1 or args.workers < 1:
        raise ValueError("--batch-size and --workers must be at least 1.")
    for f in args.fmr or []:
        if not 0 < f < 1:
            raise ValueError(f"--fmr {f:g} must lie strictly between 0 and 1.")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise ValueError(f"--out {args.out} is a file; pass a folder for the variants.") from error
    except OSError as error:
        raise ValueError(f"cannot create --out {args.out} ({error.strerror}); choose another folder.") from error
    if args.benchmark and len(args.benchmark) > 1:
        raise ValueError("--benchmark names the one protocol of the scored images; run one ablation per benchmark.")
    for g in args.aggregations:
        if g not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {g!r}; choose from {', '.join(AGGREGATIONS)}.")
    for m in args.metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}.")
    source, config, variables = harness.open_inputs(args)
    depths = args.depths or list(range(4, config.depth + 1, 4))
    bad = [d for d in depths if not 2 <= d <= config.depth]
    if bad:
        raise ValueError(f"--depths {bad} must lie between 2 and the model's {config.depth} blocks.")
    if args.benchmark:  # read the protocol now: a wrong spec must not cost a whole sweep
        from experiments import protocols

        protocols.load(args.benchmark[0])
    default = parse_blocks(config.default_blocks, config.depth)
    # The paper's selections are contiguous runs from block 0; anything else is swept from the full depth.
    base_depth = len(default) if default == tuple(range(len(default))) else config.depth
    base = Variant(base_depth, 8.0, "attention-last", "euclidean")
    sweep = variants(depths, args.alphas, args.aggregations, args.metrics, base=base, grid=args.grid)
    for v in sweep:
        v.settings()  # validates alpha and the rest before any work
    paths = {v.name: args.out / f"{v.name}.csv" for v in sweep}
    table_path, listing = args.out / "qualities.npy", args.out / "variants.json"
    existing = [p for p in (*paths.values(), table_path, listing) if p.exists()]
    if existing and not args.overwrite:
        raise OutputError(
            f"{existing[0]} already exists; pass "
            + "{overwrite} to replace the sweep's files, or choose another {out}.",
            field="out",
            also=("overwrite",),
        )
    with_label = source.labels is not None
    first = paths[sweep[0].name]
    # One pass: the pipeline writes the first variant's CSV and every variant's column of the table.
    writer = ResultWriter(
        first, with_label=with_label, arrays={"variants": (table_path, (len(sweep),))}, overwrite=args.overwrite
    )
    progress = pipeline.Progress(len(source))
    finished = False
    try:
        pipeline.score_source(
            AblationScorer(config, variables, sweep),
            source,
            writer,
            batch_size=args.batch_size,
            color=args.color,
            workers=args.workers,
            progress=progress,
        )
        finished = True
    finally:
        writer.close(finished)
        progress.close()
    rows, table = read_results(first), np.load(table_path)
    for j, v in enumerate(sweep[1:], start=1):
        column = [Row(r.id, None if r.error else float(table[i, j]), r.label, r.error) for i, r in enumerate(rows)]
        write_results(paths[v.name], column, with_label=with_label, overwrite=args.overwrite)
    listing.write_text(json.dumps([dict(name=v.name, **v.__dict__) for v in sweep], indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(sweep)} variants to {args.out}")
    if args.benchmark:
        from experiments import evaluate

        argv = [f"--benchmark={b}" for b in args.benchmark]
        argv += [f"--quality={v.name}={args.out / (v.name + '.csv')}" for v in sweep]
        argv += [f"--embeddings={e}" for e in args.embeddings]
        argv += [f"--fmr={f}" for f in (args.fmr or [])]
        argv += ["--out", str(args.out / "edc")] + (["--overwrite"] if args.overwrite else [])
        return evaluate.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
