"""Image sources and decoding: folders of aligned faces -> uint8 RGB arrays at the model's size."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Refuse images above this many pixels before decoding them (decompression-bomb guard);
# aligned faces are 112x112, so even large photos stay far below it.
MAX_PIXELS = 64_000_000


class ImageError(Exception):
    """An input image that cannot be used; the message says why."""


def list_images(root: str | Path) -> list[tuple[str, Path]]:
    """Returns (id, path) of every PNG/JPEG under `root` (recursive), sorted by id.

    id is the path relative to root with '/' separators.
    """
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Returns an (H, W, 3) uint8 RGB array from any PIL mode (grey, 16-bit, palette, RGBA, CMYK)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: keep the top 8 bits rather than clipping at 255.
        values = np.asarray(image, dtype=np.uint32)
        shift = 8 if values.max(initial=0) < 65536 else 24
        image = Image.fromarray((values >> shift).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


@dataclass
class Decoded:
    image: np.ndarray | None
    error: str = ""
    resized_from: tuple[int, int] | None = None


def decode(path: str | Path, size: int, color: str = "rgb") -> Decoded:
    """Returns the image at `path` as (size, size, 3) uint8 RGB, or the reason it is unusable.

    color: channel order the FILE holds; 'bgr' files (e.g. extracted from insightface .bin packs
    by the usual scripts) are swapped to RGB. Other sizes are resized bilinearly.
    """
    try:
        with Image.open(path) as image:
            w, h = image.size
            if w * h > MAX_PIXELS:
                return Decoded(None, f"image is {w}x{h} pixels, above the {MAX_PIXELS} pixel limit")
            image.load()
            array = to_rgb8(image)
    except FileNotFoundError:
        return Decoded(None, "file not found")
    except UnidentifiedImageError:
        return Decoded(None, "not a readable image")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return Decoded(None, f"unreadable image ({error})")
    resized = None
    if array.shape[:2] != (size, size):
        resized = (array.shape[1], array.shape[0])
        array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
    if color == "bgr":
        array = array[..., ::-1]
    return Decoded(np.ascontiguousarray(array), "", resized)


@dataclass
class Batch:
    """A fixed-size batch: `images` padded with zeros past `len(ids)`; `valid` marks real rows."""

    ids: list[str]
    images: np.ndarray  # (batch_size, size, size, 3) uint8
    valid: np.ndarray  # (batch_size,) bool: decoded successfully
    errors: list[str]
    resized: list[tuple[int, int] | None] = field(default_factory=list)


def batches(
    items: Sequence[tuple[str, Path]],
    batch_size: int,
    size: int,
    color: str = "rgb",
    workers: int = 4,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Yields fixed-size batches in input order, decoding on `workers` threads ahead of use."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def load(chunk) -> Batch:
        decoded = list(pool.map(lambda item: decode(item[1], size, color), chunk))
        images = np.zeros((batch_size, size, size, 3), np.uint8)
        valid = np.zeros(batch_size, bool)
        for row, d in enumerate(decoded):
            if d.image is not None:
                images[row], valid[row] = d.image, True
        return Batch(
            [i for i, _ in chunk], images, valid, [d.error for d in decoded], [d.resized_from for d in decoded]
        )

    with (
        concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as assembler,
    ):
        pending = [assembler.submit(load, c) for c in chunks[:prefetch]]
        for next_index in range(prefetch, len(chunks) + prefetch):
            batch = pending.pop(0).result()
            if next_index < len(chunks):
                pending.append(assembler.submit(load, chunks[next_index]))
            yield batch
