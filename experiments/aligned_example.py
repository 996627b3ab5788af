"""Example figure for the README: photo with MTCNN box and landmarks -> aligned crop -> patch-quality map.

    python -m experiments.aligned_example [--model NAME|DIR] [--photo FILE] [--mtcnn-weights FILE.npz]
        [--out experiments/results/aligned_example.png] [--overwrite]

The photo (default: scikit-image's astronaut.png, shipped inside the package) goes through the
scoring pipeline (`vitnt_jax.pipeline.run`) as `python -m vitnt_jax.score --align mtcnn --save-aligned
DIR --save-patch-quality FILE` runs it, and the figure is drawn from what the pipeline wrote. The heat
map needs real face-ViT weights (--model, default the paper's backbone, used when it resolves:
downloaded or cached). When no real model can be had (offline), the named model 'testing' (the tiny
preset with RANDOM weights) is used instead, and the figure says so: its map shows the layout only
and measures nothing.
Needs facenet-pytorch's weight files (pip install --no-deps facenet-pytorch==2.6.0), torch and matplotlib.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image


def _model(spec: str | None) -> tuple[Path, bool]:
    """Returns (checkpoint folder, real weights?): the named/given model, else the random-weight 'testing' model."""
    from vitnt_jax import models

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return models.resolve(spec or models.DEFAULT_MODEL), True
    except models.ModelError as error:
        print(f"no real model ({error}); using the named model 'testing' ({models.RANDOM_WEIGHTS})", file=sys.stderr)
    return models.resolve("testing"), False


def main(argv: list[str] | None = None) -> int:
    """Draws the figure; returns 0 on success."""
    from vitnt_jax import cli

    p = cli.Parser(prog="python -m experiments.aligned_example", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="converted checkpoint folder or model name (default: the paper's backbone)")
    p.add_argument("--photo", type=Path, help="photo to align (default: scikit-image's astronaut.png)")
    p.add_argument(
        "--mtcnn-weights",
        type=Path,
        metavar="FILE.npz",
        help="converted MTCNN weights (python -m converters.mtcnn); default: facenet-pytorch's, converted once",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiments/results/aligned_example.png"),
        help="figure to write (default: experiments/results/aligned_example.png)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    return cli.run_command(lambda: _draw(args), debug=args.debug)


def _draw(args) -> int:
    """Draws the figure into args.out; returns 0."""
    from vitnt_jax.errors import UserError

    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitnt_jax import models, mtcnn, pipeline
    from vitnt_jax.align import ARCFACE_TEMPLATE, align
    from vitnt_jax.output import read_results
    from vitnt_jax.sources import SourceSpec

    photo_path = args.photo or Path(
        importlib.metadata.distribution("scikit-image").locate_file("skimage/data/astronaut.png")
    )
    photo = np.asarray(Image.open(photo_path).convert("RGB"))
    weights = models.mtcnn_weights(args.mtcnn_weights)
    detector = mtcnn.Detector.load(weights)
    faces = detector.detect(photo)
    pick = mtcnn.select_face(faces, *photo.shape[:2])
    if pick is None:
        raise UserError(f"no face found in {photo_path}; give a photo with a face.")
    crop = align(photo, faces.landmarks[pick])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        Image.fromarray(photo).save(tmp / "in" / "photo.png")
        model_dir, real = _model(args.model)
        job = pipeline.Job(
            SourceSpec("images", tmp / "in"),
            out=tmp / "scores.csv",
            model=str(model_dir),
            align="mtcnn",
            mtcnn_weights=weights,
            save_aligned=tmp / "crops",
            save_patch_quality=tmp / "patches.npy",
        )
        pipeline.run(job, progress_bar=False)
        (row,) = read_results(job.out)
        quality = row.quality
        patches = np.load(tmp / "patches.npy")[0]
        model_input = np.asarray(Image.open(next((tmp / "crops").iterdir())))
        from vitnt_jax import checkpoint

        model_name = checkpoint.load_config(model_dir)[0].name

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    ax = axes[0]
    ax.imshow(photo)
    for k, (x1, y1, x2, y2) in enumerate(faces.boxes):
        width = 2.5 if k == pick else 1
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", lw=width))
    ax.scatter(*faces.landmarks[pick].T, c=["red", "red", "lime", "cyan", "cyan"], s=18)
    ax.set_title(f"MTCNN: box and 5 landmarks (p = {faces.scores[pick]:.4f})")
    ax = axes[1]
    ax.imshow(crop)
    ax.scatter(*ARCFACE_TEMPLATE.T, marker="+", c="white", s=60)
    ax.set_title("aligned 112x112 (+ = ArcFace template)")
    ax = axes[2]
    size = model_input.shape[0]
    ax.imshow(model_input, extent=(0, size, size, 0))
    # Real weights: the method's (0, 1] scale. Random weights: the data's own range, to show the layout.
    low, high = (0.0, 1.0) if real else (float(patches.min()), float(patches.max()))
    shown = ax.imshow(patches, cmap="magma", alpha=0.6, extent=(0, size, size, 0), vmin=low, vmax=high)
    for k in range(1, patches.shape[0]):
        ax.axhline(k * size / patches.shape[0], color="white", lw=0.4)
        ax.axvline(k * size / patches.shape[1], color="white", lw=0.4)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="patch quality q_p")
    ax.set_title(f"--save-patch-quality, {model_name}: Q = {quality:.3f}")
    for ax in axes:
        ax.axis("off")
    caption = (
        f"Model: {model_name} (real weights)."
        if real
        else f"Model: '{model_name}' preset with RANDOM weights ({size}x{size} input, {patches.shape[0]}x"
        f"{patches.shape[1]} patches): the map shows the output layout only and measures nothing."
    )
    text = f"{photo_path.name} through the scoring pipeline with --align mtcnn. {caption}"
    fig.text(0.5, 0.015, textwrap.fill(text, 150), ha="center", va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
