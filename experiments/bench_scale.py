"""Scale benchmark: a generated RecordIO of many small records scored with the tiny `testing` model.

    python -m experiments.bench_scale [--records 200000] [--chunk-rows 4096] [--marks 50000,100000,200000]
        [--kill-at 0.5] [--sources rec,list] [--work DIR] [--out experiments/results/bench_scale_cpu.json]
        [--overwrite]

    quick check (about a minute):  python -m experiments.bench_scale --records 5000 --chunk-rows 512 --out X.json

What it does, each step a `python -m vitnt_jax.score ... --model testing --chunk-rows N` process:
  1. writes --records small JPEGs (32x32, the testing model's input, drawn from a pool of 512 distinct
     images) into a plain im2rec RecordIO (`data.rec` + `data.idx`, keys 0..N-1, with
     tests/recordio_writer.py) and, for the comparison, the same bytes as files named by a list file;
  2. scores each source (`--rec data.rec`, `--list files.txt`) once, sampling the scoring process's
     RSS (with its children) and the committed chunks in OUT.chunks/ every 0.5 s: rows/s overall and
     between the first and last commit (steady state), time to the first committed chunk (start-up),
     the merge's time, peak RSS up to each of --marks committed rows (flat = memory does not grow
     with the rows), the whole run's peak;
  3. scores the first source again, SIGKILLs it (its whole process group) once --kill-at of the rows
     are committed and half a piece's scoring time more, then reruns it with --resume: time to its
     first new chunk, the rows it scored, and the rows the killed run had scored but not committed
     (estimated from its steady rate and the time since its last commit; at most one piece), then
     checks that the merged result holds every id once, with the scores of the uninterrupted run
     (rtol 1e-6) and, across sources, equal scores for equal images.
Figures go to --out (JSON) and the same path with .md (a short table). --work keeps the data (default:
a temporary folder, removed at the end).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.5
POOL = 512
SIZE = 32


def _recordio_writer():
    """Imports tests/recordio_writer.py by path (tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("recordio_writer", ROOT / "tests" / "recordio_writer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pool() -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(POOL):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_data(work: Path, records: int, sources: list[str]) -> dict[str, float]:
    """Writes data.rec/.idx and files/ + files.txt (the same bytes); returns how long each took."""
    pool = _pool()
    took = {}
    if "rec" in sources:
        start = time.perf_counter()
        writer = _recordio_writer()
        writer.write_rec(work / "data.rec", ((float(k % 1000), pool[k % POOL]) for k in range(records)))
        took["rec"] = time.perf_counter() - start
    if "list" in sources:
        start = time.perf_counter()
        with open(work / "files.txt", "w", encoding="utf-8") as listing:
            for k in range(records):
                folder = work / "files" / f"{k // 1000:05d}"
                if k % 1000 == 0:
                    folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{k:08d}.jpg"
                path.write_bytes(pool[k % POOL])
                listing.write(f"{path}\n")
        took["list"] = time.perf_counter() - start
    return took


def _flags(kind: str, work: Path) -> list[str]:
    return ["--rec", str(work / "data.rec")] if kind == "rec" else ["--list", str(work / "files.txt")]


class Sampler(threading.Thread):
    """Samples a process tree's RSS and the committed rows of a chunk folder every SAMPLE_S seconds."""

    def __init__(self, pid: int, chunks: Path, start: float):
        super().__init__(daemon=True)
        self.pid, self.chunks, self.start_time = pid, chunks, start
        self.samples: list[tuple[float, int, int, int]] = []  # (s since start, rss bytes, committed rows, chunks)
        self.commits: dict[str, float] = {}  # chunk name -> s since start when first seen
        self.stopped = threading.Event()

    def committed(self) -> tuple[int, int]:
        rows = count = 0
        try:
            names = os.listdir(self.chunks)
        except OSError:
            names = []
        now = time.perf_counter() - self.start_time
        for name in names:
            stem, _, suffix = name.partition(".")
            if suffix in ("csv", "txt", "parquet") and "-r" in stem:
                rows += int(stem.split("-r")[1])
                count += 1
                self.commits.setdefault(name, now)
        return rows, count

    def run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stopped.is_set():
            rss = 0
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            rows, count = self.committed()
            self.samples.append((time.perf_counter() - self.start_time, rss, rows, count))
            self.stopped.wait(SAMPLE_S)


def score(
    kind: str,
    work: Path,
    out: Path,
    args,
    *,
    resume: bool = False,
    kill_at_rows: int | None = None,
    kill_delay_s: float = 0.0,
) -> dict:
    """Runs one scoring process (SIGKILLed `kill_delay_s` after `kill_at_rows` are committed); returns its figures."""
    command = [sys.executable, "-m", "vitnt_jax.score", *_flags(kind, work), "--model", "testing"]
    command += ["--out", str(out), "--chunk-rows", str(args.chunk_rows)]
    command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    command += ["--resume"] if resume else ["--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    chunks = Path(str(out) + ".chunks")
    log = open(out.with_suffix(out.suffix + (".resume" if resume else "") + ".log"), "w")  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    sampler = Sampler(proc.pid, chunks, start)
    already = sampler.committed()  # chunks committed before this run (a resumed one's)
    before = set(sampler.commits)
    sampler.start()
    killed_at = None
    try:
        while proc.poll() is None:
            rows, _ = sampler.committed()  # every 0.05 s: when each chunk appeared, to 0.05 s
            if kill_at_rows is not None and rows >= kill_at_rows:
                time.sleep(kill_delay_s)  # into the next piece, so that the kill loses part of one
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.perf_counter() - start
                proc.wait()
                break
            time.sleep(0.05)
        proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sampler.stopped.set()
        sampler.join()
        log.close()
    seconds = time.perf_counter() - start
    new = sorted(t for name, t in sampler.commits.items() if name not in before)
    final_rows, final_chunks = sampler.committed() if killed_at is not None else (None, None)
    text = Path(log.name).read_text(errors="replace")
    if killed_at is None and proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {proc.returncode}:\n{text[-3000:]}")
    scored = next((line for line in reversed(text.splitlines()) if line.startswith("scored ")), "")
    samples = sampler.samples
    result = {
        "command": " ".join(command),
        "seconds": seconds,
        "returncode": proc.returncode,
        "committed_before": already[0],
        "first_commit_s": new[0] if new else None,
        "last_commit_s": new[-1] if new else None,
        "new_chunks": len(new),
        "peak_rss_mb": max((s[1] for s in samples), default=0) / 2**20,
        "samples": [[round(t, 2), round(rss / 2**20, 1), rows] for t, rss, rows, _ in samples],
        "summary_line": scored,
    }
    if killed_at is not None:
        result.update(killed_at_s=killed_at, committed_at_kill=final_rows, chunks_at_kill=final_chunks)
    return result


def _rss_up_to(samples: list, marks: list[int], records: int) -> dict[str, float]:
    """Peak RSS (MB) of the samples taken before `mark` rows were committed, for each mark reached."""
    out = {}
    for mark in marks:
        if mark >= records:  # the whole run (its last chunks may be merged away between two samples)
            out[str(mark)] = max((rss for _, rss, _ in samples), default=0)
        elif any(rows >= mark for _, _, rows in samples):
            out[str(mark)] = max(rss for _, rss, rows in samples if rows < mark)
    return out


def _read(out: Path) -> dict[str, float]:
    with open(out, newline="", encoding="utf-8") as f:
        return {row["id"]: float(row["quality"]) if row["quality"] else float("nan") for row in csv.DictReader(f)}


def _qualities_in_order(rows: dict[str, float], kind: str) -> np.ndarray:
    """The qualities by input position: a rec id is its key, a list id the path ending in its position."""
    if kind == "rec":
        keyed = sorted((int(k), q) for k, q in rows.items())
    else:
        keyed = sorted((int(Path(k).stem), q) for k, q in rows.items())
    return np.array([q for _, q in keyed], np.float32)


def _scored(line: str) -> int | None:
    """The rows a run scored and failed, from its last line 'scored N, failed M, ...'."""
    try:
        parts = line.replace(",", " ").split()
        return int(parts[1]) + int(parts[3])
    except (IndexError, ValueError):
        return None


def _has_flag(name: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "vitnt_jax.score", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    return name in done.stdout


def _run_figures(kind: str, run: dict, records: int, marks: list[int]) -> dict:
    first, last = run["first_commit_s"], run["last_commit_s"]
    samples = run["samples"]
    return {
        "source": kind,
        "seconds": run["seconds"],
        "rows_per_s": records / run["seconds"],
        "steady_rows_per_s": (records - records / max(run["new_chunks"], 1)) / (last - first)
        if last and first and last > first
        else None,
        "first_chunk_s": first,
        "merge_s": run["seconds"] - last if last else None,  # from the last commit seen to the exit
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_mb_up_to_rows": _rss_up_to(samples, marks, records),
        "summary_line": run["summary_line"],
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Scale benchmark: {report['records']} records, `testing` model, --chunk-rows {report['chunk_rows']}",
        "",
        f"{report['machine_words']}, {report['date_utc']} UTC.",
        "",
        "| source | rows/s (whole run) | rows/s (steady) | first chunk (s) | merge (s) | peak RSS (MB) | "
        + " | ".join(f"peak RSS to {m} rows" for m in report["marks"])
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(report["marks"]),
    ]
    for r in report["runs"]:
        steady = f"{r['steady_rows_per_s']:.0f}" if r["steady_rows_per_s"] else "-"
        merge = f"{r['merge_s']:.1f}" if r["merge_s"] is not None else "-"
        up = " | ".join(f"{r['peak_rss_mb_up_to_rows'].get(str(m), float('nan')):.0f}" for m in report["marks"])
        lines.append(
            f"| {r['source']} | {r['rows_per_s']:.0f} | {steady} | {r['first_chunk_s']:.1f} | {merge} | "
            f"{r['peak_rss_mb']:.0f} | {up} |"
        )
    k = report.get("resume")
    if k:
        lines += [
            "",
            f"Kill and resume ({k['source']}): SIGKILL at {k['killed_at_s']:.1f} s with {k['committed_at_kill']} rows "
            f"committed, {k['killed_s_after_last_commit']:.2f} s after its last commit: it had scored about "
            f"{k['uncommitted_rows_estimate']:.0f} rows more (lost, at most one piece); `--resume` committed its "
            f"first new chunk after {k['resume_first_chunk_s']:.1f} s "
            f"(a fresh run: {k['fresh_first_chunk_s']:.1f} s), scored {k['resume_scored']} rows, "
            f"whole resumed run {k['resume_seconds']:.1f} s; merged rows {k['merged_rows']} "
            f"(unique ids {k['unique_ids']}), scores equal to the uninterrupted run: {k['scores_match']}.",
        ]
    if "sources_agree" in report:
        lines += ["", f"Same images through every source give the same scores: {report['sources_agree']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from experiments import harness
    from experiments.benchmark import machine

    parser = harness.Parser(prog="python -m experiments.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records generated (default: 200000)")
    parser.add_argument("--chunk-rows", type=int, default=4096, help="--chunk-rows of every run (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="--batch-size of every run (default: the CLI's)")
    parser.add_argument("--marks", default=None, help="rows at which peak RSS is reported (default: N/4, N/2, N)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of rows committed before the SIGKILL")
    parser.add_argument("--sources", default="rec,list", help="sources compared, the first also killed and resumed")
    parser.add_argument("--work", type=Path, default=None, help="keep the data and results in this folder")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds any one run may take")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (and a .md beside)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(f"error: {args.out} already exists; pass --overwrite to replace it, or choose another --out.")
        return 1
    records = args.records
    marks = [int(m) for m in args.marks.split(",")] if args.marks else [records // 4, records // 2, records]
    sources = args.sources.split(",")
    missing = [k for k in sources if not _has_flag(f"--{k} ")]
    if missing:
        print(f"note: the CLI has no {', '.join('--' + k for k in missing)} yet; those sources are skipped")
        sources = [k for k in sources if k not in missing]
    if not sources:
        print("error: no source to score")
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = machine()
        report: dict = {
            "machine": info,
            "machine_words": f"{info.get('cpu_model', info['processor'])}, {info['cpu_count']} cores",
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "records": records,
            "chunk_rows": args.chunk_rows,
            "batch_size": args.batch_size,
            "marks": marks,
            "sample_s": SAMPLE_S,
        }
        print(f"writing {records} records ({', '.join(sources)}) into {work} ...", flush=True)
        report["write_s"] = write_data(work, records, sources)
        runs, rows_by_source = {}, {}
        for kind in sources:
            print(f"scoring --{kind} ...", flush=True)
            runs[kind] = score(kind, work, work / f"{kind}.csv", args)
            rows_by_source[kind] = _read(work / f"{kind}.csv")
            figures = _run_figures(kind, runs[kind], records, marks)
            print(json.dumps({k: v for k, v in figures.items() if k != "summary_line"}), flush=True)
        report["runs"] = [_run_figures(kind, runs[kind], records, marks) for kind in sources]
        report["samples"] = {kind: runs[kind]["samples"] for kind in sources}
        ordered = {kind: _qualities_in_order(rows_by_source[kind], kind) for kind in sources}
        first = sources[0]
        report["sources_agree"] = all(
            len(ordered[k]) == records and np.allclose(ordered[k], ordered[first], rtol=1e-6, atol=0, equal_nan=True)
            for k in sources
        )

        kind = first
        out = work / f"{kind}.killed.csv"
        print(f"scoring --{kind} again, SIGKILL at {args.kill_at:.0%} of the rows, then --resume ...", flush=True)
        steady = _run_figures(kind, runs[kind], records, marks)["steady_rows_per_s"] or records / runs[kind]["seconds"]
        delay = 0.5 * args.chunk_rows / steady  # half a piece's scoring time
        killed = score(kind, work, out, args, kill_at_rows=int(args.kill_at * records), kill_delay_s=delay)
        if "killed_at_s" not in killed:
            raise SystemExit("error: the run finished before the kill; use more --records or a smaller --kill-at")
        resumed = score(kind, work, out, args, resume=True)
        merged = _read(out)
        fresh = runs[kind]
        rate = steady
        # the killed run scored on from its last commit (seen to 0.05 s) until the kill: that work is lost
        since_commit = killed["killed_at_s"] - (killed["last_commit_s"] or 0)
        report["resume"] = {
            "source": kind,
            "killed_at_s": killed["killed_at_s"],
            "committed_at_kill": killed["committed_at_kill"],
            "kill_delay_s": delay,
            "killed_s_after_last_commit": since_commit,
            "uncommitted_rows_estimate": min(rate * max(since_commit, 0), args.chunk_rows),
            "resume_first_chunk_s": resumed["first_commit_s"],
            "fresh_first_chunk_s": fresh["first_commit_s"],
            "resume_seconds": resumed["seconds"],
            "resume_scored": _scored(resumed["summary_line"]),
            "resume_summary_line": resumed["summary_line"],
            "resume_peak_rss_mb": resumed["peak_rss_mb"],
            "merged_rows": len(merged),
            "unique_ids": len(set(merged)),
            "scores_match": len(merged) == records
            and bool(np.allclose(_qualities_in_order(merged, kind), ordered[kind], rtol=1e-6, atol=0, equal_nan=True)),
        }
        report["samples"]["killed"] = killed["samples"]
        report["samples"]["resumed"] = resumed["samples"]
        print(json.dumps(report["resume"]), flush=True)
    text = markdown(report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
