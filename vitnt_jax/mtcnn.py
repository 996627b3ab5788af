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

How it runs: the networks are jitted. P-Net sees only fixed TILE x TILE inputs: each pyramid level
is cut into pieces of at most TILE x TILE pixels that overlap by 10 pixels (P-Net's 12-pixel window
less its 2-pixel stride, so every output cell is computed wholly inside one piece and the pieces'
cells abut), and the pieces of all levels of all images of a group are packed into tiles (skyline
packing, even offsets). P-Net masks what lies outside each piece before its ceil-mode pool, so
tiling and packing never change a real output. Tiles run MAX_TILES at a time and the rest in
powers of two, so P-Net compiles at most log2(MAX_TILES) + 1 times whatever the photo sizes. R-Net
and O-Net take the candidates of every image of a group at once, padded to one of 4 sizes per
octave. Images are detected in groups of at most GROUP_PIXELS pixels (a larger image alone), so
host memory is bounded by the group, not by the batch. Resampling (exact integer integral images),
box bookkeeping and NMS run on the host in numpy: they are cheap, and their output sizes depend on
the data.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitnt_jax.errors import UserError

NETS = ("pnet", "rnet", "onet")
WEIGHTS_FORMAT = "vitnt-jax-mtcnn-1"
WEIGHTS_NAME = "mtcnn_facenet_pytorch.npz"
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
DEFAULT_FACTOR = 0.709
DEFAULT_MIN_FACE = 20
# Side of every P-Net input. 320 packs LFW's 250x250 pyramids (151 + 107 + 54 pixels a row) into 87% of
# the tiles, and other photos into 85-95%.
TILE = 320
# Pieces of a level overlap by 10 pixels (P-Net's 12-pixel window less its 2-pixel stride): every
# output cell's window lies wholly inside one piece, and consecutive pieces' cells abut exactly.
TILE_STEP = TILE - 10
MAX_TILES = 16  # tiles per P-Net call (1.6 MP, ~65 MB of first activations); fewer go in powers of two
# Pixels of the images detected together: their int64 summed-area tables (24 bytes a pixel) are the
# bulk of the host memory, ~400 MB at this budget; a larger image is detected alone.
GROUP_PIXELS = 1 << 24
MAX_CANDIDATES = 1024  # R-Net / O-Net rows per call (a bucket size)
_MASKED = -1e30  # below any real activation; finite, so masked cells never turn into NaN


class MTCNNError(UserError):
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


def flat_variables(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Returns {'net/params/layer/kernel': leaf} of a nested variables tree (the weights file's keys)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(flat_variables(value, path) if isinstance(value, Mapping) else {path: value})
    return out


def save_variables(path: str | os.PathLike, variables: Mapping, source: str = "") -> Path:
    """Writes the three nets' variables to one .npz file (atomically) and returns its path."""
    import secrets

    path = Path(path)
    check_variables(variables, "the MTCNN variables")
    arrays = {k: np.asarray(v, np.float32) for k, v in flat_variables(variables).items()}
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


def check_variables(variables: Mapping, what: str, remedy: str = "") -> None:
    """Raises MTCNNError naming every missing, unexpected, mis-shaped, non-float or non-finite variable.

    `remedy`, when given, ends the message (what the user should do about it).
    """
    want = {k: tuple(v.shape) for k, v in flat_variables(variable_shapes()).items()}
    flat = flat_variables(variables)
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    problems = []
    if missing := sorted(set(want) - set(got)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(got) - set(want)):
        problems.append(f"unexpected {unexpected}")
    for k in sorted(set(want) & set(got)):
        value = np.asarray(flat[k])
        if got[k] != want[k]:
            problems.append(f"{k} is {got[k]}, expected {want[k]}")
        elif not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{k} holds {value.dtype} values, not floats")
        elif not np.isfinite(value).all():  # NaN weights would silently find no face anywhere
            problems.append(f"{k} holds NaN or infinite values")
    if problems:
        end = f"; {remedy}" if remedy else ""
        raise MTCNNError(f"{what} are not MTCNN weights: {'; '.join(problems)}{end}.")


def _remedy(path: Path) -> str:
    """Returns what to do about a damaged weights file: the cached conversion is redone once deleted."""
    from vitnt_jax.cache import cache_dir

    try:
        cached = path.resolve() == (cache_dir() / WEIGHTS_NAME).resolve()
    except (OSError, RuntimeError):
        cached = False
    if cached:
        return f"delete {path} so that it is converted again on the next run"
    return "convert them again with `python -m converters.mtcnn`"


# What reading a truncated or corrupted .npz raises (zip directory, CRC, npy header, array data;
# a flipped zip flag reads as an unsupported method or an encrypted file).
_UNREADABLE = (
    OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError,
    zipfile.BadZipFile, zlib.error, struct.error,
)  # fmt: skip


MAX_WEIGHTS_BYTES = 64 << 20  # the three nets' float32 weights are about 2 MB


def _check_claims(path: Path) -> None:
    """Raises ValueError when the .npz at `path` claims more than MTCNN weights hold (before any array is read).

    np.load allocates what an array header claims and inflates what a member declares: a crafted
    file of a few kilobytes could otherwise ask for terabytes. Not a zip: left to np.load.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        members = archive.infolist()
        if sum(info.file_size for info in members) > MAX_WEIGHTS_BYTES:
            raise ValueError(f"its members expand to more than {MAX_WEIGHTS_BYTES} bytes")
        for info in members:
            with archive.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
                raise ValueError(f"array {info.filename} claims shape {shape}, more than its {info.file_size} bytes")


def load_variables(path: str | os.PathLike) -> dict[str, dict]:
    """Returns the nested variables stored by `save_variables`, checked strictly; raises MTCNNError."""
    path = Path(path)
    try:
        _check_claims(path)
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as error:
        raise MTCNNError(f"MTCNN weights {path} do not exist; check the path.") from error
    except _UNREADABLE as error:
        raise MTCNNError(
            f"MTCNN weights {path} are damaged or unreadable ({type(error).__name__}); {_remedy(path)}."
        ) from error
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise MTCNNError(
            f"{path} is not an MTCNN weights file written by `python -m converters.mtcnn`; {_remedy(path)}."
        )
    nested: dict = {}
    for key, value in arrays.items():
        node = nested
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # a key both a leaf and a folder: not our layout
                raise MTCNNError(f"{path} is not an MTCNN weights file: {key!r} clashes; {_remedy(path)}.")
        node[leaf] = value
    check_variables(nested, f"the weights in {path}", _remedy(path))
    return nested


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
    # In bands: numpy casts a whole input before accumulating it, and copies an input that overlaps its
    # output, so whole-table calls would double the table's memory.
    for left in range(0, image.shape[1], 256):
        np.cumsum(image[:, left : left + 256], axis=0, dtype=np.int64, out=sat[1:, 1 + left : 257 + left])
    for top in range(1, sat.shape[0], 256):
        band = sat[top : top + 256, 1:]
        np.cumsum(band, axis=1, out=band)
    return sat


def _windows(start: np.ndarray, length: np.ndarray, out: int, index: np.ndarray | None = None):
    """Returns (lo, hi) of shape (n, len(index)): torch adaptive_avg_pool's windows [floor(i*L/out),
    ceil((i+1)*L/out)) for the outputs i in `index` (default: all `out`), shifted by `start`."""
    i = np.arange(out) if index is None else np.asarray(index, np.int64)
    lo = start[:, None] + (i[None] * length[:, None]) // out
    hi = start[:, None] + ((i[None] + 1) * length[:, None] + out - 1) // out
    return lo, hi


def _window_means(sat: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    """Returns the (n, rows, cols, C) float32 means of the windows rows [r0, r1) x cols [c0, c1) (exact sums)."""
    rows0, rows1, cols0, cols1 = r0[:, :, None], r1[:, :, None], c0[:, None, :], c1[:, None, :]
    total = sat[rows1, cols1] - sat[rows0, cols1] - sat[rows1, cols0] + sat[rows0, cols0]
    count = ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :])[..., None]
    return (total / count).astype(np.float32)


def area_resize(sat: np.ndarray, y0, y1, x0, x1, out_h: int, out_w: int) -> np.ndarray:
    """Returns (n, out_h, out_w, C) float32 area-averaged crops [y0:y1, x0:x1] of the image behind `sat`.

    Matches torch `interpolate(mode="area")` (adaptive average pooling), down- or up-sampling.
    """
    y0, y1, x0, x1 = (np.asarray(v, np.int64).reshape(-1) for v in (y0, y1, x0, x1))
    r0, r1 = _windows(y0, y1 - y0, out_h)
    c0, c1 = _windows(x0, x1 - x0, out_w)
    return _window_means(sat, r0, r1, c0, c1)


def area_level(sat: np.ndarray, out_h: int, out_w: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Returns rows [rows) x columns [cols) of the whole image area-resized to (out_h, out_w): (h, w, C) float32.

    The same values as the matching part of `area_resize` over the whole image, computed for that part only.
    """
    zero, height, width = np.zeros(1, np.int64), np.array([sat.shape[0] - 1]), np.array([sat.shape[1] - 1])
    r0, r1 = _windows(zero, height, out_h, np.arange(*rows))
    c0, c1 = _windows(zero, width, out_w, np.arange(*cols))
    return _window_means(sat, r0, r1, c0, c1)[0]


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


def pyramid_sizes(height: int, width: int, min_face: float, factor: float) -> list[tuple[int, int]]:
    """Returns the (height, width) of each pyramid level: (int(h*s+1), int(w*s+1)), as the reference."""
    return [(int(height * s + 1), int(width * s + 1)) for s in pyramid_scales(height, width, min_face, factor)]


def bucket(n: int, minimum: int = 16, per_octave: int = 4) -> int:
    """Returns n rounded up to one of `per_octave` sizes per octave (a power of two), at least `minimum`.

    4 per octave (R-/O-Net candidate counts) pads by at most 25%.
    """
    if n <= minimum:
        return minimum
    step = 1 << max(0, (n - 1).bit_length() - per_octave.bit_length())
    return -(-n // step) * step


def split_level(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Returns the (y, x, height, width) pieces of a pyramid level: at most TILE x TILE, every TILE_STEP pixels.

    Each piece's P-Net cells are the level's cells from (y/2, x/2) on, and they abut those of the
    next piece: a full piece has exactly TILE_STEP/2 cells a side (the last piece: the level's rest).
    """

    def spans(n: int) -> list[tuple[int, int]]:
        after = max(0, -(-(n - TILE) // TILE_STEP))  # pieces after the first
        return [(k * TILE_STEP, min(TILE, n - k * TILE_STEP)) for k in range(after + 1)]

    return [(y, x, h, w) for y, h in spans(height) for x, w in spans(width)]


def _window_max(a: np.ndarray, w: int) -> np.ndarray:
    """Returns max(a[:, j : j + w]) for every j (doubling: a few passes whatever w)."""
    out, span = a, 1
    while 2 * span <= w:
        out, span = np.maximum(out[:, :-span], out[:, span:]), 2 * span
    if span < w:  # two overlapping windows of `span` cover the w columns
        out = np.maximum(out[:, : out.shape[1] - (w - span)], out[:, w - span :])
    return out


def pack_tiles(sizes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], int]:
    """Returns the (tile, y, x) place of each (height, width) piece in TILE x TILE tiles, and the tile count.

    Skyline packing, tallest pieces first: each piece goes to the first tile where it fits, at the
    lowest (then leftmost) place. Offsets are even, so every piece keeps P-Net's stride-2 cell grid.
    """
    side = TILE // 2  # the packing works in units of 2 pixels
    units = [(-(-h // 2), -(-w // 2)) for h, w in sizes]
    if any(h > side or w > side for h, w in units):
        raise ValueError(f"pieces must be at most {TILE}x{TILE} pixels")
    spots: list = [None] * len(sizes)
    skylines = np.zeros((0, side), np.int64)  # one row per tile still open
    tiles: list[int] = []  # tile number of each open row
    count = 0
    smallest = min((h for h, _ in units), default=0)
    for i in sorted(range(len(sizes)), key=lambda i: (-units[i][0], -units[i][1])):
        h, w = units[i]
        tops = _window_max(skylines, w)
        fits = tops + h <= side
        open_rows = np.flatnonzero(fits.any(axis=1))
        if open_rows.size:
            row = int(open_rows[0])
            x = int(np.argmin(np.where(fits[row], tops[row], side + 1)))
            y = int(tops[row, x])
        else:
            skylines = np.concatenate([skylines, np.zeros((1, side), np.int64)])
            tiles.append(count)
            row, x, y, count = len(tiles) - 1, 0, 0, count + 1
        skylines[row, x : x + w] = y + h
        spots[i] = (tiles[row], 2 * y, 2 * x)
        full = skylines.min(axis=1) + smallest > side  # no piece fits any more: close these tiles
        if full.any():
            skylines, tiles = skylines[~full], [t for t, f in zip(tiles, full, strict=True) if not f]
    return spots, count


def tile_calls(n: int) -> list[int]:
    """Returns the tile counts of the P-Net calls for n tiles: MAX_TILES at a time, then powers of two."""
    rest = n % MAX_TILES
    return [MAX_TILES] * (n // MAX_TILES) + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def _pnet_out(n: int) -> int:
    # conv3 -> ceil-mode pool 2/2 -> conv3 -> conv3
    return -(-(n - 4) // 2) + 1 - 4


def proposals(ys: np.ndarray, xs: np.ndarray, score: np.ndarray, reg: np.ndarray, scale: float) -> np.ndarray:
    """Returns (n, 9) float32 rows x1, y1, x2, y2, score, 4 regressions of the P-Net cells (ys, xs) of a level."""
    cell = np.stack([xs, ys], 1).astype(np.float32)
    s = np.float32(scale)
    # The reference's float32 arithmetic: floor((2 * cell + 1) / scale), floor((2 * cell + 12) / scale).
    q1 = np.floor((np.float32(2) * cell + np.float32(1)) / s)
    q2 = np.floor((np.float32(2) * cell + np.float32(12)) / s)
    return np.concatenate([q1, q2, score[:, None], reg], 1).astype(np.float32)


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
# P-Net on tiles has its own: only (2^k, TILE, TILE, 3) inputs ever reach it, so its cache stays small.
_JITTED["pnet_tiles"] = jax.jit(PNet().apply)


class Detector:
    """Finds faces and 5 landmarks in RGB uint8 images with MTCNN (jitted nets, host-side NMS)."""

    def __init__(
        self,
        variables: Mapping[str, Any],
        *,
        min_face_size: float = DEFAULT_MIN_FACE,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        factor: float = DEFAULT_FACTOR,
        group_pixels: int = GROUP_PIXELS,
    ):
        check_variables(variables, "the detector's variables")
        # MTCNN's window is 12 pixels: a smaller face size upsamples every photo (12/size)^2-fold.
        if not min_face_size >= 12:
            raise ValueError(f"min_face_size must be at least 12 pixels, MTCNN's window (got {min_face_size}).")
        if not 0 < factor < 1:
            raise ValueError(f"factor must lie in (0, 1) (got {factor}).")
        if len(thresholds) != 3 or not all(0 <= t < 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities in [0, 1) (got {thresholds}).")
        if not group_pixels >= 1:
            raise ValueError(f"group_pixels must be at least 1 (got {group_pixels}).")
        self.min_face_size, self.factor = float(min_face_size), float(factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.group_pixels = int(group_pixels)
        self.variables = jax.device_put({k: variables[k] for k in NETS})
        self.pnet, self.rnet, self.onet = _JITTED["pnet"], _JITTED["rnet"], _JITTED["onet"]
        self.pnet_tiles = _JITTED["pnet_tiles"]

    @classmethod
    def load(cls, path: str | os.PathLike, **settings) -> Detector:
        """Returns a detector with the converted weights file `path` (`vitnt_jax.models.mtcnn_weights` finds one)."""
        if path is None:  # converting the default weights is the resolver's job, above this module
            raise MTCNNError(
                "no MTCNN weights file given; vitnt_jax.models.mtcnn_weights() returns facenet-pytorch's, "
                "converted once."
            )
        return cls(load_variables(path), **settings)

    def detect(self, image: np.ndarray) -> Faces:
        """Returns the faces in one (H, W, 3) uint8 RGB image."""
        return self.detect_batch([image])[0]

    def groups(self, shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
        """Returns runs of consecutive image indices of at most `group_pixels` pixels each (a larger image alone)."""
        runs: list[list[int]] = []
        total = 0
        for k, shape in enumerate(shapes):
            pixels = int(shape[0]) * int(shape[1])
            if not runs or total + pixels > self.group_pixels:
                runs.append([])
                total = 0
            runs[-1].append(k)
            total += pixels
        return runs

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """Returns the faces of each (H, W, 3) uint8 RGB image; sizes may differ between images.

        The images are detected in `groups`: their summed-area tables (24 bytes a pixel) live only
        while their group is detected. The grouping changes no result.
        """
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {image.shape} {image.dtype}")
        found = []
        for run in self.groups([image.shape for image in images]):
            group = [images[k] for k in run]
            sats = [integral_image(image) for image in group]
            candidates = self._stage1(group, sats)
            candidates = self._refine(group, sats, candidates, 24)
            found += self._refine(group, sats, candidates, 48)
            del sats, candidates
        return found

    def pnet_maps(self, levels: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Returns (regression (h, w, 4), face probability (h, w)) of P-Net on each whole (H, W, 3) level.

        Computed on tiles exactly as detection does, for normalised float32 levels of any size.
        """
        sizes = [level.shape[:2] for level in levels]
        maps = [
            (np.zeros((_pnet_out(h), _pnet_out(w), 4), np.float32), np.zeros((_pnet_out(h), _pnet_out(w)), np.float32))
            for h, w in sizes
        ]

        def fill(lv, y0, y1, x0, x1):
            return levels[lv][y0:y1, x0:x1]

        for lv, cy, cx, reg, prob in self._pnet_pieces(sizes, fill):
            maps[lv][0][cy : cy + reg.shape[0], cx : cx + reg.shape[1]] = reg
            maps[lv][1][cy : cy + prob.shape[0], cx : cx + prob.shape[1]] = prob
        return maps

    def _pnet_pieces(self, sizes: Sequence[tuple[int, int]], fill):
        """Yields (level, first cell row, first cell column, regression (h, w, 4), face probability (h, w)) per piece.

        sizes: (height, width) of each level; fill(level, y0, y1, x0, x1) returns that part of the
        normalised level. Tiles are filled just before their call, and one call runs while the next
        is filled, so at most two calls' inputs are held at once.
        """
        pieces = [(lv, *piece) for lv, (h, w) in enumerate(sizes) for piece in split_level(h, w)]
        spots, n_tiles = pack_tiles([(h, w) for *_, h, w in pieces])
        on_tile: list[list[int]] = [[] for _ in range(n_tiles)]
        for p, (tile, _, _) in enumerate(spots):
            on_tile[tile].append(p)

        def read(first: int, count: int, outputs):
            reg, prob = np.asarray(outputs[0]), np.asarray(outputs[1])[..., 1]
            for row in range(count):
                for p in on_tile[first + row]:
                    lv, y, x, h, w = pieces[p]
                    _, oy, ox = spots[p]
                    cells = np.s_[row, oy // 2 : oy // 2 + _pnet_out(h), ox // 2 : ox // 2 + _pnet_out(w)]
                    yield lv, y // 2, x // 2, reg[cells], prob[cells]

        pending: collections.deque = collections.deque()
        first = 0
        for count in tile_calls(n_tiles):
            x = np.zeros((count, TILE, TILE, 3), np.float32)
            valid = np.zeros((count, TILE, TILE), bool)
            for row in range(count):
                for p in on_tile[first + row]:
                    lv, y0, x0, h, w = pieces[p]
                    _, oy, ox = spots[p]
                    x[row, oy : oy + h, ox : ox + w] = fill(lv, y0, y0 + h, x0, x0 + w)
                    valid[row, oy : oy + h - 2, ox : ox + w - 2] = True  # the piece's first-conv outputs
            pending.append((first, count, self.pnet_tiles(self.variables["pnet"], x, valid)))
            first += count
            if len(pending) == 2:
                yield from read(*pending.popleft())
        while pending:
            yield from read(*pending.popleft())

    def _stage1(self, images, sats) -> list[np.ndarray]:
        """Returns each image's P-Net candidates (n, 5): NMS per level and per image, regressed, squared."""
        levels = []  # (image, scale, height, width)
        for k, image in enumerate(images):
            h, w = image.shape[:2]
            for scale in pyramid_scales(h, w, self.min_face_size, self.factor):
                levels.append((k, scale, int(h * scale + 1), int(w * scale + 1)))

        def fill(lv, y0, y1, x0, x1):
            k, _, hs, ws = levels[lv]
            return _normalise(area_level(sats[k], hs, ws, (y0, y1), (x0, x1)))

        threshold = np.float32(self.thresholds[0])
        found: list[list] = [[] for _ in levels]
        for lv, cy, cx, reg, prob in self._pnet_pieces([(hs, ws) for *_, hs, ws in levels], fill):
            ys, xs = np.nonzero(prob >= threshold)
            found[lv].append((ys + cy, xs + cx, prob[ys, xs], reg[ys, xs]))
        per_image: list[list[np.ndarray]] = [[] for _ in images]
        for (k, scale, _, _), parts in zip(levels, found, strict=True):
            ys, xs, score, reg = (np.concatenate(column) for column in zip(*parts, strict=True))
            order = np.lexsort((xs, ys))  # row-major over the level, as torch's nonzero
            boxes = proposals(ys[order], xs[order], score[order], reg[order], scale)
            per_image[k].append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        out = []
        for boxes in per_image:
            boxes = np.concatenate(boxes) if boxes else np.zeros((0, 9), np.float32)
            out.append(calibrate_stage1(boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]))
        return out

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
