"""Throughput of face detection (MTCNN) + 5-point alignment, as `--align mtcnn` runs it.

    python -m experiments.benchmark_align [--count 64] [--batch 16] [--runs 3] [--reference 8]
        [--out experiments/results/benchmark_align_cpu.json]

Photos come from pip packages (no downloads): scikit-image's astronaut.png (512x512, one face),
insightface's t1.jpg (1280x886, eight faces) and Tom_Hanks_54745.png (112x112, aligned already).
Sets, each repeated to --count images:
  lfw_like   the astronaut's head and shoulders cropped and resized to 250x250, framed as LFW is
  photos     the three photos in turn (mixed sizes in one batch)
For each set: one warm-up pass (compilation), then the median of --runs timed passes of
detect_batch + select_face + align on batches of --batch images. faces/s counts aligned crops.
`reference` times the loop-based PyTorch procedure of tests/torch_mtcnn.py (one image at a time,
eager torch nets, torch interpolate; the median per image after a warm-up image) on --reference
images of each set, for context on the same CPU. On a shared machine, compare runs only at
similar load (the report records the load average at the start).
Needs facenet-pytorch's weight files (pip install --no-deps facenet-pytorch==2.6.0) and torch.
"""

from __future__ import annotations

import argparse
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


def photo_sets(count: int) -> dict[str, list[np.ndarray]]:
    """Returns {set name: `count` uint8 RGB images}."""
    astronaut = np.asarray(Image.open(_file("scikit-image", "skimage/data/astronaut.png")).convert("RGB"))
    group = np.asarray(Image.open(_file("insightface", "insightface/data/images/t1.jpg")).convert("RGB"))
    aligned = np.asarray(Image.open(_file("insightface", "insightface/data/images/Tom_Hanks_54745.png")).convert("RGB"))
    # LFW framing: the face is ~45% of the 250 px frame, centred.
    lfw_like = np.asarray(Image.fromarray(astronaut[0:300, 80:380]).resize((250, 250), Image.BILINEAR))
    mixed = [astronaut, group, aligned]
    return {"lfw_like": [lfw_like] * count, "photos": [mixed[k % 3] for k in range(count)]}


def detect_and_align(detector, images: list[np.ndarray], batch: int) -> int:
    """Runs detection + selection + alignment like the CLI; returns the number of aligned faces."""
    from vitnt_jax.align import align
    from vitnt_jax.mtcnn import select_face

    aligned = 0
    for lo in range(0, len(images), batch):
        chunk = images[lo : lo + batch]
        for image, faces in zip(chunk, detector.detect_batch(chunk), strict=True):
            pick = select_face(faces, *image.shape[:2])
            if pick is not None:
                align(image, faces.landmarks[pick])
                aligned += 1
    return aligned


def reference(nets, images: list[np.ndarray]) -> float:
    """Returns the median seconds per image of the PyTorch reference procedure (after one warm-up image)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from vitnt_jax.align import align
    from vitnt_jax.mtcnn import Faces, select_face

    import torch_mtcnn

    times = []
    for image in images[:1] + images:
        start = time.perf_counter()
        faces = Faces(*torch_mtcnn.detect(image, nets))
        pick = select_face(faces, *image.shape[:2])
        if pick is not None:
            align(image, faces.landmarks[pick])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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
    p = argparse.ArgumentParser(description="MTCNN detection + alignment throughput")
    p.add_argument("--count", type=int, default=64, help="images per set (default: 64)")
    p.add_argument("--batch", type=int, default=16, help="images per detect_batch call (default: 16)")
    p.add_argument("--runs", type=int, default=3, help="timed passes; the median is reported (default: 3)")
    p.add_argument("--reference", type=int, default=8, help="images per set for the PyTorch reference (0: skip)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/benchmark_align_cpu.json"))
    args = p.parse_args(argv)

    from converters import mtcnn as converter
    from vitnt_jax import mtcnn

    source = mtcnn.installed_facenet_weights()
    if source is None:
        print("error: needs facenet-pytorch's weights: pip install --no-deps facenet-pytorch==2.6.0", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        detector = mtcnn.Detector.load(converter.convert(source, Path(tmp) / "mtcnn.npz"))
    report = {"machine": machine(), "count": args.count, "batch": args.batch, "runs": args.runs, "sets": {}}
    nets = None
    if args.reference:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import torch_mtcnn

        nets = torch_mtcnn.load_nets(source)
    for name, images in photo_sets(args.count).items():
        start = time.perf_counter()
        faces = detect_and_align(detector, images, args.batch)
        warm = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            detect_and_align(detector, images, args.batch)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        row = {
            "images": len(images),
            "sizes": sorted({f"{a.shape[1]}x{a.shape[0]}" for a in images}),
            "aligned_faces": faces,
            "seconds": seconds,
            "first_pass_s": warm,
            "images_per_s": len(images) / seconds,
            "faces_per_s": faces / seconds,
        }
        if nets is not None:
            per_image = reference(nets, images[: args.reference])
            row["reference_images"] = min(args.reference, len(images))
            row["reference_median_s_per_image"] = per_image
            row["reference_images_per_s"] = 1 / per_image
        report["sets"][name] = row
        ref = f", reference {row['reference_images_per_s']:.1f} images/s" if nets is not None else ""
        print(
            f"{name:9s} {len(images)} images ({', '.join(row['sizes'])}): {row['faces_per_s']:.1f} faces/s, "
            f"{row['images_per_s']:.1f} images/s (first pass {warm:.1f} s){ref}"
        )
    report["compilations"] = {n: getattr(detector, n)._cache_size() for n in mtcnn.NETS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
