"""Command line: score a folder of aligned faces with ViTNT-FIQA.

    python -m vitnt_jax.score --images DIR --model CKPT --out scores.csv [flags]

Writes one CSV row per image file, sorted by id (the path relative to DIR): id,quality,error.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

from vitnt_jax.stability import METRICS

EPILOG = """\
Input contract: aligned 112x112 faces (5-point ArcFace template). Other sizes are resized
bilinearly, which is only meaningful for faces that are already aligned. --color names the
channel order the FILES hold: 'bgr' for packs extracted channel-swapped by the usual insightface
scripts. Higher quality = better. A file that cannot be read gets an empty quality and an error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitnt_jax.score",
        description="Training-free face image quality (ViTNT-FIQA) for a folder of aligned faces.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, type=Path, help="folder of PNG/JPEG faces (searched recursively)")
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="converted checkpoint directory (python -m converters.cvlface SRC DST)",
    )
    p.add_argument("--out", type=Path, default=Path("scores.csv"), help="output CSV (default: scores.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--blocks",
        default=None,
        help="blocks to track, 0-based: '0-19', '0,2,4', '-4:', 'all' "
        "(default: the model's published selection, ViT-B '0-19', ViT-S 'all')",
    )
    p.add_argument("--alpha", type=float, default=8.0, help="q = 2/(1+exp(alpha*d)) (default: 8)")
    p.add_argument(
        "--aggregation",
        choices=["mean", "attention"],
        default="attention",
        help="patch -> image: uniform mean or attention-weighted (default: attention)",
    )
    p.add_argument(
        "--attention",
        choices=["last", "all"],
        default="last",
        help="attention weights from the last selected block or averaged over all selected (default: last)",
    )
    p.add_argument(
        "--metric",
        choices=sorted(METRICS),
        default="euclidean",
        help="distance between consecutive normalised tokens (default: euclidean, the method's)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per jitted call (default: 64)")
    p.add_argument(
        "--color", choices=["rgb", "bgr"], default="rgb", help="channel order the image files hold (default: rgb)"
    )
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads (default: min(8, cores))"
    )
    p.add_argument(
        "--precision",
        choices=["highest", "default"],
        default="highest",
        help="matmul precision: 'highest' = exact fp32 (default); 'default' lets TPUs/GPUs use faster, "
        "less exact passes",
    )
    return p


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _join_negative_blocks(argv: list[str]) -> list[str]:
    # argparse takes '-4:' for an option; glue it to its flag so `--blocks -4:` works as documented.
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--blocks" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--blocks={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_negative_blocks(argv))
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; rows written so far are in {args.out}", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from vitnt_jax import checkpoint
    from vitnt_jax.data import batches, list_images
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    if not args.images.is_dir():
        raise UserError(f"--images {args.images} is not a folder; pass the folder that holds the face images.")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; pass --overwrite or choose another --out.")
    items = list_images(args.images)
    if not items:
        raise UserError(f"no PNG or JPEG files under {args.images}; point --images at a folder of face images.")
    try:
        config, variables = checkpoint.load(args.model)
        blocks = parse_blocks(args.blocks if args.blocks is not None else config.default_blocks, config.depth)
        settings = ScoreSettings(
            blocks, alpha=args.alpha, metric=args.metric, aggregation=args.aggregation, attention=args.attention
        )
    except (checkpoint.CheckpointError, ValueError) as error:
        raise UserError(str(error)) from None
    scorer = Scorer(config, variables, settings, precision=args.precision)

    print(
        f"scoring {len(items)} images with {config.name}, blocks {_span(blocks)}, alpha {args.alpha:g}, "
        f"{args.aggregation}{'/' + args.attention if args.aggregation == 'attention' else ''}, "
        f"{args.metric}",
        file=sys.stderr,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(items))
    scored = failed = 0
    warned = False
    start = time.perf_counter()
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "quality", "error"])
        pending = None  # (batch, device result): fetch it after dispatching the next batch
        for batch in batches(items, args.batch_size, config.img_size, args.color, args.workers):
            if not warned and any(batch.resized):
                w, h = next(r for r in batch.resized if r)
                print(
                    f"warning: some images (e.g. {w}x{h}) are not {config.img_size}x{config.img_size}; "
                    "resizing them bilinearly",
                    file=sys.stderr,
                )
                warned = True
            result = scorer(batch.images)
            if pending is not None:
                s, e = _write(writer, *pending)
                scored, failed = scored + s, failed + e
                f.flush()
                progress.update(len(pending[0].ids))
            pending = (batch, result)
        s, e = _write(writer, *pending)
        scored, failed = scored + s, failed + e
        progress.update(len(pending[0].ids))
    progress.close()
    seconds = time.perf_counter() - start
    print(f"scored {scored}, failed {failed}, {len(items) / seconds:.1f} images/s -> {args.out}", file=sys.stderr)
    return 0


def _write(writer, batch, result) -> tuple[int, int]:
    quality = np.asarray(result["quality"])
    scored = failed = 0
    for row, image_id in enumerate(batch.ids):
        if batch.valid[row]:
            writer.writerow([image_id, repr(float(quality[row])), ""])
            scored += 1
        else:
            writer.writerow([image_id, "", batch.errors[row]])
            failed += 1
    return scored, failed


def _span(blocks: tuple[int, ...]) -> str:
    if list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


class Progress:
    """tqdm on a terminal; a plain line every 30 s otherwise (logs of batch jobs)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= 30:
            self.last = now
            rate = self.done / (now - self.start)
            print(f"{self.done}/{self.total} images, {rate:.1f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
