"""Start-up time of the scoring CLI with JAX's persistent compilation cache cold, warm and off.

    python -m experiments.bench_startup [--model testing] [--images 8] [--repeats 3]
        [--out experiments/results/bench_startup_cpu.json] [--overwrite]

Each measurement is one `python -m vitnt_jax.score --images DIR --model MODEL --out X --batch-size N`
process scoring a single batch of N small JPEGs, timed from its start to its exit (so start-up plus
one batch: imports, model load, compilation or cache load, one batch, the result file):
  cold  an empty compilation cache folder (the run compiles and writes the cache)
  warm  the folder a cold run filled (the run loads its programs from it)
  off   no persistent cache (compiles every time, writes nothing)
and, as the floor, `python -c "import vitnt_jax.score"` (interpreter and imports alone).
The median of --repeats runs of each is reported, with the seconds XLA spent compiling in it (from
JAX_LOG_COMPILES's "Finished XLA compilation" lines: what the cache saves, whatever else loads the
machine). The model must be converted already (a named
model is never downloaded here: a model that is not in the cache folder is reported as skipped).
The cache is set with `--compile-cache DIR|off` when the CLI has that flag, and always also through
JAX's own environment variables (JAX_COMPILATION_CACHE_DIR, JAX_ENABLE_COMPILATION_CACHE=false for
off), which set the same configuration.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _jpegs(folder: Path, count: int, size: int = 112) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def _has_flag() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "vitnt_jax.score", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    return "--compile-cache" in done.stdout


_COMPILED = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.e+-]+) sec")


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Runs a command; returns (wall seconds, seconds XLA spent compiling, from JAX_LOG_COMPILES lines)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, sum(float(m.group(2)) for m in _COMPILED.finditer(done.stderr))


def main(argv: list[str] | None = None) -> int:
    from experiments import harness
    from experiments.benchmark import machine
    from vitnt_jax import cache

    parser = harness.Parser(prog="python -m experiments.bench_startup", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testing", help="a converted model name or checkpoint folder")
    parser.add_argument("--images", type=int, default=8, help="images in the one scored batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(f"error: {args.out} already exists; pass --overwrite to replace it, or choose another --out.")
        return 1
    named = not Path(args.model).is_dir()
    if named and not (cache.cache_dir() / args.model).is_dir():
        print(f"skipped: model {args.model} is not converted in {cache.cache_dir()} (never downloaded here)")
        return 0

    flag = _has_flag()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    base_env.pop(cache.MIN_COMPILE_TIME_ENV, None)
    base_env["JAX_LOG_COMPILES"] = "1"  # each compilation's time is logged (a cache hit compiles nothing)
    base_env["PYTHONPATH"] = str(ROOT) + os.pathsep + base_env.get("PYTHONPATH", "")
    times: dict[str, list[float]] = {"import": [], "cold": [], "warm": [], "off": []}
    compiling: dict[str, list[float]] = {"import": [], "cold": [], "warm": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _jpegs(tmp / "images", args.images)

        def score(setting: str, out: str) -> float:
            command = [sys.executable, "-m", "vitnt_jax.score", "--images", str(tmp / "images"), "--model", args.model]
            command += ["--out", str(tmp / out), "--overwrite", "--batch-size", str(args.images)]
            env = dict(base_env)
            if flag:
                command += ["--compile-cache", setting]
            # and JAX's own variables, so the figures hold whether or not the flag is wired in yet
            if setting != "off":
                env["JAX_COMPILATION_CACHE_DIR"] = cache.compile_cache_dir(setting)
                env[cache.MIN_COMPILE_TIME_ENV] = str(cache.MIN_COMPILE_TIME_S)
            else:
                env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
            return _timed(command, env)

        for r in range(args.repeats):
            folder = str(tmp / f"xla{r}")
            steps = (
                ("import", _timed, ([sys.executable, "-c", "import vitnt_jax.score"], base_env)),
                ("cold", score, (folder, f"cold{r}.csv")),
                ("warm", score, (folder, f"warm{r}.csv")),
                ("off", score, ("off", f"off{r}.csv")),
            )
            for kind, step, step_args in steps:
                wall, compiled = step(*step_args)
                times[kind].append(wall)
                compiling[kind].append(compiled)
            shown = ", ".join(f"{k} {v[-1]:.2f} s (compiling {compiling[k][-1]:.2f} s)" for k, v in times.items())
            print(f"run {r}: {shown}", flush=True)
        entries = sorted(p.name for p in (Path(cache.compile_cache_dir(str(tmp / "xla0")))).iterdir())
    report = {
        "machine": machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "model": args.model,
        "images": args.images,
        "repeats": args.repeats,
        "set_through": ("--compile-cache and " if flag else "") + "JAX_COMPILATION_CACHE_DIR",
        "cache_entries": len(entries),
        "seconds": {k: v for k, v in times.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "compiling_s": compiling,
        "median_compiling_s": {k: statistics.median(v) for k, v in compiling.items()},
        "load_average": os.getloadavg(),
    }
    median = report["median_s"]
    c = report["median_compiling_s"]
    print(
        f"model {args.model}, one batch of {args.images}: import {median['import']:.2f} s, cold {median['cold']:.2f} s"
        f" (compiling {c['cold']:.2f} s), warm {median['warm']:.2f} s (compiling {c['warm']:.2f} s), off"
        f" {median['off']:.2f} s (compiling {c['off']:.2f} s); {len(entries)} cache entries"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
