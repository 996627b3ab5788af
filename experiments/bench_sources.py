"""Read + decode throughput of every source on the same JPEG images (no model).

    python -m experiments.bench_sources [--images 4000] [--size 112] [--piece-rows 1024] [--threads 1,2]
        [--passes 3] [--kinds images,list,rec,wds,parquet] [--out experiments/results/bench_sources_cpu.json]
        [--overwrite]

The same --images JPEGs (--size square, smooth synthetic faces-sized pictures, quality 90, all distinct)
are written as a folder, a list file naming those files, a plain im2rec RecordIO (tests/recordio_writer.py),
WebDataset shards of 1000 samples (written by the `webdataset` package) and a Parquet file with row groups
of 1000 (binary image column, written by pyarrow). Each source is then opened through the Source/Pieces
API a chunked run uses (`vitnt_jax.sources.SourceSpec(kind, location).open_pieces(--piece-rows)`) and
every piece read and every image decoded to uint8 (H, W, 3), in order (--threads 1) or by a thread pool
over each piece's inputs as the pipeline's loader threads do: images/s (median of --passes, which
interleave the sources; the first pass also warms the OS page cache, so the figures are warm-cache
ones) and the open (planning) time.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("images", "list", "rec", "wds", "parquet")


def jpegs(count: int, size: int) -> list[bytes]:
    """Returns `count` distinct smooth JPEGs (a random 14x14 picture upsampled, plus mild noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(small, np.int16) + rng.integers(-6, 7, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_sources(work: Path, images: list[bytes], kinds: list[str]) -> dict[str, tuple[str, dict]]:
    """Writes each kind's files; returns {kind: (location, options)}."""
    import importlib.util

    n = len(images)
    where: dict[str, tuple[str, dict]] = {}
    if "images" in kinds or "list" in kinds:
        folder = work / "folder"
        for k, data in enumerate(images):
            sub = folder / f"{k // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{k:06d}.jpg").write_bytes(data)
        (work / "files.txt").write_text("".join(f"{folder / f'{k // 1000:03d}' / f'{k:06d}.jpg'}\n" for k in range(n)))
        where["images"] = (str(folder), {})
        where["list"] = (str(work / "files.txt"), {})
    if "rec" in kinds:
        spec = importlib.util.spec_from_file_location("recordio_writer", ROOT / "tests" / "recordio_writer.py")
        writer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(writer)
        writer.write_rec(work / "data.rec", ((float(k % 100), data) for k, data in enumerate(images)))
        where["rec"] = (str(work / "data.rec"), {})
    if "wds" in kinds:
        import webdataset

        shards = (n + 999) // 1000
        for s in range(shards):
            with webdataset.TarWriter(str(work / f"shard-{s:06d}.tar")) as sink:
                for k in range(s * 1000, min(n, (s + 1) * 1000)):
                    sink.write({"__key__": f"{k:06d}", "jpg": images[k], "cls": k % 100})
        where["wds"] = (str(work / f"shard-{{000000..{shards - 1:06d}}}.tar"), {})
    if "parquet" in kinds:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "id": [f"{k:06d}" for k in range(n)],
                "image": pa.array(images, pa.binary()),
                "label": [k % 100 for k in range(n)],
            }
        )
        pq.write_table(table, work / "data.parquet", row_group_size=1000)
        where["parquet"] = (str(work / "data.parquet"), {})
    return {k: where[k] for k in kinds}


def read_all(kind: str, location: str, options: dict, piece_rows: int, threads: int) -> tuple[float, float, int]:
    """Opens the source, reads every piece and decodes every image; returns (open s, total s, images)."""
    from vitnt_jax import sources
    from vitnt_jax.data import ImageError

    start = time.perf_counter()
    spec = sources.SourceSpec(kind, sources.SOURCES[kind].location_type(location), tuple(options.items()))
    pieces = spec.open_pieces(piece_rows)
    opened = time.perf_counter() - start
    count = failed = 0

    def load(src, j):
        try:
            image = src.load(j)
            assert image.dtype == np.uint8 and image.ndim == 3
            return 1
        except ImageError:
            return 0

    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        for piece in pieces.pieces:
            src = piece.read()
            if threads <= 1:
                done = [load(src, j) for j in range(len(src))]
            else:
                done = list(pool.map(lambda j, src=src: load(src, j), range(len(src))))
            count += sum(done)
            failed += len(done) - sum(done)
    if failed:
        raise SystemExit(f"error: {failed} images of {kind} failed to decode")
    return opened, time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> int:
    from experiments import harness
    from experiments.benchmark import machine
    from vitnt_jax import sources

    parser = harness.Parser(prog="python -m experiments.bench_sources", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="JPEGs written to every source (default: 4000)")
    parser.add_argument("--size", type=int, default=112, help="their width and height (default: 112)")
    parser.add_argument("--piece-rows", type=int, default=1024, help="open_pieces(rows) (default: 1024)")
    parser.add_argument("--threads", default="1,2", help="decoding threads, comma-separated (default: 1,2)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per figure (median; default: 3)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="sources measured (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="keep the written sources in this folder")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (and a .md beside)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(f"error: {args.out} already exists; pass --overwrite to replace it, or choose another --out.")
        return 1
    kinds = [k for k in args.kinds.split(",") if k]
    missing = [k for k in kinds if k not in sources.SOURCES]
    if missing:
        print(f"note: no {', '.join(missing)} source registered yet; skipped")
        kinds = [k for k in kinds if k not in missing]
    threads = [int(t) for t in args.threads.split(",")]
    info = machine()
    report: dict = {
        "machine": info,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "images": args.images,
        "size": args.size,
        "piece_rows": args.piece_rows,
        "passes": args.passes,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = jpegs(args.images, args.size)
        report["jpeg_bytes_mean"] = float(np.mean([len(d) for d in data]))
        where = write_sources(work, data, kinds)
        report["load_average_before"] = os.getloadavg()
        # passes interleave the sources, so that other work on the machine slows each alike
        timed: dict[tuple[str, int], list] = {(kind, t): [] for kind in kinds for t in threads}
        for _ in range(args.passes):
            for kind in kinds:
                location, options = where[kind]
                for t in threads:
                    timed[kind, t].append(read_all(kind, location, options, args.piece_rows, t))
        report["load_average_after"] = os.getloadavg()
        for (kind, t), passes in timed.items():
            seconds = statistics.median(p[1] for p in passes)
            row = {
                "source": kind,
                "threads": t,
                "images_per_s": passes[0][2] / seconds,
                "open_s": statistics.median(p[0] for p in passes),
                "seconds": [p[1] for p in passes],
            }
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    base = {r["threads"]: r["images_per_s"] for r in report["results"] if r["source"] == "images"}
    lines = [
        f"# Read + decode throughput, {args.images} JPEGs {args.size}x{args.size} "
        f"(mean {report['jpeg_bytes_mean']:.0f} bytes), pieces of {args.piece_rows}",
        "",
        f"{info.get('cpu_model', info['processor'])}, {info['cpu_count']} cores, {report['date_utc']} UTC; "
        f"median of {args.passes} interleaved passes, warm page cache; load average "
        f"{report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} after.",
        "",
        "| source | threads | images/s | vs folder | open (s) |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ratio = f"{r['images_per_s'] / base[r['threads']]:.2f}x" if r["threads"] in base else "-"
        lines.append(f"| {r['source']} | {r['threads']} | {r['images_per_s']:.0f} | {ratio} | {r['open_s']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
