"""Time per image of the training-free FIQA baselines and of ViTNT-FIQA, same backbone, same harness.

    python -m experiments.baseline_timing [--models cvlface_vit_small,cvlface_vit_base] [--batch-size 8]
        [--runs 5] [--passes 100] [--methods vitnt,serfiq,grafiqs,attn_fiqa,embedding_norm]
        [--out experiments/results/baseline_timing_cpu.json] [--overwrite]

Random weights (timing does not depend on them). Every method is one jitted function from a
(batch, 112, 112, 3) uint8 array to (batch,) qualities, preprocessing included, on the default
device with the default matmul precision. Each is compiled ahead of time (compile seconds and
XLA's temporary buffer size are reported), called once to warm up, then timed --runs times;
the figure is the median batch time divided by the batch size (also: the fastest run, and the
median CPU time of this process, which load from other processes disturbs far less). Methods are
timed round-robin so that load from other processes falls on all of them alike; the load average
is recorded.
ViTNT-FIQA runs as the scorer does (`score_streaming`, the preset's published block selection,
attention weighting): blocks after the last selected one never run (ViT-B: 20 of 24 blocks).
The baselines need the full depth: SER-FIQ, GraFIQs and the embedding norm read the embedding
head, ATTN-FIQA the last block.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from experiments import baselines

METHODS = ("vitnt", *baselines.METHODS)


def build(method: str, config, variables, passes: int):
    """Returns (jitted fn(variables, images) -> (B,), the variables it takes, forward, backward, blocks run)."""
    import jax

    from experiments import baseline_methods as bl
    from vitnt_jax.model import truncate_blocks
    from vitnt_jax.scorer import preprocess, score_streaming
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    if method == "vitnt":
        settings = ScoreSettings(parse_blocks(config.default_blocks, config.depth))
        run = settings.num_blocks_to_run

        def fn(v, x):
            return score_streaming(config, v, preprocess(x, config), settings)["quality"]

        return jax.jit(fn), truncate_blocks(variables, run), "1", 0, run
    baseline = bl.BASELINES[method]
    if method == "serfiq":
        key = jax.random.PRNGKey(0)

        def fn(v, x):
            return bl.serfiq(v, config, x, key, passes=passes)

        return jax.jit(fn), variables, f"1 backbone + {passes} head", 0, config.depth
    return jax.jit(lambda v, x: baseline.fn(v, config, x)), variables, baseline.forward, baseline.backward, config.depth


def prepare(method: str, model: str, batch: int, passes: int) -> dict:
    """Returns the compiled, warmed-up method on one preset, with its static figures."""
    import jax
    import jax.numpy as jnp

    from vitnt_jax.config import PRESETS
    from vitnt_jax.model import init_variables

    config = PRESETS[model]
    variables = init_variables(config, seed=0)
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, config.img_size, config.img_size, 3), dtype=np.uint8)
    )
    fn, v, forward, backward, blocks = build(method, config, variables, passes)
    v = jax.device_put(v)
    start = time.perf_counter()
    compiled = fn.lower(v, images).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    out = compiled(v, images).block_until_ready()  # warm-up
    if out.shape != (batch,) or not bool(jnp.all(jnp.isfinite(out))):
        raise RuntimeError(f"{method} on {model} gave {out.shape} / non-finite qualities.")
    row = {
        "model": model,
        "method": method,
        "batch": batch,
        "forward_per_image": forward,
        "backward_per_image": backward,
        "blocks_run": blocks,
        "compile_s": compile_s,
    }
    if memory is not None:
        row["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
    return {"row": row, "call": lambda: compiled(v, images).block_until_ready()}


def measure(model: str, methods: list[str], batch: int, runs: int, passes: int) -> list[dict]:
    """Returns one timing row per method on one preset.

    The methods are timed round-robin (run 1 of every method, then run 2, ...) so that load from
    other processes on a shared machine falls on all of them alike.
    """
    prepared = [prepare(m, model, batch, passes) for m in methods]
    times: list[list[float]] = [[] for _ in prepared]
    cpu: list[list[float]] = [[] for _ in prepared]
    for _ in range(runs):
        for t, c, p in zip(times, cpu, prepared, strict=True):
            start, start_cpu = time.perf_counter(), time.process_time()
            p["call"]()
            t.append(time.perf_counter() - start)
            c.append(time.process_time() - start_cpu)
    rows = []
    for t, c, p in zip(times, cpu, prepared, strict=True):
        seconds = statistics.median(t)
        rows.append(
            {
                **p["row"],
                "batch_seconds_median": seconds,
                "batch_seconds_min": min(t),
                "batch_seconds_all": t,
                "ms_per_image": 1e3 * seconds / batch,
                "ms_per_image_min": 1e3 * min(t) / batch,
                # CPU seconds of this process (all its threads): the work done, which load from
                # other processes changes far less than the wall-clock time.
                "cpu_ms_per_image": 1e3 * statistics.median(c) / batch,
                "images_per_s": batch / seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Times the methods; returns the exit status (0 ok, 1 user error, 2 flag error)."""
    from experiments import harness
    from vitnt_jax import cli

    parser = harness.Parser(prog="python -m experiments.baseline_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cvlface_vit_small,cvlface_vit_base", help="comma-separated presets")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call (default: 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per method (default: 5)")
    parser.add_argument(
        "--passes", type=int, default=baselines.SERFIQ_PASSES, help="SER-FIQ stochastic head passes (default: 100)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return cli.run_command(lambda: _run(args, methods), debug=args.debug, errors=(ValueError,))


def _run(args, methods: list[str]) -> int:
    from experiments import baseline_methods as bl
    from experiments.benchmark import machine
    from vitnt_jax.config import PRESETS

    if args.batch_size < 1 or args.runs < 1:
        raise ValueError("--batch-size and --runs must be at least 1.")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out.")
    models = args.models.split(",")
    missing = sorted(set(models) - set(PRESETS))
    if missing:
        raise ValueError(f"unknown presets {missing} in --models; choose from {', '.join(sorted(PRESETS))}.")

    report = {
        "machine": machine(),
        "batch": args.batch_size,
        "runs": args.runs,
        "serfiq_passes": args.passes,
        "serfiq_dropout": bl.SERFIQ_DROPOUT,
        "precision": "default",
        # Other processes share this machine's cores; the load average says how much.
        "load_average_start": os.getloadavg(),
        "dtype": "float32",
        "rows": [],
    }
    print(
        f"{'model':18s} {'method':15s} {'forward':>21s} {'bwd':>3s} {'blocks':>6s} {'ms/img':>8s} {'min':>8s} "
        f"{'x ViTNT':>7s} {'CPU ms':>8s} {'x ViTNT':>7s}"
    )
    for model in models:
        rows = measure(model, methods, args.batch_size, args.runs, args.passes)
        ref = next((r for r in rows if r["method"] == "vitnt"), None)
        for row in rows:
            if ref is not None:
                row["relative_to_vitnt"] = row["ms_per_image"] / ref["ms_per_image"]
                row["cpu_relative_to_vitnt"] = row["cpu_ms_per_image"] / ref["cpu_ms_per_image"]
            report["rows"].append(row)
            rel = f"{row['relative_to_vitnt']:7.2f}" if ref else f"{'-':>7s}"
            cpu_rel = f"{row['cpu_relative_to_vitnt']:7.2f}" if ref else f"{'-':>7s}"
            print(
                f"{model:18s} {row['method']:15s} {row['forward_per_image']:>21s} {row['backward_per_image']:3d} "
                f"{row['blocks_run']:6d} {row['ms_per_image']:8.1f} {row['ms_per_image_min']:8.1f} {rel} "
                f"{row['cpu_ms_per_image']:8.1f} {cpu_rel}",
                flush=True,
            )
    report["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
