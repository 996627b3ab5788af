"""Throughput of face detection (MTCNN) + 5-point alignment, as `--align mtcnn` runs it.

    python -m experiments.benchmark_align [--count 64] [--batch-size 16] [--runs 3] [--reference N]
        [--torch-threads 1] [--out experiments/results/benchmark_align_cpu.json] [--overwrite]

Photos come from pip packages (no downloads): scikit-image's astronaut.png (512x512, one face),
insightface's t1.jpg (1280x886, eight faces) and Tom_Hanks_54745.png (112x112, aligned already).
Sets, each repeated to --count images:
  lfw_like   the astronaut's head and shoulders cropped and resized to 250x250, framed as LFW is
  photos     the three photos in turn (mixed sizes in one batch)
  random     the astronaut resized to --count random sizes, sides 112 to 1280 (every image a new size)
For each set: one first pass (which compiles what it needs), then the median of --runs timed
passes of detect_batch + select_face + align on batches of --batch-size images. faces/s counts aligned
crops. `stages` splits the timed passes' wall time: P-Net stage (pyramid resampling, P-Net on
tiles, NMS), R-Net stage and O-Net stage (candidate crops, net, NMS), alignment; `compile_s` is the
first pass less a timed pass, and `new_compilations` counts the shapes each net compiled in it.
`planned_pnet_shapes` lists the P-Net call shapes that 1,500 random sizes (112 to 1280) would
compile, from the detector's own tiling plan (no nets run).
`reference` times the loop-based PyTorch procedure of experiments/torch_mtcnn.py (one image at a time,
eager torch nets, torch interpolate; the mean per image after a warm-up image) on the first
--reference images of each set (default: all of them, the very images timed above), for context
on the same CPU. torch runs --torch-threads threads (default 1:
on a shared 2-core machine two threads oversubscribe the cores and made the reference ~7x slower).
On a shared machine, compare runs only at similar load (the report records the load average).
Needs facenet-pytorch's weight files (pip install --no-deps facenet-pytorch==2.6.0) and torch.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _file(package: str, path: str) -> Path:
    return Path(importlib.metadata.distribution(package).locate_file(path))


def photo_sets(count: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Returns {set name: `count` uint8 RGB images}."""
    astronaut = np.asarray(Image.open(_file("scikit-image", "skimage/data/astronaut.png")).convert("RGB"))
    group = np.asarray(Image.open(_file("insightface", "insightface/data/images/t1.jpg")).convert("RGB"))
    aligned = np.asarray(Image.open(_file("insightface", "insightface/data/images/Tom_Hanks_54745.png")).convert("RGB"))
    # LFW framing: the face is ~45% of the 250 px frame, centred.
    lfw_like = np.asarray(Image.fromarray(astronaut[0:300, 80:380]).resize((250, 250), Image.BILINEAR))
    mixed = [astronaut, group, aligned]
    sides = np.random.default_rng(seed).integers(112, 1281, (count, 2))
    random = [np.asarray(Image.fromarray(astronaut).resize((int(w), int(h)), Image.BILINEAR)) for h, w in sides]
    return {"lfw_like": [lfw_like] * count, "photos": [mixed[k % 3] for k in range(count)], "random": random}


class StageClock:
    """Adds up the wall time of a detector's stages (each stage's nets run inside it) and of alignment."""

    def __init__(self, detector):
        self.seconds: collections.Counter = collections.Counter()
        stage1, refine = detector._stage1, detector._refine

        def timed_stage1(*args):
            with self.clock("pnet_stage"):
                return stage1(*args)

        def timed_refine(images, sats, candidates, size):
            with self.clock("rnet_stage" if size == 24 else "onet_stage"):
                return refine(images, sats, candidates, size)

        detector._stage1, detector._refine = timed_stage1, timed_refine

    def clock(self, name: str):
        seconds = self.seconds

        class _Clock:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds[name] += time.perf_counter() - self.start

        return _Clock()


def detect_and_align(detector, images: list[np.ndarray], batch: int, clock: StageClock | None = None) -> int:
    """Runs detection + selection + alignment like the CLI; returns the number of aligned faces."""
    from vitnt_jax.align import align
    from vitnt_jax.mtcnn import select_face

    aligned = 0
    for lo in range(0, len(images), batch):
        chunk = images[lo : lo + batch]
        found = detector.detect_batch(chunk)
        start = time.perf_counter()
        for image, faces in zip(chunk, found, strict=True):
            pick = select_face(faces, *image.shape[:2])
            if pick is not None:
                align(image, faces.landmarks[pick])
                aligned += 1
        if clock is not None:
            clock.seconds["align"] += time.perf_counter() - start
    return aligned


def planned_pnet_shapes(detector, sizes: list[tuple[int, int]], batch: int) -> list[int]:
    """Returns the distinct P-Net call sizes (tiles per call) that detecting `sizes` in batches would use."""
    from vitnt_jax import mtcnn

    counts = set()
    for lo in range(0, len(sizes), batch):
        chunk = sizes[lo : lo + batch]
        for run in detector.groups(chunk):
            levels = [s for k in run for s in mtcnn.pyramid_sizes(*chunk[k], detector.min_face_size, detector.factor)]
            pieces = [piece for h, w in levels for piece in mtcnn.split_level(h, w)]
            counts.update(mtcnn.tile_calls(mtcnn.pack_tiles([(h, w) for *_, h, w in pieces])[1]))
    return sorted(counts)


def reference(nets, images: list[np.ndarray]) -> float:
    """Returns the mean seconds per image of the PyTorch reference procedure (after one warm-up image)."""
    from experiments import torch_mtcnn
    from vitnt_jax.align import align
    from vitnt_jax.mtcnn import Faces, select_face

    times = []
    for image in images[:1] + images:
        start = time.perf_counter()
        faces = Faces(*torch_mtcnn.detect(image, nets))
        pick = select_face(faces, *image.shape[:2])
        if pick is not None:
            align(image, faces.landmarks[pick])
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])  # the mean: a median would hide the big photos of a mixed set


def machine() -> dict:
    import jax
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax_devices": [f"{d.platform}:{d.id}" for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """Prints the table and writes the JSON report."""
    from vitnt_jax import cli
    from vitnt_jax.errors import UserError

    p = cli.Parser(prog="python -m experiments.benchmark_align", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=64, help="images per set (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="images per detect_batch call (default: 16)")
    p.add_argument("--runs", type=int, default=3, help="timed passes; the median is reported (default: 3)")
    p.add_argument(
        "--reference", type=int, default=None, help="images per set for the PyTorch reference (default: all; 0: skip)"
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the reference (default: 1)")
    p.add_argument("--sets", default="lfw_like,photos,random", help="comma-separated sets to run (default: all)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiments/results/benchmark_align_cpu.json"),
        help="JSON report to write (default: experiments/results/benchmark_align_cpu.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)

    def body() -> int:
        if args.out.exists() and not args.overwrite:  # checked before minutes of timing, not after
            raise UserError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out.")
        return _run(args)

    return cli.run_command(body, debug=args.debug)


def _run(args) -> int:
    import torch

    from converters import mtcnn as converter
    from vitnt_jax import mtcnn
    from vitnt_jax.errors import UserError

    torch.set_num_threads(args.torch_threads)
    source = converter.installed_facenet_weights()
    if source is None:
        raise UserError("the benchmark needs facenet-pytorch's weights: pip install --no-deps facenet-pytorch==2.6.0.")
    with tempfile.TemporaryDirectory() as tmp:
        detector = mtcnn.Detector.load(converter.convert(source, Path(tmp) / "mtcnn.npz"))
    report = {"machine": machine(), "count": args.count, "batch": args.batch_size, "runs": args.runs, "sets": {}}
    nets = None
    if args.reference != 0:
        from experiments import torch_mtcnn

        nets = torch_mtcnn.load_nets(source)
    wanted = args.sets.split(",")
    jitted = {"pnet": detector.pnet_tiles, "rnet": detector.rnet, "onet": detector.onet}
    for name, images in photo_sets(args.count).items():
        if name not in wanted:
            continue
        compiled = {n: f._cache_size() for n, f in jitted.items()}
        start = time.perf_counter()
        faces = detect_and_align(detector, images, args.batch_size)
        first = time.perf_counter() - start
        new = {n: f._cache_size() - compiled[n] for n, f in jitted.items()}
        times, clocks = [], []
        for _ in range(args.runs):
            clock = StageClock(detector)
            start = time.perf_counter()
            detect_and_align(detector, images, args.batch_size, clock)
            times.append(time.perf_counter() - start)
            clocks.append(clock.seconds)
            del detector._stage1, detector._refine  # back to the class's methods
        seconds = statistics.median(times)
        timed = clocks[times.index(seconds)]
        row = {
            "images": len(images),
            "sizes": sorted({f"{a.shape[1]}x{a.shape[0]}" for a in images}),
            "pixels_per_image": float(np.mean([a.shape[0] * a.shape[1] for a in images])),
            "aligned_faces": faces,
            "seconds": seconds,
            "first_pass_s": first,
            "compile_s": max(0.0, first - seconds),
            "new_compilations": new,
            "stages_s": {k: round(v, 3) for k, v in timed.items()},
            "images_per_s": len(images) / seconds,
            "faces_per_s": faces / seconds,
        }
        if len(row["sizes"]) > 8:
            row["sizes"] = f"{len(row['sizes'])} sizes"
        if nets is not None:
            some = images[: args.reference] if args.reference else images
            per_image = reference(nets, some)
            row["reference_images"] = len(some)
            row["reference_mean_s_per_image"] = per_image
            row["reference_images_per_s"] = 1 / per_image
        report["sets"][name] = row
        ref = f", reference {row['reference_images_per_s']:.1f} images/s" if nets is not None else ""
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in row["stages_s"].items())
        print(
            f"{name:9s} {len(images)} images: {row['faces_per_s']:.1f} faces/s, {row['images_per_s']:.1f} images/s "
            f"(first pass {first:.1f} s, {new} new compilations; a pass: {stages}){ref}"
        )
    sizes = [tuple(int(v) for v in hw) for hw in np.random.default_rng(1).integers(112, 1281, (1500, 2))]
    report["planned_pnet_shapes"] = {
        "images": len(sizes),
        "distinct_sizes": len(set(sizes)),
        "tiles_per_call": planned_pnet_shapes(detector, sizes, args.batch_size),
    }
    report["compilations"] = {n: f._cache_size() for n, f in jitted.items()}
    print(f"P-Net call shapes for 1,500 random sizes: {report['planned_pnet_shapes']['tiles_per_call']} tiles")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
