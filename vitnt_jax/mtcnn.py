"""MTCNN face detection in JAX/Flax: P-Net, R-Net, O-Net and the cascade that finds faces and 5 landmarks.

The networks are facenet-pytorch's Caffe-ported MTCNN (conv + PReLU, ceil-mode max-pools, R-Net and
O-Net flattening in (W, H, C) order); their weights come from facenet-pytorch's `pnet.pt`, `rnet.pt`
and `onet.pt`, converted by `converters/mtcnn.py` (never shipped). The cascade follows facenet-pytorch's
`detect_face` step by step, so boxes and landmarks match that reference:

1. image pyramid: scales 12/min_face * factor^k while the short side stays >= 12 pixels; each level
   resized with area averaging (torch `interpolate(mode="area")`) to (int(h*s+1), int(w*s+1));
2. P-Net on every level; cells with face probability >= thresholds[0] become 12-pixel boxes;
   NMS per level (IoU 0.5) then per image (IoU 0.7); box regression (width x2-x1); squared (rerec);
3. each box clipped to the image (no zero padding), area-resized to 24x24, R-Net; probability >
   thresholds[1]; NMS (IoU 0.7); regression (width x2-x1+1); squared;
4. the same at 48x48 with O-Net (> thresholds[2]); landmarks decoded in the squared box; regression;
   NMS with the intersection over the SMALLER box (0.7).

Inputs are RGB uint8 images, normalised as (x - 127.5) / 128. Boxes and landmarks are in pixels,
exactly as facenet-pytorch returns them; vitnt_jax.align reads them with pixel centres at integers
(OpenCV's convention, as insightface's alignment does).

Deliberate differences, both on rare edge cases: NMS ties in score keep the earlier candidate
(torchvision's stable order; facenet's last, numpy-based NMS has no defined tie order), and a box
lying wholly outside the image is dropped (facenet would shift its crops against its boxes).

How it runs: the networks are jitted. An image's whole pyramid is packed into one mosaic (skyline
packing, even offsets) whose sides are rounded up to one of 8 sizes per octave; P-Net runs once on
the mosaic and masks what lies outside each level before its ceil-mode pool, so packing and padding
never change a real output. Mosaics of the same shape from several images run as one batch (batch
sizes are powers of two, at most PIXEL_BUDGET pixels a call). R-Net and O-Net take the candidates
of every image of a batch at once, padded to one of 4 sizes per octave. Compilations are therefore
bounded by these buckets, not by image sizes: a collection of same-size photos compiles P-Net once
per batch size. Resampling (exact integer integral images), box bookkeeping and NMS run on the
host in numpy: they are cheap, and their output sizes depend on the data.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETS = ("pnet", "rnet", "onet")
WEIGHTS_FORMAT = "vitnt-jax-mtcnn-1"
WEIGHTS_NAME = "mtcnn_facenet_pytorch.npz"
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
DEFAULT_FACTOR = 0.709
DEFAULT_MIN_FACE = 20
# P-Net inputs of one call hold at most this many pixels (its first activation is 10 floats a
# pixel, so ~170 MB); a single larger level runs alone.
PIXEL_BUDGET = 1 << 22
MAX_CANDIDATES = 1024  # R-Net / O-Net rows per call (a bucket size)
_MASKED = -1e30  # below any real activation; finite, so masked cells never turn into NaN


class MTCNNError(Exception):
    """MTCNN weights that cannot be found or used; the message says what to do."""


# --------------------------------------------------------------------------------------------- networks


class PReLU(nn.Module):
    """Per-channel PReLU: x if x >= 0 else a * x (torch nn.PReLU(C))."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param("negative_slope", nn.initializers.constant(0.25), (self.features,))
        return jnp.where(x >= 0, x, a * x)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding="VALID", precision=jax.lax.Precision.HIGHEST, name=name)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, precision=jax.lax.Precision.HIGHEST, name=name)


def _pool_ceil(x: jax.Array, k: int, s: int) -> jax.Array:
    """Returns a max-pool with PyTorch's ceil_mode=True: the last partial window counts (Caffe's rule)."""
    h, w = x.shape[1:3]
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    return nn.max_pool(x, (k, k), (s, s), padding=((0, (oh - 1) * s + k - h), (0, (ow - 1) * s + k - w)))


def _flatten_wh(x: jax.Array) -> jax.Array:
    # The Caffe port flattens NCHW tensors permuted to (N, W, H, C); its dense weights expect that order.
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net, fully convolutional: one 12x12 window per output cell, stride 2."""

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Returns (box regression (B, h, w, 4), softmax (B, h, w, 2); channel 1 = face).

        x: (B, H, W, 3) normalised images. valid: optional (B, H, W) bool, True where the first
        conv's output belongs to a real image (several images or pyramid levels may share one
        zero-padded input); outputs computed only from valid cells then equal those of each image
        alone, because the ceil-mode pool never sees a cell from outside its image.
        """
        x = PReLU(10, name="prelu1")(_conv(10, 3, "conv1")(x))
        if valid is not None:
            valid = valid[:, : x.shape[1], : x.shape[2], None]
            x = jnp.where(valid, x, _MASKED)  # below any activation: the pool ignores these cells
        x = _pool_ceil(x, 2, 2)
        if valid is not None:  # cells with no valid input at all go back to finite values
            x = jnp.where(_pool_ceil(valid.astype(x.dtype), 2, 2) > 0, x, 0.0)
        x = PReLU(16, name="prelu2")(_conv(16, 3, "conv2")(x))
        x = PReLU(32, name="prelu3")(_conv(32, 3, "conv3")(x))
        prob = nn.softmax(_conv(2, 1, "conv4_1")(x), axis=-1)
        return _conv(4, 1, "conv4_2")(x), prob


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (box regression (B, 4), softmax (B, 2)) for x (B, 24, 24, 3)."""
        x = _pool_ceil(PReLU(28, name="prelu1")(_conv(28, 3, "conv1")(x)), 3, 2)
        x = _pool_ceil(PReLU(48, name="prelu2")(_conv(48, 3, "conv2")(x)), 3, 2)
        x = PReLU(64, name="prelu3")(_conv(64, 2, "conv3")(x))
        x = PReLU(128, name="prelu4")(_dense(128, "dense4")(_flatten_wh(x)))
        return _dense(4, "dense5_2")(x), nn.softmax(_dense(2, "dense5_1")(x), axis=-1)


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, 5 landmarks, face probability."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (box regression (B, 4), landmarks (B, 10) = 5 x then 5 y in the box, softmax (B, 2))."""
        x = _pool_ceil(PReLU(32, name="prelu1")(_conv(32, 3, "conv1")(x)), 3, 2)
        x = _pool_ceil(PReLU(64, name="prelu2")(_conv(64, 3, "conv2")(x)), 3, 2)
        x = _pool_ceil(PReLU(64, name="prelu3")(_conv(64, 3, "conv3")(x)), 2, 2)
        x = PReLU(128, name="prelu4")(_conv(128, 2, "conv4")(x))
        x = PReLU(256, name="prelu5")(_dense(256, "dense5")(_flatten_wh(x)))
        return _dense(4, "dense6_2")(x), _dense(10, "dense6_3")(x), nn.softmax(_dense(2, "dense6_1")(x), axis=-1)


NET_INPUTS = {"pnet": (PNet, 12), "rnet": (RNet, 24), "onet": (ONet, 48)}


def variable_shapes() -> dict[str, dict]:
    """Returns {'pnet'|'rnet'|'onet': {'params': {...}}} of ShapeDtypeStructs (nothing is allocated)."""
    out = {}
    for name, (module, size) in NET_INPUTS.items():
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        out[name] = jax.eval_shape(module().init, jax.random.key(0), x)
    return out


def init_variables(seed: int = 0) -> dict[str, dict]:
    """Returns random variables for the three nets (tests and shapes only; they detect nothing)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        name: module().init(k, jnp.zeros((1, size, size, 3), jnp.float32))
        for k, (name, (module, size)) in zip(keys, NET_INPUTS.items(), strict=True)
    }


# --------------------------------------------------------------------------------------------- weights


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flat(value, path) if isinstance(value, Mapping) else {path: value})
    return out


def save_variables(path: str | os.PathLike, variables: Mapping, source: str = "") -> Path:
    """Writes the three nets' variables to one .npz file (atomically) and returns its path."""
    import json
    import secrets

    path = Path(path)
    check_variables(variables, "the MTCNN variables")
    arrays = {k: np.asarray(v, np.float32) for k, v in _flat(variables).items()}
    meta = json.dumps({"format": WEIGHTS_FORMAT, "source": source})
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary sibling renamed into place: concurrent or interrupted writers never leave half a file.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual umask permissions
            np.savez(f, __meta__=np.array(meta), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_variables(variables: Mapping, what: str) -> None:
    """Raises MTCNNError naming every missing, unexpected or mis-shaped MTCNN variable."""
    want = {k: tuple(v.shape) for k, v in _flat(variable_shapes()).items()}
    got = {k: tuple(np.shape(v)) for k, v in _flat(variables).items()}
    problems = []
    if missing := sorted(set(want) - set(got)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(got) - set(want)):
        problems.append(f"unexpected {unexpected}")
    problems += [f"{k} is {got[k]}, expected {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if problems:
        raise MTCNNError(f"{what} are not MTCNN weights: {'; '.join(problems)}.")


def load_variables(path: str | os.PathLike) -> dict[str, dict]:
    """Returns the nested variables stored by `save_variables`, checked strictly."""
    import json

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise MTCNNError(f"MTCNN weights {path} do not exist; check the path.") from None
    except (OSError, ValueError, EOFError) as error:
        raise MTCNNError(
            f"MTCNN weights {path} are unreadable ({type(error).__name__}); convert them again with "
            "`python -m converters.mtcnn`."
        ) from None
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, ValueError):
        meta = {}
    if meta.get("format") != WEIGHTS_FORMAT:
        raise MTCNNError(f"{path} is not an MTCNN weights file written by `python -m converters.mtcnn`.")
    nested: dict = {}
    for key, value in arrays.items():
        node = nested
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    check_variables(nested, f"{path}")
    return nested


def installed_facenet_weights() -> Path | None:
    """Returns the folder of facenet-pytorch's pnet.pt/rnet.pt/onet.pt when the package is installed."""
    import importlib.metadata

    try:
        folder = Path(importlib.metadata.distribution("facenet-pytorch").locate_file("facenet_pytorch/data"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder if all((folder / f"{n}.pt").is_file() for n in NETS) else None


def resolve_weights(path: str | os.PathLike | None = None) -> Path:
    """Returns the converted MTCNN weights file: `path` if given, else the cached conversion.

    Without `path`, facenet-pytorch's weights are converted once into $VITNT_JAX_CACHE (needs the
    facenet-pytorch package for its files, and torch to read them).
    """
    if path is not None:
        return Path(path)
    from vitnt_jax.models import CACHE_ENV, cache_dir

    target = cache_dir() / WEIGHTS_NAME
    if target.is_file():
        return target
    source = installed_facenet_weights()
    if source is None:
        raise MTCNNError(
            "--align mtcnn needs MTCNN weights: install them with `pip install --no-deps facenet-pytorch==2.6.0` "
            f"(and torch) to have them converted into ${CACHE_ENV} on first use, or pass --mtcnn-weights FILE.npz "
            "written by `python -m converters.mtcnn`."
        )
    from converters import mtcnn as converter
    from converters.state_dict import ConversionError

    print(f"converting facenet-pytorch's MTCNN weights into {target} (once) ...", file=sys.stderr)
    try:
        return converter.convert(source, target, overwrite=True)
    except ConversionError as error:
        raise MTCNNError(f"facenet-pytorch's MTCNN weights in {source} did not convert: {error}") from None


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Faces:
    """The faces found in one image, highest O-Net probability first.

    boxes: (n, 4) float32 x1, y1, x2, y2. scores: (n,) face probability. landmarks: (n, 5, 2)
    float32 (x, y) of the left eye, right eye, nose, left and right mouth corner as seen in the
    image (the order of the ArcFace template).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _no_faces() -> Faces:
    return Faces(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def select_face(faces: Faces, height: int, width: int) -> int | None:
    """Returns the index of the face to keep, or None when there is none.

    Rule: the largest box (by area) among those that contain the image centre; when no box
    contains the centre, the largest box. Photos of one person are usually framed on them, and
    bystanders rarely cover the centre.
    """
    if len(faces) == 0:
        return None
    b = faces.boxes.astype(np.float64)
    area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    central = (b[:, 0] <= cx) & (cx <= b[:, 2]) & (b[:, 1] <= cy) & (cy <= b[:, 3])
    pool = np.flatnonzero(central) if central.any() else np.arange(len(area))
    return int(pool[np.argmax(area[pool])])


# --------------------------------------------------------------------------------------------- host maths


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, min_area: bool = False) -> np.ndarray:
    """Returns the indices kept by greedy non-maximum suppression, highest score first.

    Boxes overlapping a kept box by more than `threshold` are dropped. Overlap is torchvision's
    IoU on continuous areas, or with `min_area` facenet's 'Min' rule: intersection over the smaller
    box with pixel-inclusive (+1) sides. Ties in score keep the earlier box first (stable sort).
    """
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float32)
    one = np.float32(1 if min_area else 0)
    area = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]) + one)
        h = np.maximum(np.float32(0), np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]) + one)
        inter = w * h
        overlap = inter / (np.minimum(area[i], area[rest]) if min_area else area[i] + area[rest] - inter)
        order = rest[~(overlap > threshold)]  # NaN overlaps (empty boxes) are kept, as torchvision does
    return np.asarray(keep, np.int64)


def integral_image(image: np.ndarray) -> np.ndarray:
    """Returns the (H+1, W+1, C) int64 summed-area table of a uint8 image (exact window sums)."""
    sat = np.zeros((image.shape[0] + 1, image.shape[1] + 1, image.shape[2]), np.int64)
    np.cumsum(image, axis=0, dtype=np.int64, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    return sat


def _windows(start: np.ndarray, length: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    # torch adaptive_avg_pool's windows: [floor(i*L/out), ceil((i+1)*L/out)) for i < out.
    i = np.arange(out)
    lo = start[:, None] + (i[None] * length[:, None]) // out
    hi = start[:, None] + ((i[None] + 1) * length[:, None] + out - 1) // out
    return lo, hi


def area_resize(sat: np.ndarray, y0, y1, x0, x1, out_h: int, out_w: int) -> np.ndarray:
    """Returns (n, out_h, out_w, C) float32 area-averaged crops [y0:y1, x0:x1] of the image behind `sat`.

    Matches torch `interpolate(mode="area")` (adaptive average pooling), down- or up-sampling.
    """
    y0, y1, x0, x1 = (np.asarray(v, np.int64).reshape(-1) for v in (y0, y1, x0, x1))
    r0, r1 = _windows(y0, y1 - y0, out_h)
    c0, c1 = _windows(x0, x1 - x0, out_w)
    rows0, rows1, cols0, cols1 = r0[:, :, None], r1[:, :, None], c0[:, None, :], c1[:, None, :]
    total = sat[rows1, cols1] - sat[rows0, cols1] - sat[rows1, cols0] + sat[rows0, cols0]
    count = ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :])[..., None]
    return (total / count).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x - np.float32(127.5)) * np.float32(0.0078125)


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """Returns the pyramid scales: 12/min_face * factor^k while the scaled short side is >= 12."""
    scale = 12.0 / min_face
    short = min(height, width) * scale
    scales = []
    while short >= 12:
        scales.append(scale)
        scale *= factor
        short *= factor
    return scales


def bucket(n: int, minimum: int = 16, per_octave: int = 8) -> int:
    """Returns n rounded up to one of `per_octave` sizes per octave (a power of two), at least `minimum`.

    8 per octave (P-Net mosaic sides) pads by at most 12.5%; 4 (R-/O-Net candidates) by 25%.
    """
    if n <= minimum:
        return minimum
    step = 1 << max(0, (n - 1).bit_length() - per_octave.bit_length())
    return -(-n // step) * step


def _skyline(sizes: Sequence[tuple[int, int]], width: int) -> tuple[list[tuple[int, int]], int]:
    """Returns bottom-left skyline positions of even-sized rectangles in a strip `width` wide, and its height."""
    heights = np.zeros(width // 2, np.int64)  # in units of 2 pixels, so every offset is even
    offsets = []
    for h, w in sizes:
        h2, w2 = -(-h // 2), -(-w // 2)
        tops = np.lib.stride_tricks.sliding_window_view(heights, w2).max(axis=1)
        x = int(np.argmin(tops))  # lowest top; leftmost among equals
        offsets.append((2 * int(tops[x]), 2 * x))
        heights[x : x + w2] = tops[x] + h2
    return offsets, 2 * int(heights.max())


@functools.lru_cache(maxsize=256)
def pack_levels(sizes: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], ...], tuple[int, int]]:
    """Returns the (y, x) offset of each pyramid level in one mosaic, and the mosaic's padded (height, width).

    Skyline packing (largest level first, each at the lowest, then leftmost, free place), trying
    the bucket widths from the largest level's to twice it and keeping the smallest padded mosaic.
    Offsets are even, so every level keeps P-Net's stride-2 cell grid.
    """
    w0 = sizes[0][1] + (sizes[0][1] & 1)
    best = None
    width = bucket(w0)
    while width <= max(bucket(w0), 2 * w0):
        offsets, height = _skyline(sizes, width)
        area = bucket(height) * width
        if best is None or area < best[0]:
            best = (area, tuple(offsets), (bucket(height), width))
        width = bucket(width + 1)
    return best[1], best[2]


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _pnet_out(n: int) -> int:
    # conv3 -> ceil-mode pool 2/2 -> conv3 -> conv3
    return -(-(n - 4) // 2) + 1 - 4


def calibrate_stage1(boxes: np.ndarray) -> np.ndarray:
    """Returns (n, 5) boxes after P-Net regression (width x2-x1, as the reference) and squaring."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out = np.stack(
        [
            boxes[:, 0] + boxes[:, 5] * w,
            boxes[:, 1] + boxes[:, 6] * h,
            boxes[:, 2] + boxes[:, 7] * w,
            boxes[:, 3] + boxes[:, 8] * h,
            boxes[:, 4],
        ],
        1,
    )
    return square(out)


def regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Returns boxes moved by R-/O-Net regression (sides x2-x1+1, the reference's bbreg)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Returns the boxes grown to squares of their longer side around the same centre (rerec)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * np.float32(0.5) - side * np.float32(0.5)
    out[:, 1] = boxes[:, 1] + h * np.float32(0.5) - side * np.float32(0.5)
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def crop_bounds(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Returns (y0, y1, x0, x1, non_empty): 0-based crop ranges of truncated boxes clipped to the image.

    As the reference: integer coordinates x = trunc(x1) clipped to >= 1, ex = trunc(x2) clipped to
    <= width, crop [x - 1, ex). Boxes whose crop is empty (entirely outside) are flagged.
    """
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], width), np.minimum(b[:, 3], height)
    ok = (ex > x - 1) & (ey > y - 1)
    return y - 1, ey, x - 1, ex, ok


# --------------------------------------------------------------------------------------------- detector


# One jitted function per net for the whole process: every Detector reuses the compilations.
_JITTED = {name: jax.jit(module().apply) for name, (module, _) in NET_INPUTS.items()}


class Detector:
    """Finds faces and 5 landmarks in RGB uint8 images with MTCNN (jitted nets, host-side NMS)."""

    def __init__(
        self,
        variables: Mapping[str, Any],
        *,
        min_face_size: float = DEFAULT_MIN_FACE,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        factor: float = DEFAULT_FACTOR,
        pixel_budget: int = PIXEL_BUDGET,
    ):
        check_variables(variables, "the detector's variables")
        if not min_face_size >= 1:
            raise ValueError(f"min_face_size must be at least 1 pixel (got {min_face_size}).")
        if not 0 < factor < 1:
            raise ValueError(f"factor must lie in (0, 1) (got {factor}).")
        if len(thresholds) != 3 or not all(0 <= t < 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities in [0, 1) (got {thresholds}).")
        self.min_face_size, self.factor = float(min_face_size), float(factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.pixel_budget = pixel_budget
        self.variables = jax.device_put({k: variables[k] for k in NETS})
        self.pnet, self.rnet, self.onet = _JITTED["pnet"], _JITTED["rnet"], _JITTED["onet"]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **settings) -> Detector:
        """Returns a detector with converted weights (`path`, or the cached facenet-pytorch conversion)."""
        return cls(load_variables(resolve_weights(path)), **settings)

    def detect(self, image: np.ndarray) -> Faces:
        """Returns the faces in one (H, W, 3) uint8 RGB image."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """Returns the faces of each (H, W, 3) uint8 RGB image; sizes may differ between images."""
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {image.shape} {image.dtype}")
        sats = [integral_image(image) for image in images]
        candidates = self._stage1(images, sats)
        candidates = self._refine(images, sats, candidates, 24)
        return self._refine(images, sats, candidates, 48)

    def _stage1(self, images, sats) -> list[np.ndarray]:
        # Each image's pyramid is packed into one mosaic; mosaics of one bucket shape share P-Net calls.
        layouts = []
        for image in images:
            h, w = image.shape[:2]
            scales = pyramid_scales(h, w, self.min_face_size, self.factor)
            sizes = tuple((int(h * s + 1), int(w * s + 1)) for s in scales)
            offsets, canvas = pack_levels(sizes) if sizes else ((), (0, 0))
            layouts.append((scales, sizes, offsets, canvas))
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (scales, _, _, (ch, cw)) in enumerate(layouts):
            if scales:
                groups.setdefault((ch, cw), []).append(k)
        pending = []
        for (hb, wb), members in groups.items():
            per_call = max(1, self.pixel_budget // (hb * wb))
            per_call = 1 << (per_call.bit_length() - 1)  # a power of two, so call shapes stay few
            for lo in range(0, len(members), per_call):
                chunk = members[lo : lo + per_call]
                n = _pow2(len(chunk))
                x = np.zeros((n, hb, wb, 3), np.float32)
                valid = np.zeros((n, hb, wb), bool)
                for row, k in enumerate(chunk):
                    h, w = images[k].shape[:2]
                    _, sizes, offsets, _ = layouts[k]
                    for (hs, ws), (oy, ox) in zip(sizes, offsets, strict=True):
                        x[row, oy : oy + hs, ox : ox + ws] = _normalise(area_resize(sats[k], 0, h, 0, w, hs, ws)[0])
                        valid[row, oy : oy + hs - 2, ox : ox + ws - 2] = True
                # Dispatch every call before reading any back, so device work overlaps host work.
                pending.append((chunk, self.pnet(self.variables["pnet"], x, valid)))
        out = [np.zeros((0, 5), np.float32) for _ in images]
        for chunk, (reg, prob) in pending:
            reg, prob = np.asarray(reg), np.asarray(prob[..., 1])
            for row, k in enumerate(chunk):
                scales, sizes, offsets, _ = layouts[k]
                levels = []
                for scale, (hs, ws), (oy, ox) in zip(scales, sizes, offsets, strict=True):
                    cells = np.s_[row, oy // 2 : oy // 2 + _pnet_out(hs), ox // 2 : ox // 2 + _pnet_out(ws)]
                    boxes = self._proposals(reg[cells], prob[cells], scale)
                    levels.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
                boxes = np.concatenate(levels)
                out[k] = calibrate_stage1(boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)])
        return out

    def _proposals(self, reg: np.ndarray, prob: np.ndarray, scale: float) -> np.ndarray:
        """Returns (n, 9) float32 rows x1, y1, x2, y2, score, 4 regressions of P-Net cells >= thresholds[0]."""
        ys, xs = np.nonzero(prob >= np.float32(self.thresholds[0]))  # row-major, as torch's nonzero
        cell = np.stack([xs, ys], 1).astype(np.float32)
        s = np.float32(scale)
        # The reference's float32 arithmetic: floor((2 * cell + 1) / scale), floor((2 * cell + 12) / scale).
        q1 = np.floor((np.float32(2) * cell + np.float32(1)) / s)
        q2 = np.floor((np.float32(2) * cell + np.float32(12)) / s)
        return np.concatenate([q1, q2, prob[ys, xs][:, None], reg[ys, xs]], 1).astype(np.float32)

    def _refine(self, images, sats, candidates: list, size: int) -> list:
        """R-Net (size 24) or O-Net (size 48) over every image's candidates at once."""
        crops, kept = [], []
        for k, boxes in enumerate(candidates):
            h, w = images[k].shape[:2]
            y0, y1, x0, x1, ok = crop_bounds(boxes, h, w)
            # The reference would misalign its rows on an empty crop; such boxes are dropped instead.
            boxes = boxes[ok]
            kept.append(boxes)
            if len(boxes):
                crops.append(_normalise(area_resize(sats[k], y0[ok], y1[ok], x0[ok], x1[ok], size, size)))
        total = sum(len(b) for b in kept)
        outs = self._run_net("rnet" if size == 24 else "onet", np.concatenate(crops) if crops else None, total)
        results, start = [], 0
        for boxes in kept:
            rows = slice(start, start + len(boxes))
            start += len(boxes)
            if size == 24:
                results.append(self._after_rnet(boxes, *(o[rows] for o in outs)))
            else:
                results.append(self._after_onet(boxes, *(o[rows] for o in outs)))
        return results

    def _run_net(self, name: str, x: np.ndarray | None, total: int) -> tuple[np.ndarray, ...]:
        widths = (4, 2) if name == "rnet" else (4, 10, 2)
        if total == 0:
            return tuple(np.zeros((0, c), np.float32) for c in widths)
        apply = self.rnet if name == "rnet" else self.onet
        pending = []
        for lo in range(0, total, MAX_CANDIDATES):
            part = x[lo : lo + MAX_CANDIDATES]
            padded = np.zeros((bucket(len(part), 16, per_octave=4), *part.shape[1:]), np.float32)
            padded[: len(part)] = part
            pending.append((len(part), apply(self.variables[name], padded)))
        return tuple(np.concatenate([np.asarray(o[i])[:n] for n, o in pending]) for i in range(len(widths)))

    def _after_rnet(self, boxes, reg, prob) -> np.ndarray:
        score = prob[:, 1]
        keep = score > np.float32(self.thresholds[1])
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], 1)
        reg = reg[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return square(regress(boxes[pick], reg[pick]))

    def _after_onet(self, boxes, reg, points, prob) -> Faces:
        score = prob[:, 1]
        keep = score > np.float32(self.thresholds[2])
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], 1)
        reg, points = reg[keep], points[keep]
        if len(boxes) == 0:
            return _no_faces()
        w = boxes[:, 2] - boxes[:, 0] + 1
        h = boxes[:, 3] - boxes[:, 1] + 1
        # Landmarks are relative to the squared R-Net box (before O-Net's own regression).
        xs = w[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        ys = h[:, None] * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = np.stack([xs, ys], -1).astype(np.float32)
        boxes = regress(boxes, reg)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7, min_area=True)
        return Faces(boxes[pick, :4].astype(np.float32), boxes[pick, 4].astype(np.float32), landmarks[pick])
