"""Throughput, memory and FLOP utilisation of ViTNT-FIQA scoring, against a vectorised PyTorch
implementation, our plain forward pass and the machine's own matmul peak, all in one run.

    python -m experiments.benchmark [--models cvlface_vit_base,cvlface_vit_small] [--batch-sizes 8,32,64]
        [--runs 5] [--input] [--out experiments/results/benchmark_cpu.json] [--overwrite]

Every measurement runs in its own subprocess (so peak RSS belongs to it alone): after one warm-up
call (compilation), the median of --runs timed calls. Implementations:
  stream   our scorer as the CLI runs it (uint8 in, streaming scan carry, jit, CPU micro-batches)
  states   our states path: every block's normalised states stacked, then scored
  forward  our plain forward pass up to the last selected block, no score, micro-batched like the
           scorer (the cost floor)
  torch    experiments/torch_vitnt.py: vectorised PyTorch, eager, inference_mode, same threads,
           our weights (CUDA and --dtype where available)
  matmul   fp32 square matmul (n=2048; 8192 on accelerators) in JAX and in PyTorch, fastest of
           at least 5 calls: the machine's measured peak
FLOPs per image are analytic (multiply-add = 2): patch embedding + for each run block
2N(3D^2) qkv + 4N^2 D attention + 2N D^2 projection + 4N D M MLP; LayerNorm, softmax and the
score maths are not counted. Utilisation = achieved FLOP/s / the better measured matmul peak.
Memory: peak process RSS (all implementations), the device's peak bytes in use on GPU/TPU and,
for JAX, the compiled program's temporaries and whole footprint (XLA memory analysis).
The run ends with issue 6's targets, each computed from this run's own figures.
--input adds decoding throughput per thread count and the end-to-end CLI on a folder of JPEGs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def flops_per_image(config, blocks_run: int) -> float:
    """Returns the analytic FLOPs of one image through patch embedding and `blocks_run` blocks."""
    n, d, m, p = config.num_tokens, config.embed_dim, config.mlp_dim, config.patch_size
    patch = 2 * config.num_patches * (p * p * config.in_channels) * d
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * m
    return float(patch + blocks_run * block)


def _timed(fn, runs: int, best: bool = False) -> tuple[float, float]:
    """Returns (median seconds of `runs` calls, or the fastest with best=True; the warm-up call's seconds)."""
    start = time.perf_counter()
    fn()  # warm-up: compilation / allocator
    warm = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (min(times) if best else statistics.median(times)), warm


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _jax_device_peak_mb() -> float | None:
    """Returns the device's peak bytes in use (GPU/TPU) in MB, or None where JAX reports none (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _xla_memory(compiled) -> dict:
    """Returns the compiled program's temporaries and whole footprint (arguments + outputs + temporaries)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    footprint = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"xla_temp_mb": memory.temp_size_in_bytes / 2**20, "xla_footprint_mb": footprint / 2**20}


def matmul_size(backend: str) -> int:
    """Returns the square matmul size that reaches the backend's peak (accelerators need bigger ones)."""
    return 2048 if backend == "cpu" else 8192


def worker(spec: dict) -> dict:
    """Runs one measurement (in its own process) and returns its figures."""
    kind, runs = spec["kind"], spec["runs"]
    threads = spec["threads"]
    bf16 = spec.get("dtype") == "bfloat16"
    if kind in ("matmul_torch", "torch"):
        import torch

        torch.set_num_threads(threads)
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = torch.bfloat16 if bf16 else torch.float32
        sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    if kind.startswith("matmul"):
        import jax

        n = matmul_size(jax.default_backend() if kind == "matmul_jax" else ("gpu" if torch_device == "cuda" else "cpu"))
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        if kind == "matmul_jax":
            import jax.numpy as jnp

            x = jax.device_put(a.astype(jnp.bfloat16) if bf16 else a)
            f = jax.jit(lambda x: jnp.dot(x, x, precision=None if bf16 else "highest"))
            seconds, _ = _timed(lambda: f(x).block_until_ready(), max(runs, 5), best=True)
        else:
            x = torch.from_numpy(a).to(torch_device, torch_dtype)

            def mm():
                torch.mm(x, x)
                sync()

            seconds, _ = _timed(mm, max(runs, 5), best=True)
        return {"flops_per_s": 2 * n**3 / seconds, "seconds": seconds, "n": n}

    from vitnt_jax.config import PRESETS
    from vitnt_jax.model import init_variables
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    config = PRESETS[spec["model"]]
    blocks = parse_blocks(spec.get("blocks") or config.default_blocks, config.depth)
    settings = ScoreSettings(blocks, attention=spec.get("attention", "last"))
    batch = spec["batch"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, config.img_size, config.img_size, 3), dtype=np.uint8)
    variables = init_variables(config, seed=0)
    out = {"blocks_run": settings.num_blocks_to_run}
    if kind == "torch":
        from experiments.torch_vitnt import TorchViTNT, state_from_flax

        model = TorchViTNT(config).eval()
        model.load_state_dict(state_from_flax(variables, config))  # the same weights as ours
        model = model.to(torch_device, torch_dtype)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        x = x.to(torch_device, torch_dtype)

        def call():
            model(x, blocks, attention=settings.attention)
            sync()

        seconds, warm = _timed(call, runs)
        if torch_device == "cuda":
            out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import jax
        import jax.numpy as jnp

        from vitnt_jax.model import FaceViT, truncate_blocks
        from vitnt_jax.scorer import CPU_MICRO_BATCH, Scorer, micro_batched, preprocess, score_from_states

        dtype = jnp.bfloat16 if bf16 else jnp.float32
        kernel = spec.get("attention_kernel", "matmul")
        if kind == "stream":
            scorer = Scorer(
                config,
                variables,
                settings,
                outputs=("quality",),
                precision=None,
                dtype=dtype,
                devices=jax.local_devices()[:1],
                attention_kernel=kernel,
            )
            seconds, warm = _timed(lambda: scorer(images), runs)
            out["micro_batch"] = scorer.micro_batch
            compiled = scorer.lower(batch).compile()
        else:
            run = settings.num_blocks_to_run
            v = jax.device_put(truncate_blocks(variables, run))
            if kind == "states":
                fn = jax.jit(lambda v, x: score_from_states(config, v, preprocess(x, config), settings)["quality"])
            else:
                # The cost floor runs exactly as the scorer does, micro-batches included.
                forward = lambda v, x: FaceViT(config, dtype=dtype, attention_kernel=kernel).apply(  # noqa: E731
                    v, preprocess(x, config), num_blocks=run
                )["tokens"]
                micro = CPU_MICRO_BATCH if jax.default_backend() == "cpu" else None
                out["micro_batch"] = micro
                fn = jax.jit(functools.partial(micro_batched, forward, size=micro, shards=1))
                if micro and batch > micro:  # padded as the scorer pads: whole micro-batches
                    images = np.concatenate([images, images[: -batch % micro]])
            x = jax.device_put(images)
            seconds, warm = _timed(lambda: fn(v, x).block_until_ready(), runs)
            compiled = fn.lower(v, x).compile()
        out.update(_xla_memory(compiled))
        device_peak = _jax_device_peak_mb()
        if device_peak is not None:
            out["device_peak_mb"] = device_peak
    out.update(seconds=seconds, warmup_s=warm, images_per_s=batch / seconds, peak_rss_mb=_peak_rss_mb())
    out["flops_per_s"] = flops_per_image(config, settings.num_blocks_to_run) * batch / seconds
    return out


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def input_side(threads_list: list[int], count: int = 256) -> dict:
    """Decode+preprocess images/s per thread count, and the end-to-end CLI on the same JPEGs."""
    from PIL import Image

    from vitnt_jax import checkpoint, score
    from vitnt_jax.config import PRESETS
    from vitnt_jax.data import batches
    from vitnt_jax.model import init_variables
    from vitnt_jax.sources import image_folder

    results: dict = {"images": count, "decode_images_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "faces"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(count):
            small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        source = image_folder(folder)
        for threads in threads_list:
            start = time.perf_counter()
            for _ in batches(source.load, list(range(count)), 64, 112, workers=threads):
                pass
            results["decode_images_per_s"][threads] = count / (time.perf_counter() - start)
        config = PRESETS["cvlface_vit_small"]
        ckpt = checkpoint.save(Path(tmp) / "ckpt", config, init_variables(config))
        out = Path(tmp) / "scores.csv"
        start = time.perf_counter()
        assert (
            score.main(
                [
                    "--images",
                    str(folder),
                    "--model",
                    str(ckpt),
                    "--out",
                    str(out),
                    "--batch-size",
                    "64",
                    "--precision",
                    "default",
                ]
            )
            == 0
        )
        results["cli_vit_s_images_per_s_including_compile"] = count / (time.perf_counter() - start)
    return results


def machine() -> dict:
    import jax
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _row(rows: list[dict], model: str, batch: int, impl: str) -> dict | None:
    return next((r for r in rows if (r["model"], r["batch"], r["impl"]) == (model, batch, impl)), None)


def targets(rows: list[dict], memory: dict, model: str = "cvlface_vit_base") -> list[dict]:
    """Returns issue 6's targets, each with the measured value from this run and whether it is met."""
    checks = []

    def check(target: str, value: float, met: bool) -> None:
        checks.append({"target": target, "value": value, "met": bool(met)})

    for batch in sorted({r["batch"] for r in rows if r["model"] == model and r["batch"] >= 32}):
        stream, torch_row = _row(rows, model, batch, "stream"), _row(rows, model, batch, "torch")
        if stream and torch_row:
            ratio = stream["images_per_s"] / torch_row["images_per_s"]
            check(f"{model} batch {batch}: scorer >= 1.0x PyTorch", ratio, ratio >= 1.0)
        if stream:
            check(f"{model} batch {batch}: >= 60% of matmul peak", stream["utilisation"], stream["utilisation"] >= 0.6)
    for row in rows:
        forward = _row(rows, row["model"], row["batch"], "forward")
        if row["impl"] != "stream" or not forward:
            continue
        name = f"{row['model']} batch {row['batch']}"
        overhead = forward["images_per_s"] / row["images_per_s"] - 1
        check(f"{name}: scorer overhead over forward <= 5%", overhead, overhead <= 0.05)
        for key in ("peak_rss_mb", "device_peak_mb", "xla_footprint_mb", "xla_temp_mb"):
            if key in row and key in forward:
                ratio = row[key] / forward[key]
                check(f"{name}: {key} <= 1.2x forward", ratio, ratio <= 1.2)
    stream_memory = [v for k, v in memory.items() if k.startswith("stream") and v is not None]
    if stream_memory:
        spread = max(stream_memory) / min(stream_memory) - 1
        check("streaming memory flat in the number of selected blocks (spread)", spread, spread < 0.01)
    return checks


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with --worker, one measurement); returns the exit status."""
    from experiments import harness

    parser = harness.Parser(prog="python -m experiments.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cvlface_vit_base,cvlface_vit_small", help="comma-separated presets")
    parser.add_argument("--batch-sizes", default="8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per figure after one warm-up (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads (JAX uses all)")
    parser.add_argument("--impls", default="stream,states,forward,torch", help="which implementations to time")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument(
        "--nominal-peak-tflops",
        type=float,
        default=None,
        help="the device's datasheet peak for --dtype (e.g. 989 for an H100/H200 at bf16); utilisation is also "
        "reported against it",
    )
    parser.add_argument(
        "--attention-kernel",
        choices=["matmul", "xla", "cudnn"],
        default="matmul",
        help="attention kernel of our scorer and forward pass (cudnn: NVIDIA GPUs, --dtype bfloat16)",
    )
    parser.add_argument("--input", action="store_true", help="also measure decoding and the end-to-end CLI")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.out is not None and args.out.exists() and not args.overwrite:
        print(
            f"error: {args.out} already exists; pass --overwrite to replace it, or choose another --out.",
            file=sys.stderr,
        )
        return 1

    from vitnt_jax.config import PRESETS

    report: dict = {
        "machine": machine(),
        "runs": args.runs,
        "threads": args.threads,
        "dtype": args.dtype,
        "attention_kernel": args.attention_kernel,
    }
    kinds = ["matmul_jax"] + (["matmul_torch"] if "torch" in args.impls.split(",") else [])
    peaks = {k: _spawn({"kind": k, "runs": args.runs, "threads": args.threads, "dtype": args.dtype}) for k in kinds}
    peak = max(p["flops_per_s"] for p in peaks.values())
    report["matmul_peak"] = {k: v["flops_per_s"] for k, v in peaks.items()}
    report["matmul_n"] = {k: v["n"] for k, v in peaks.items()}
    report["nominal_peak_flops_per_s"] = args.nominal_peak_tflops * 1e12 if args.nominal_peak_tflops else None
    print(
        f"matmul peak ({args.dtype}): "
        + ", ".join(f"{k.split('_')[1]} {v['flops_per_s'] / 1e9:.1f} GFLOP/s (n={v['n']})" for k, v in peaks.items())
    )
    rows = []
    header = (
        f"{'model':18s} {'batch':>5s} {'impl':8s} {'img/s':>8s} {'GFLOP/s':>8s} {'util':>6s} "
        f"{'RSS MB':>8s} {'dev MB':>8s} {'XLA MB':>8s} {'tmp MB':>8s}"
    )
    print(header)
    nan = float("nan")
    for model in args.models.split(","):
        for batch in map(int, args.batch_sizes.split(",")):
            for impl in args.impls.split(","):
                spec = {
                    "kind": impl,
                    "model": model,
                    "batch": batch,
                    "runs": args.runs,
                    "threads": args.threads,
                    "dtype": args.dtype,
                    "attention_kernel": args.attention_kernel,
                }
                got = _spawn(spec)
                got.update(
                    model=model,
                    batch=batch,
                    impl=impl,
                    utilisation=got["flops_per_s"] / peak,
                    gflops_per_image=flops_per_image(PRESETS[model], got["blocks_run"]) / 1e9,
                )
                if report["nominal_peak_flops_per_s"]:
                    got["nominal_utilisation"] = got["flops_per_s"] / report["nominal_peak_flops_per_s"]
                rows.append(got)
                print(
                    f"{model:18s} {batch:5d} {impl:8s} {got['images_per_s']:8.2f} {got['flops_per_s'] / 1e9:8.1f} "
                    f"{got['utilisation']:6.1%} {got['peak_rss_mb']:8.0f} {got.get('device_peak_mb', nan):8.0f} "
                    f"{got.get('xla_footprint_mb', nan):8.1f} {got.get('xla_temp_mb', nan):8.1f}",
                    flush=True,
                )
    report["rows"] = rows
    # Memory against the number of selected blocks, at the same depth run (ViT-B: blocks 0..19).
    model = args.models.split(",")[0]
    from vitnt_jax.selection import parse_blocks

    last = parse_blocks(PRESETS[model].default_blocks, PRESETS[model].depth)[-1]
    flat, flat_footprint = {}, {}
    for blocks in (f"{last - 1}-{last}", f"{last // 2}-{last}", f"0-{last}"):
        for impl in ("stream", "states"):
            spec = {"kind": impl, "model": model, "batch": 8, "runs": 1, "threads": args.threads, "blocks": blocks}
            got = _spawn({**spec, "dtype": args.dtype, "attention_kernel": args.attention_kernel})
            flat[f"{impl} {blocks}"] = got.get("xla_temp_mb")
            flat_footprint[f"{impl} {blocks}"] = got.get("xla_footprint_mb")
    report["memory_vs_selected_blocks_xla_temp_mb"] = flat
    report["memory_vs_selected_blocks_xla_footprint_mb"] = flat_footprint
    print("XLA temporaries (MB) by selected blocks, batch 8:", ", ".join(f"{k}: {v:.1f}" for k, v in flat.items()))
    if args.input:
        report["input"] = input_side([1, 2, 4, 8])
        print("input side:", json.dumps(report["input"]))
    report["targets"] = targets(rows, flat, model)
    for check in report["targets"]:
        print(f"{'MET    ' if check['met'] else 'NOT MET'} {check['target']}: {check['value']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
