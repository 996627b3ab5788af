"""Command line: score faces with ViTNT-FIQA, data-parallel over every device, resumable.

    python -m vitnt_jax.score (--images DIR | --list FILE | --bin FILE | --tfds NAME[:SPLIT])
        --model CKPT --out scores.csv [flags]

One row per input, in source order: id,quality[,label],error. See README for every flag.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from vitnt_jax.stability import METRICS

EPILOG = """\
Input contract: faces aligned with the 5-point ArcFace template, 112x112 RGB. For unaligned photos,
--align mtcnn (the default for --tfds lfw) finds the face with MTCNN and warps its 5 landmarks onto
the template; of several faces it keeps the largest whose box contains the image centre, else the
largest; a photo without a face keeps its row with the error "no face found". --align center crops a
fixed face box instead. Other sizes are resized bilinearly. --color names the channel order the
SOURCE holds: 'bgr' for files extracted channel-swapped from insightface packs. Higher quality =
better. A file that cannot be read keeps its row, with an empty quality and the reason in the error
column.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage dump; exit status 2 as argparse's convention.
        self.exit(2, f"error: {message}; see python -m vitnt_jax.score --help.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m vitnt_jax.score",
        allow_abbrev=False,
        description="Training-free face image quality (ViTNT-FIQA) for large face collections.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("source (exactly one)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--images", type=Path, metavar="DIR", help="folder of PNG/JPEG faces, searched recursively")
    one.add_argument(
        "--list",
        type=Path,
        metavar="FILE",
        help="text file, one image path per line (the authors' image_path_list.txt); id = the line",
    )
    one.add_argument("--bin", type=Path, metavar="FILE", help="insightface verification pack (lfw.bin, ...)")
    one.add_argument("--tfds", metavar="NAME[:SPLIT]", help="TFDS dataset read with tfds.data_source, e.g. lfw")
    src.add_argument("--root", type=Path, help="with --list: folder the listed paths are relative to")
    src.add_argument("--data-dir", help="with --tfds: TFDS data directory (default: TFDS's own)")
    src.add_argument("--image-key", default="image", help="with --tfds: image feature (default: image)")
    src.add_argument("--id-key", default=None, help="with --tfds: feature used as id (default: NAME/SPLIT/INDEX)")
    src.add_argument(
        "--label-key",
        default="label",
        help="with --tfds: feature written to the label column when present (default: label)",
    )

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
        choices=sorted(METRICS),
        default="euclidean",
        help="distance between consecutive normalised tokens (default: euclidean, the method's)",
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

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("scores.csv"), help="result file (default: scores.csv)")
    o.add_argument(
        "--format",
        choices=["csv", "reference"],
        default="csv",
        help="csv: id,quality[,label],error; reference: the authors' '<id> <score>' lines (default: csv)",
    )
    o.add_argument(
        "--save-embeddings",
        type=Path,
        metavar="FILE.npy",
        help="also save the face embedding of every row (float32, NaN rows for failed inputs)",
    )
    o.add_argument(
        "--save-patch-quality",
        type=Path,
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
    w.add_argument("--resume", action="store_true", help="continue an interrupted run: skip ids already in --out")
    w.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out (and the .npy files and --save-aligned crops) if they exist",
    )
    o.add_argument(
        "--on-error",
        choices=["record", "fail"],
        default="record",
        help="unreadable input or (with --align mtcnn) no face found: record it as a row with an error "
        "(default) or stop",
    )
    return p


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_negative_blocks(argv))
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted; the rows written so far are kept: rerun with --resume to continue {args.out}",
            file=sys.stderr,
        )
        return 130


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


def _validate(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers}).")
    if args.attention_kernel == "cudnn" and args.dtype != "bfloat16":
        raise UserError("--attention-kernel cudnn runs in bfloat16 only; add --dtype bfloat16.")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise UserError(f"--alpha must be a positive number (got {args.alpha}).")
    if args.root is not None and args.list is None:
        raise UserError("--root only applies to --list; drop it or use --list.")
    multi = [args.num_processes, args.process_id, args.coordinator]
    if any(v is not None for v in multi) and not all(v is not None for v in multi):
        raise UserError("multi-host runs need all of --num-processes, --process-id and --coordinator.")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id must be in 0..{args.num_processes - 1} (got {args.process_id}).")
    for flag, path in (("--save-embeddings", args.save_embeddings), ("--save-patch-quality", args.save_patch_quality)):
        if path is not None and path.suffix != ".npy":
            raise UserError(f"{flag} {path} must end in .npy.")
    # MTCNN's smallest window is 12 px: a smaller face size upsamples every photo (12/size)^2-fold.
    if args.min_face_size is not None and not (math.isfinite(args.min_face_size) and args.min_face_size >= 12):
        raise UserError(f"--min-face-size must be at least 12 pixels, MTCNN's window (got {args.min_face_size:g}).")
    if args.save_embeddings is not None and args.save_embeddings == args.save_patch_quality:
        raise UserError("--save-embeddings and --save-patch-quality must be different files.")


def _check_writable(flag: str, path: Path) -> None:
    """Raises UserError unless a file can be created at `path` (checked before any work starts)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path} lies under {parent}, which is a file; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} is not writable (permission denied); choose another path.")


def _init_distributed(args) -> tuple[int, int]:
    import jax

    if args.num_processes is not None:
        if args.num_processes > 1:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            raise UserError(
                f"--distributed found no cluster to join ({error}); pass --num-processes, "
                "--process-id and --coordinator."
            ) from None
    return jax.process_index(), jax.process_count()


def _open_source(args):
    from vitnt_jax import sources

    try:
        if args.images is not None:
            return sources.image_folder(args.images)
        if args.list is not None:
            return sources.path_list(args.list, args.root)
        if args.bin is not None:
            return sources.insightface_bin(args.bin)
        return sources.tfds_source(args.tfds, args.data_dir, args.image_key, args.id_key, args.label_key)
    except sources.SourceError as error:
        raise UserError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    _validate(args)
    process, processes = _init_distributed(args)
    if processes == 1:
        return _run(args, 0, 1)
    # Multi-process: every process reports success or its error to the JAX coordination service,
    # so process 0 merges only finished parts and stops with one line if another process failed.
    try:
        code = _run(args, process, processes)
    except BaseException as error:
        _report(process, f"failed: {error}" if isinstance(error, UserError) else f"failed: {type(error).__name__}")
        raise
    _report(process, "ok")
    if process == 0:
        _merge(args, processes)
    return code


def _client():
    from jax._src import distributed  # the coordination service's key-value store

    return distributed.global_state.client


def _report(process: int, status: str) -> None:
    client = _client()
    if client is not None:
        client.key_value_set(f"vitnt_jax/status/{process}", status)


def _merge(args: argparse.Namespace, processes: int) -> None:
    from vitnt_jax.output import OutputError, merge_parts

    client = _client()
    for i in range(1, processes):
        waited = 0
        while True:
            try:
                status = client.blocking_key_value_get(f"vitnt_jax/status/{i}", 60_000)
                break
            except Exception:  # not there yet: the process is still scoring
                waited += 1
                print(f"waiting for process {i} to finish its part ({waited} min)", file=sys.stderr)
        if status != "ok":
            raise UserError(
                f"process {i} {status}; nothing was merged and every part is kept: fix it and rerun all processes "
                "with --resume."
            )
    arrays = [p for p in (args.save_embeddings, args.save_patch_quality) if p is not None]
    try:
        rows = merge_parts(args.out, processes, args.format, arrays, append=args.resume and args.out.exists())
    except OutputError as error:
        raise UserError(str(error)) from None
    print(f"merged {processes} parts ({rows} new rows) into {args.out}", file=sys.stderr)


def _run(args: argparse.Namespace, process: int, processes: int) -> int:
    from vitnt_jax import checkpoint
    from vitnt_jax.data import batches
    from vitnt_jax.output import OutputError, ResultWriter, columns, part_path, read_ids
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    source = _open_source(args)
    for problem in source.problems:
        if args.on_error == "fail":
            raise UserError(f"{problem} (--on-error fail).")
        print(f"warning: {problem}", file=sys.stderr)
    for flag, path in (
        ("--out", args.out),
        ("--save-embeddings", args.save_embeddings),
        ("--save-patch-quality", args.save_patch_quality),
    ):
        if path is not None:
            _check_writable(flag, path)
    color = args.color or source.color
    align = args.align or source.align
    detector = _detector(args, align)

    from vitnt_jax import models

    try:
        model_dir = models.resolve(args.model or models.DEFAULT_MODEL)
    except models.ModelError as error:
        raise UserError(str(error)) from None
    try:
        config, variables = checkpoint.load(model_dir)
        blocks = parse_blocks(args.blocks if args.blocks is not None else config.default_blocks, config.depth)
        settings = ScoreSettings(
            blocks, alpha=args.alpha, metric=args.metric, aggregation=args.aggregation, attention=args.attention
        )
    except (checkpoint.CheckpointError, ValueError) as error:
        raise UserError(str(error)) from None
    embed = args.save_embeddings is not None
    if embed and config.head == "none":
        raise UserError(f"model {config.name} has no embedding head; drop --save-embeddings.")
    outputs = (
        ("quality",)
        + (("embedding",) if embed else ())
        + (("patch_quality",) if args.save_patch_quality is not None else ())
    )

    import jax.numpy as jnp

    try:
        scorer = Scorer(
            config,
            variables,
            settings,
            embed=embed,
            outputs=outputs,
            precision=args.precision,
            dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
            parallel=args.parallel,
            attention_kernel=args.attention_kernel,
            micro_batch=args.micro_batch,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    batch_size = scorer.padded_size(args.batch_size)

    # This process's contiguous share of the source; parts concatenate in source order.
    lo, hi = len(source) * process // processes, len(source) * (process + 1) // processes
    out = part_path(args.out, process, processes) if processes > 1 else args.out
    arrays = {}
    grid = config.grid_size
    if embed:
        arrays["embedding"] = (args.save_embeddings, (config.embedding_dim,))
    if args.save_patch_quality is not None:
        arrays["patch_quality"] = (args.save_patch_quality, (grid, grid))
    finals = [args.out] + [p for p, _ in arrays.values()]
    if len({p.resolve() for p in finals}) != len(finals):
        raise UserError("--out, --save-embeddings and --save-patch-quality must be three different files.")
    if not args.resume and not args.overwrite:
        for path in finals[1:] + ([args.out] if processes > 1 else []):
            if path.exists():
                raise UserError(f"{path} already exists; pass --overwrite or --resume, or choose another path.")
    if processes > 1:
        arrays = {k: (part_path(p, process, processes), s) for k, (p, s) in arrays.items()}
    if args.save_aligned is not None:
        _make_folder("--save-aligned", args.save_aligned)
        if not (args.resume or args.overwrite) and any(args.save_aligned.glob("*.png")):
            raise UserError(
                f"--save-aligned {args.save_aligned} already holds crops; pass --overwrite or --resume, "
                "or choose an empty folder."
            )
    try:
        writer = ResultWriter(
            out,
            fmt=args.format,
            with_label=source.labels is not None,
            arrays=arrays,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except OutputError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"cannot write {error.filename or out} ({error.strerror}); choose a writable path.") from None
    done = set(writer.done_ids)
    if processes > 1 and args.resume and args.out.exists():
        # A finished multi-process run: its merged rows count as written; new rows are appended.
        try:
            done |= set(read_ids(args.out, args.format, columns(source.labels is not None)))
        except OutputError as error:
            raise UserError(str(error)) from None
    todo = [k for k in range(lo, hi) if source.ids[k] not in done]

    dev = f"{scorer.num_devices} {scorer.devices[0].platform} device{'s' * (scorer.num_devices > 1)}"
    where = f" (process {process + 1}/{processes}: inputs {lo}..{hi - 1})" if processes > 1 else ""
    print(
        f"scoring {len(todo)} of {len(source)} inputs from {source.name}{where} with {config.name} on {dev}, "
        f"batch {batch_size}, blocks {_span(blocks)}, alpha {args.alpha:g}, {args.aggregation}"
        f"{'/' + args.attention if args.aggregation == 'attention' else ''}, {args.metric}, align {align}"
        f"{', skipping ' + str(len(done)) + ' already written' if done else ''}",
        file=sys.stderr,
    )

    progress = Progress(len(todo))
    scored = failed = 0
    warned = False
    finished = False
    start = time.perf_counter()
    try:
        pending = None
        stream = batches(
            source.load,
            todo,
            batch_size,
            config.img_size,
            color=color,
            align=align,
            workers=args.workers,
            detector=detector,
        )
        for batch in stream:
            if not warned and any(batch.resized):
                w, h = next(r for r in batch.resized if r)
                print(
                    f"warning: some images (e.g. {w}x{h}) are not {config.img_size}x{config.img_size}; "
                    "resizing them bilinearly",
                    file=sys.stderr,
                )
                warned = True
            dispatched = (batch, scorer.dispatch(batch.images))
            bad = next((k for k, e in enumerate(batch.errors) if e), None) if args.on_error == "fail" else None
            if bad is not None:
                # Keep every row before the bad input, then stop.
                for job, upto in ((pending, None), (dispatched, bad)):
                    if job is not None:
                        s, f = _write(writer, source, scorer, *job, upto=upto, crops=args.save_aligned)
                        scored, failed = scored + s, failed + f
                raise UserError(
                    f"{source.ids[batch.indices[bad]]}: {batch.errors[bad]} (--on-error fail); "
                    f"the rows before it are in {out}: rerun with --resume once it is fixed."
                )
            if pending is not None:
                s, f = _write(writer, source, scorer, *pending, crops=args.save_aligned)
                scored, failed = scored + s, failed + f
                progress.update(s + f)
            pending = dispatched
        if pending is not None:
            s, f = _write(writer, source, scorer, *pending, crops=args.save_aligned)
            scored, failed = scored + s, failed + f
            progress.update(s + f)
        finished = True
    finally:
        progress.close()
        writer.close(finished)
    seconds = time.perf_counter() - start
    rate = (scored + failed) / seconds if seconds > 0 else 0.0
    print(f"scored {scored}, failed {failed}, {rate:.1f} images/s -> {out}", file=sys.stderr)
    return 0


def _write(
    writer, source, scorer, batch, pending, upto: int | None = None, crops: Path | None = None
) -> tuple[int, int]:
    """Writes the rows of one scored batch (the first `upto` only, when given); returns (scored, failed).

    With `crops`, the model inputs of the valid rows are saved there first, so a row is only ever
    written after its crop (a resumed run redoes any row whose crop failed to save).
    """
    from vitnt_jax.output import Row

    result = scorer.fetch(pending)
    n = len(batch.indices) if upto is None else upto
    valid = batch.valid[:n]
    if crops is not None:
        _save_crops(crops, source, batch, n)
    rows, failed = [], 0
    for row, index in enumerate(batch.indices[:n]):
        label = source.labels[index] if source.labels is not None else None
        if valid[row]:
            rows.append(Row(source.ids[index], float(result["quality"][row]), label))
        else:
            rows.append(Row(source.ids[index], None, label, batch.errors[row]))
            failed += 1
    arrays = {}
    for key in writer.sinks:
        values = result[key][:n].astype(np.float32)
        values[~valid] = np.nan  # failed inputs keep their row, filled with NaN
        if key == "patch_quality":
            values = values.reshape(n, *writer.sinks[key].row_shape)
        arrays[key] = values
    writer.write(rows, arrays)
    return n - failed, failed


def _detector(args: argparse.Namespace, align: str):
    """Returns the MTCNN detector for --align mtcnn (None otherwise); flag errors become UserError."""
    if align != "mtcnn":
        for flag, value in (("--mtcnn-weights", args.mtcnn_weights), ("--min-face-size", args.min_face_size)):
            if value is not None:
                raise UserError(f"{flag} only applies to --align mtcnn, but this run uses --align {align}.")
        return None
    from vitnt_jax import mtcnn

    size = args.min_face_size if args.min_face_size is not None else mtcnn.DEFAULT_MIN_FACE
    try:
        return mtcnn.Detector.load(args.mtcnn_weights, min_face_size=size)
    except mtcnn.MTCNNError as error:
        raise UserError(str(error)) from None


def _make_folder(flag: str, folder: Path) -> None:
    """Creates `folder` (and its parents) or raises UserError naming the problem."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {flag} {folder} ({error.strerror}); choose another folder.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable (permission denied); choose another folder.")


def crop_name(index: int, image_id: str) -> str:
    """Returns the file name of a saved crop: '<index, 8+ digits>_<file-safe id>.png'.

    The source index makes names unique (the first '_' ends it); the id part keeps letters,
    digits, '.', '-' and '_' (anything else becomes '_'), drops an image suffix, and is cut at 100
    characters.
    """
    import re

    stem = image_id[: image_id.rfind(".")] if image_id.lower().endswith((".png", ".jpg", ".jpeg")) else image_id
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "image"
    return f"{index:08d}_{safe}.png"


def _save_crops(folder: Path, source, batch, n: int) -> None:
    from PIL import Image

    for row, index in enumerate(batch.indices[:n]):
        if batch.valid[row]:
            path = folder / crop_name(index, source.ids[index])
            try:
                Image.fromarray(batch.images[row]).save(path)
            except OSError as error:
                raise UserError(
                    f"cannot write {path} ({error.strerror or error}); free space or choose another --save-aligned."
                ) from None


def _span(blocks: tuple[int, ...]) -> str:
    if list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


class Progress:
    """tqdm on a terminal (images/s, ETA); a plain line every 30 s otherwise (batch-job logs)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= 30:
            self.last = now
            rate = self.done / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
