"""Command line: score faces with ViTNT-FIQA, data-parallel over every device, resumable.

    python -m vitnt_jax.score (--images DIR | --list FILE | --bin FILE | --tfds NAME[:SPLIT])
        --model CKPT --out scores.csv [flags]

One row per input, in source order: id,quality[,label],error; `--help` lists every flag. The run
itself is `vitnt_jax.pipeline.run(Job)`: this module only turns flags into a Job and errors into lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from vitnt_jax import cli, sources
from vitnt_jax.output import FORMATS

EPILOG = """\
Input contract: faces aligned with the 5-point ArcFace template, 112x112 RGB. For unaligned photos,
--align mtcnn (the default for --tfds lfw) finds the face with MTCNN and warps its 5 landmarks onto
the template; of several faces it keeps the largest whose box contains the image centre, else the
largest; a photo without a face keeps its row with the error "no face found". --align center crops a
fixed face box instead. Other sizes are resized bilinearly. --color names the channel order the
SOURCE holds: 'bgr' for files extracted channel-swapped from insightface packs. Higher quality =
better. A file that cannot be read, or whose score is not a finite number, keeps its row, with an
empty quality and the reason in the error column. A run locks its outputs (OUT.lock beside each) until
it ends: a second run on them is refused.
"""


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser (imports no JAX: `--help` and flag errors answer at once)."""
    p = cli.Parser(
        prog="python -m vitnt_jax.score",
        description="Training-free face image quality (ViTNT-FIQA) for large face collections.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources.add_flags(p)

    m = p.add_argument_group("model and method")
    m.add_argument(
        "--model",
        default=None,
        help="converted checkpoint folder, or a model name from `python -m vitnt_jax.models`, downloaded and "
        "converted on first use (default: cvlface_vit_base_webface4m, the paper's backbone)",
    )
    m.add_argument(
        "--blocks",
        default=None,
        help="blocks to track, 0-based: '0-19', '0,2,4', '-4:', 'all' "
        "(default: the model's published selection, ViT-B '0-19', ViT-S 'all')",
    )
    m.add_argument("--alpha", type=float, default=8.0, help="q = 2/(1+exp(alpha*d)) (default: 8)")
    m.add_argument(
        "--aggregation",
        choices=["mean", "attention"],
        default="attention",
        help="patch -> image: uniform mean or attention-weighted (default: attention)",
    )
    m.add_argument(
        "--attention",
        choices=["last", "all"],
        default="last",
        help="attention weights of the last selected block or averaged over all selected (default: last)",
    )
    m.add_argument(
        "--metric",
        default="euclidean",
        # Checked after parsing against vitnt_jax.stability.METRICS (importing it imports JAX).
        help="distance between consecutive normalised tokens: euclidean, cosine, angular or l1 "
        "(default: euclidean, the method's)",
    )

    i = p.add_argument_group("input")
    i.add_argument(
        "--color", choices=["rgb", "bgr"], default=None, help="channel order the source holds (default: rgb)"
    )
    i.add_argument(
        "--align",
        choices=["none", "mtcnn", "center"],
        default=None,
        help="'none': faces are aligned already; 'mtcnn': detect the face (MTCNN) and align its 5 landmarks "
        "to the ArcFace template, keeping the largest face whose box contains the image centre, else the "
        "largest; 'center': fixed face crop of unaligned photos (default: mtcnn for --tfds lfw, none otherwise)",
    )
    i.add_argument(
        "--mtcnn-weights",
        type=Path,
        metavar="FILE.npz",
        help="with --align mtcnn: converted MTCNN weights (python -m converters.mtcnn); default: facenet-pytorch's, "
        "converted once into $VITNT_JAX_CACHE",
    )
    i.add_argument(
        "--min-face-size",
        type=float,
        metavar="PIXELS",
        help="with --align mtcnn: smallest face searched for, in pixels (default: 20); larger is faster",
    )
    i.add_argument(
        "--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding threads (default: min(16, cores))"
    )

    r = p.add_argument_group("execution")
    r.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per step over all local devices, rounded up to a multiple of the device count, and each "
        "device's share to a multiple of --micro-batch when it is larger (default: 64)",
    )
    r.add_argument(
        "--parallel",
        choices=["jit", "pmap"],
        default="jit",
        help="jit: jax.jit + NamedSharding on a 1-D 'data' mesh (default); pmap: jax.pmap",
    )
    r.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="transformer compute dtype; softmax and the score maths stay float32 (default: float32)",
    )
    r.add_argument(
        "--micro-batch",
        type=_micro_batch,
        default="auto",
        metavar="N|auto",
        help="each device scores its share of a batch N images at a time inside one compiled call; 0 = in one "
        "piece; auto (default) = 8 on CPUs (faster per image there, memory flat in --batch-size), 0 on GPU/TPU",
    )
    r.add_argument(
        "--attention-kernel",
        choices=["matmul", "xla", "cudnn"],
        default="matmul",
        help="attention in the blocks whose weights the score does not read: matmul (batched matmuls, fused by "
        "XLA on CPU; default), xla (jax.nn.dot_product_attention), cudnn (flash attention on NVIDIA GPUs, "
        "with --dtype bfloat16)",
    )
    r.add_argument(
        "--precision",
        choices=["highest", "default"],
        default="highest",
        help="float32 matmul precision: 'highest' = exact (default); 'default' lets TPUs/GPUs use faster "
        "reduced-precision passes",
    )
    r.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    r.add_argument("--process-id", type=int, help="multi-host: this process's index, 0..N-1")
    r.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: address of process 0")
    r.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host with JAX's automatic cluster detection (TPU pods, SLURM, ...)",
    )
    r.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="JAX's persistent compilation cache folder: reruns load the compiled scorer from it; in a multi-process "
        "run only process 0 writes it, so give every host one shared folder (a gs:// folder needs etils[epath]) "
        "(default: xla/ under $VITNT_JAX_CACHE or ~/.cache/vitnt_jax; off: none)",
    )
    r.add_argument(
        "--process-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="multi-host: how long a process waits for the others to finish their parts (default: 3600)",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        type=sources.location,
        default=Path("scores.csv"),
        help="result file, a local path or a URL (gs://, s3://, file://: written in chunks, then merged into one "
        "object) (default: scores.csv)",
    )
    o.add_argument(
        "--format",
        choices=[*FORMATS, "parquet"],
        default="csv",
        help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values())
        + "; parquet: a Parquet table of the csv columns (chunked runs) (default: csv)",
    )
    o.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help="inputs per committed chunk: makes the run chunked (OUT.chunks/, merged into OUT at the end; a crash "
        "loses at most the chunk in flight); chunked runs default to 4096, or what a resumed run recorded. Runs "
        "writing to a URL, or reading --rec, --wds or --parquet, or writing --format parquet, are always chunked",
    )
    o.add_argument(
        "--save-embeddings",
        type=sources.location,
        metavar="FILE.npy",
        help="also save the face embedding of every row (float32, NaN rows for failed inputs)",
    )
    o.add_argument(
        "--save-patch-quality",
        type=sources.location,
        metavar="FILE.npy",
        help="also save every row's per-patch quality map (rows, grid, grid)",
    )
    o.add_argument(
        "--save-aligned",
        type=Path,
        metavar="DIR",
        help="also write every scored row's model input (the aligned crop) as DIR/<index>_<id>.png, "
        "index = position in the source (8+ digits), id made file-safe",
    )
    w = o.add_mutually_exclusive_group()
    w.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: skip ids already in --out; refused when --out was scored with other "
        "settings (model, blocks, alpha, metric, aggregation, colour, alignment, dtype, precision: recorded in "
        "OUT.settings.json)",
    )
    w.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out (and the .npy files, the --save-aligned crops and the recorded settings) if they exist",
    )
    o.add_argument(
        "--on-error",
        choices=["record", "fail"],
        default="record",
        help="unreadable input or (with --align mtcnn) no face found: record it as a row with an error "
        "(default) or stop",
    )
    cli.add_debug_flag(p)
    return p


def _join_negative_blocks(argv: list[str]) -> list[str]:
    # argparse takes '-4:' for an option; glue it to its flag so `--blocks -4:` works as documented.
    out, k = [], 0
    while k < len(argv):
        if argv[k] == "--blocks" and k + 1 < len(argv) and argv[k + 1].startswith("-"):
            out.append(f"--blocks={argv[k + 1]}")
            k += 2
        else:
            out.append(argv[k])
            k += 1
    return out


def _micro_batch(text: str) -> int | str | None:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of images (0 = off) or auto, got {text!r}")
    return value or None


def job_from_args(args: argparse.Namespace):
    """Returns the `vitnt_jax.pipeline.Job` of parsed flags (JobError/SourceError naming a field)."""
    from vitnt_jax.pipeline import Job

    spec = sources.spec_from_args(args)
    return Job(spec, **{name: getattr(args, name) for name in Job.field_names() if name != "source"})


# Settings whose library name differs from the flag (load_scorer's keywords).
_FLAGS = {"embeddings": "--save-embeddings", "patch_quality": "--save-patch-quality"}


def _flag(name: str) -> str:
    return _FLAGS.get(name) or cli.flag(name)


def main(argv: list[str] | None = None) -> int:
    """Runs `python -m vitnt_jax.score`; returns the exit status (0 ok, 1 user error, 2 bad flags, 130 Ctrl-C,
    143 SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_negative_blocks(argv))
    from vitnt_jax import distributed

    multi = args.distributed or (args.num_processes or 1) > 1
    if multi and not distributed.is_worker():
        # JAX aborts a process that loses its cluster (C++ log, exit 134): a supervisor says it in one line.
        return distributed.supervise(
            [sys.executable, "-m", "vitnt_jax.score", *argv],
            process=args.process_id,
            processes=args.num_processes,
            coordinator=args.coordinator,
            debug=cli.debug_wanted(args.debug),
        )

    def body() -> int:
        from vitnt_jax import distributed, pipeline

        job = job_from_args(args)
        try:
            pipeline.run(job)
        except distributed.DistributedError as error:
            if cli.debug_wanted(args.debug):
                traceback.print_exc()
            # A process is missing: JAX's shutdown would wait for it, then abort with its own report.
            print(f"error: {error}", file=sys.stderr)
            distributed.exit_without_shutdown(1)
        return 0

    return cli.run_command(
        body,
        debug=args.debug,
        names=_flag,
        interrupted=f"interrupted; the rows written so far are kept: rerun with --resume to continue {args.out}",
        # A worker ended by SIGTERM is reported by its supervisor; it must not wait to report to its peers.
        terminate=not multi,
    )


if __name__ == "__main__":
    sys.exit(main())
