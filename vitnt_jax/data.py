"""Decoding and preprocessing of face images on the host, and fixed-size batches with a mask."""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import io
import itertools
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitnt_jax import files, storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The formats read_image decodes (PIL's names), whatever a file is called: PIL identifies content by its
# bytes, and its other plugins (DDS, BLP, SPIDER, EPS through Ghostscript, ...) are not run on our input.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# An image on object storage above this many bytes is an error row, not read (its size is one metadata request).
MAX_OBJECT_BYTES = 256 << 20
# Refuse images above this many pixels before decoding them (decompression-bomb guard);
# aligned faces are 112x112, so even large photos stay far below it. PIL's own guard
# (Image.MAX_IMAGE_PIXELS, left as the user set it) stays as a second line of defence; its
# warning is silenced around our open only, since read_image refuses such images itself.
MAX_PIXELS = 64_000_000
# Refuse JPEGs of more scans than this before decoding them: each scan is a pass over every block of the image,
# so a 370 KB progressive JPEG of 10,000 near-empty scans took 3 minutes to decode (16 Mpixel; hours at the
# pixel limit). libjpeg writes 10 scans (6 for grey), baseline JPEGs 1 to 3; libjpeg-turbo advises a limit too.
MAX_JPEG_SCANS = 100
# And JPEGs of more segments (markers) than this: PIL parses those before the image data in Python, about 4 s a MB
# of empty APP segments, holding the lock every decoding thread opens images under. Cameras write a few dozen
# (an ICC profile of 16 MB, the most there is, takes 255).
MAX_JPEG_SEGMENTS = 1000
# Likewise PNG chunks: ~15 us each in PIL's Python parser (those before the image data under that lock). Writers
# put a few dozen besides the image data (IDAT), whose chunks number at most tens of thousands (8 KB each).
MAX_PNG_CHUNKS = 1000
MAX_PNG_DATA_CHUNKS = 100_000
_SCAN_READ = 1 << 20  # a scan's data is searched for the next marker in blocks of this many bytes
# warnings.catch_warnings changes process-wide state: decoding threads take turns opening headers.
_OPEN_LOCK = threading.Lock()


class ImageError(Exception):
    """An input image that cannot be used; the message says why."""


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Returns an (H, W, 3) uint8 RGB array from any PIL mode (grey, 16-bit, palette, RGBA, CMYK).

    Alpha is dropped and 16-bit values keep their top 8 bits, as OpenCV's imread (which the
    authors' evaluation uses) does.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grey: keep the top 8 bits rather than clipping at 255 (in place: no wider copy of the image).
        values = np.asarray(image).astype(np.uint16)
        values >>= 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    elif image.mode == "I":
        values = np.asarray(image, dtype=np.int32)
        shift = 8 if values.max(initial=0) < 65536 else 24
        image = Image.fromarray(np.clip(values >> shift, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode != "RGB":
        # Alpha and transparency are dropped anyway; without this, every palette PNG with a tRNS chunk warned.
        image.info.pop("transparency", None)
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


# EXIF orientation (tag 0x0112) -> the turn that shows the image upright, as PIL's ImageOps.exif_transpose.
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(exif: bytes | None) -> int:
    """Returns the EXIF orientation (1 to 8) an "Exif\\0\\0" + TIFF block holds in its first directory, else 1.

    Only that one tag is read, as OpenCV's imread does (XMP orientation is not applied): PIL's parser reads
    every tag, warning once per damaged one (thousands of lines from one crafted file).
    """
    if not isinstance(exif, bytes) or not exif.startswith(b"Exif\0\0"):
        return 1
    tiff = memoryview(exif)[6:]
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(bytes(tiff[:4]))
    if order is None:
        return 1
    try:
        (first,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, first)
        for entry in range(first + 2, min(first + 2 + 12 * count, len(tiff) - 11), 12):
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag == 0x0112 and kind in (3, 4):  # SHORT or LONG
                (value,) = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)
                return value if value in _TURNS else 1
    except struct.error:  # a directory past the block's end: no orientation
        pass
    return 1


def _upright(image: Image.Image) -> Image.Image:
    """Returns the image turned as its EXIF orientation says (phone photos), as OpenCV's imread does."""
    turn = _TURNS.get(exif_orientation(image.info.get("exif")))
    return image if turn is None else image.transpose(turn)


def _not_regular(mode: int) -> str | None:
    """Returns why a file of this st_mode is not read (a FIFO, a device, ...), or None for a regular file."""
    return _why(files.kind(mode))


def _why(kind: str | None) -> str | None:
    if kind is None:
        return None
    return "is a directory, not an image" if kind == "a folder" else f"is {kind}, not an image file"


def _regular_file(path: str | os.PathLike, follow_links: bool = True) -> BinaryIO:
    """Returns `path` open for reading; raises ImageError unless it is a regular file.

    Checked before opening (a device is never opened) and again on the open descriptor, which is opened
    non-blocking so a FIFO put in the file's place meanwhile cannot hang the run. follow_links=False
    refuses a link in the last path component.
    """
    info = os.stat(path) if follow_links else os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ImageError("is a link, not read")
    why = _not_regular(info.st_mode)
    if why is None:
        try:
            return os.fdopen(files.open_regular(path, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW)), "rb")
        except files.NotRegularFileError as error:
            why = _why(error.kind)
    raise ImageError(why)


def _content_format(stream: BinaryIO) -> str | None:
    """Returns the PIL format name the stream's first bytes announce (prefix tests only: nothing decodes)."""
    stream.seek(0)
    prefix = stream.read(16)
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # some prefix tests fail on short input: that format it is not
            continue
    return None


def _open(stream: BinaryIO) -> Image.Image:
    """Opens a PNG, JPEG or WEBP (header only) without PIL's warnings; read_image checks the size.

    PIL warns about a large image (read_image refuses it itself) and about damaged metadata (an MPO index, an
    APNG header); a crafted file can vary those messages without end, each one line on stderr.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Image.open(stream, formats=IMAGE_FORMATS)


# A marker as libjpeg looks for one between segments and after a scan's entropy-coded data: 0xFF, then a byte that
# is not 0x00 (a stuffed 0xFF), 0xFF (fill) or a restart marker (those stand inside a scan).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def _jpeg_counts(stream: BinaryIO) -> tuple[int, int]:
    """Returns (segments, scans) of the first image of a JPEG, counting no further than either limit + 1.

    Walks the segments as libjpeg reads them: each segment skipped by its length (an EXIF thumbnail inside
    APP1 counts for nothing), a scan's data searched for the next marker, stray bytes between segments passed
    over as libjpeg passes them; the first EOI ends the image (an MPO's further frames are not decoded).
    """
    segments, scans, position = 0, 0, 2  # after SOI
    while segments <= MAX_JPEG_SEGMENTS and scans <= MAX_JPEG_SCANS:
        position = _next_jpeg_marker(stream, position)
        if position < 0:
            break
        stream.seek(position + 1)
        head = stream.read(3)
        if len(head) < 3 or head[0] == 0xD9:  # EOI (or the file's end): the image is complete
            break
        segments += 1
        if head[0] in (0x01, 0xD8):  # TEM and SOI stand alone
            position += 2
            continue
        length = int.from_bytes(head[1:3], "big")
        if length < 2:  # libjpeg refuses such a segment: the decoder will say so
            break
        scans += head[0] == 0xDA
        position += 2 + length
    return segments, scans


def _png_chunks(stream: BinaryIO) -> tuple[int, int]:
    """Returns (metadata chunks, image data chunks) of a PNG up to IEND, counting no further than a limit + 1."""
    metadata, data, position = 0, 0, 8  # after the signature
    while metadata <= MAX_PNG_CHUNKS and data <= MAX_PNG_DATA_CHUNKS:
        stream.seek(position)
        head = stream.read(8)
        if len(head) < 8 or head[4:] == b"IEND":
            break
        if head[4:] in (b"IDAT", b"fdAT", b"fcTL"):  # an APNG's frames count as image data
            data += 1
        else:
            metadata += 1
        position += 12 + int.from_bytes(head[:4], "big")  # length, type, data, CRC
    return metadata, data


def _refuse_costly(stream: BinaryIO) -> None:
    """Raises ImageError for a PNG or JPEG of more chunks, segments or scans than the limits, before PIL parses it."""
    stream.seek(0)
    signature = stream.read(8)
    if signature == b"\x89PNG\r\n\x1a\n":
        metadata, data = _png_chunks(stream)
        if metadata > MAX_PNG_CHUNKS or data > MAX_PNG_DATA_CHUNKS:
            raise ImageError(
                f"PNG of more than {MAX_PNG_CHUNKS} chunks besides its image data, or more than {MAX_PNG_DATA_CHUNKS} "
                "image data chunks, refused: reading so many takes minutes; re-encode it (a PNG holds a few dozen)"
            )
    if not signature.startswith(b"\xff\xd8\xff"):
        return
    segments, scans = _jpeg_counts(stream)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            f"JPEG of more than {MAX_JPEG_SCANS} scans (progressive passes), refused: so many can take minutes "
            "to decode; re-encode it (a JPEG writer makes at most about 10)"
        )
    if segments > MAX_JPEG_SEGMENTS:
        raise ImageError(
            f"JPEG of more than {MAX_JPEG_SEGMENTS} segments, refused: reading so many takes minutes; re-encode it "
            "(a JPEG holds a few dozen)"
        )


def _next_jpeg_marker(stream: BinaryIO, position: int) -> int:
    """Returns the offset of the first JPEG marker at or after `position`, or -1 at the end of the stream."""
    size = 64  # the next marker most often stands right there: only a scan's data needs whole blocks
    while True:
        stream.seek(position)
        block = stream.read(size)
        size = _SCAN_READ
        if len(block) < 2:
            return -1
        found = _JPEG_MARKER.search(block)
        if found is not None:
            return position + found.start()
        position += len(block) - 1  # a marker may straddle two blocks


def _decode(stream: BinaryIO) -> np.ndarray:
    _refuse_costly(stream)  # before PIL's header parser, which runs holding _OPEN_LOCK
    stream.seek(0)
    try:
        image = _open(stream)
    except UnidentifiedImageError as error:
        other = _content_format(stream)
        wanted = ", ".join(IMAGE_FORMATS[:-1]) + " or " + IMAGE_FORMATS[-1]
        if other is not None:
            raise ImageError(f"not a {wanted} image (it holds {other} data)") from error
        raise ImageError(f"not a readable image (no {wanted} data)") from error
    with image:
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"image is {w}x{h} pixels, above the {MAX_PIXELS} pixel limit")
        image.load()
        return to_rgb8(_upright(image))


def read_image(source: str | Path | bytes) -> np.ndarray:
    """Returns the (H, W, 3) uint8 array of a PNG/JPEG/WEBP file, URL or encoded bytes; raises ImageError.

    Only IMAGE_FORMATS are decoded, whatever the name says; only regular files are opened (a FIFO or a
    device is an ImageError at once); every failure to decode, of any kind, is an ImageError. A URL
    (gs://, s3://, ...) is read through vitnt_jax.storage: a missing object is "file not found" as a
    missing file is, an object above MAX_OBJECT_BYTES is refused unread, a URL of a scheme storage does not
    read (http://, memory://, a chained URL) is that row's error; no credentials (or credentials refused, as
    an expired token), an unreachable endpoint, a service still throttling after its retries or a missing
    fsspec package raise StorageError (every row would fail: the run stops, and --resume continues).
    """
    return read_file(source)


_ROW_REASONS = {"missing": "file not found", "folder": "is a directory, not an image", "denied": "permission denied"}


def _row_or_stop(error: storage.StorageError) -> Exception:
    """Returns the ImageError of a StorageError about this one object; the StorageError itself when every object
    would fail alike (no credentials, an unreachable endpoint, a missing package): that stops the run."""
    if error.kind in _ROW_REASONS:
        return ImageError(_ROW_REASONS[error.kind])
    if error.kind == "bucket":
        return ImageError(f"file not found ({error})")
    if error.kind == "other":
        return ImageError(f"unreadable image ({error})")
    if error.kind == "scheme":  # a list line naming http://, memory://, a chained URL, file://host/...: that row's
        return ImageError(f"not read: {error}")
    return error


def _remote(url: str) -> BinaryIO:
    """Returns a URL's object open for reading; ImageError for a missing, folder-like or too large one."""
    try:
        return storage.open_read(url, max_bytes=MAX_OBJECT_BYTES)  # one metadata request, then the object's bytes
    except storage.StorageError as error:
        if error.kind == "large":
            raise ImageError(
                f"object of {error.size} bytes, above the {MAX_OBJECT_BYTES} byte limit, not read"
            ) from error
        raise


def read_file(source: str | os.PathLike | bytes, *, follow_links: bool = True) -> np.ndarray:
    """Returns what read_image returns; follow_links=False refuses a link as the file's last component."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream: BinaryIO = io.BytesIO(source)
        elif storage.is_url(source):
            stream = _remote(source)
        else:
            stream = _regular_file(source, follow_links)
        with stream:
            return _decode(stream)
    except (ImageError, MemoryError):
        raise
    except storage.StorageError as error:
        row = _row_or_stop(error)
        if row is error:
            raise
        raise row from error
    except FileNotFoundError as error:
        raise ImageError("file not found") from error
    except IsADirectoryError as error:
        raise ImageError("is a directory, not an image") from error
    except PermissionError as error:
        raise ImageError("permission denied") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"refused as a decompression bomb ({error})") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageError("is a link loop or a link, not read") from error
        # The row already names the file: a system error says what happened, not the (maybe 4 KB) path again.
        why = error.strerror if error.filename is not None and error.strerror else str(error)
        raise ImageError(f"unreadable image ({why})") from error
    except Exception as error:  # a decoder's own failure, of whatever type, is this image's error row
        raise ImageError(f"unreadable image ({type(error).__name__}: {error})") from error


# Fixed face box for unaligned photos whose face a detector centred (LFW: 250x250 crops at 2.2x
# the Viola-Jones box): a square of 0.45 x the short side, centred at (0.5 W, 0.48 H). For LFW this
# is a 112-pixel box with the eyes near row 51, as in the ArcFace template.
CENTER_BOX = (0.45, 0.5, 0.48)


def center_crop(array: np.ndarray) -> np.ndarray:
    """Returns the fixed centre face box of an unaligned photo (see CENTER_BOX)."""
    h, w = array.shape[:2]
    side_frac, cx_frac, cy_frac = CENTER_BOX
    side = max(1, round(side_frac * min(h, w)))
    x0 = min(max(0, round(cx_frac * w - side / 2)), w - side)
    y0 = min(max(0, round(cy_frac * h - side / 2)), h - side)
    return array[y0 : y0 + side, x0 : x0 + side]


ALIGNS = ("none", "center", "mtcnn")
NO_FACE = "no face found"


@dataclass
class Prepared:
    image: np.ndarray | None
    error: str = ""
    resized_from: tuple[int, int] | None = None


def to_rgb(array: np.ndarray, color: str = "rgb") -> np.ndarray:
    """Returns the (H, W, 3) uint8 RGB form of a decoded array; raises ImageError for other arrays.

    Grey (H, W) / (H, W, 1) arrays become RGB, a 4th (alpha) channel is dropped, and 'bgr'
    sources are swapped to RGB.
    """
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 4)):
        array = (
            np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2)
            if array.ndim == 2 or array.shape[2] == 1
            else array[..., :3]
        )
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
        raise ImageError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")
    return array[..., ::-1] if color == "bgr" else array


def prepare(
    array: np.ndarray, size: int, color: str = "rgb", align: str = "none", landmarks: np.ndarray | None = None
) -> Prepared:
    """Returns a (size, size, 3) uint8 RGB image from a decoded array.

    color: channel order the SOURCE holds ('bgr' is swapped to RGB). align: 'none' (already
    aligned; other sizes are resized bilinearly), 'center' (the fixed CENTER_BOX crop first) or
    'mtcnn' (warped by the face's (5, 2) `landmarks` onto the ArcFace template scaled to `size`;
    no landmarks = no face found).
    """
    try:
        array = to_rgb(array, color)
    except ImageError as error:
        return Prepared(None, str(error))
    if align == "mtcnn":
        from vitnt_jax.align import estimate, warp

        if landmarks is None:
            return Prepared(None, NO_FACE)
        return Prepared(warp(array, estimate(landmarks, size), size))
    if align == "center":
        array = center_crop(array)
    resized = None
    if array.shape[:2] != (size, size):
        resized = (array.shape[1], array.shape[0])
        array = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.BILINEAR))
    return Prepared(np.ascontiguousarray(array), "", None if align == "center" else resized)


@dataclass
class Batch:
    """A fixed-size batch: `images` padded with zeros past `len(indices)`; `valid` marks usable rows."""

    indices: list[int]
    images: np.ndarray  # (batch_size, size, size, 3) uint8
    valid: np.ndarray  # (batch_size,) bool
    errors: list[str]
    resized: list[tuple[int, int] | None] = field(default_factory=list)


def batches(
    load: Callable[[int], np.ndarray],
    indices: Sequence[int],
    batch_size: int,
    size: int,
    *,
    color: str = "rgb",
    align: str = "none",
    workers: int = 4,
    prefetch: int = 2,
    detector=None,
) -> Iterator[Batch]:
    """Yields fixed-size batches of `indices` in order, decoding on `workers` threads ahead of use.

    load(index) returns the decoded (H, W, 3) uint8 array or raises ImageError. With align
    'mtcnn', `detector` (a vitnt_jax.mtcnn.Detector) finds the faces on the batch-assembling
    thread, ahead of use like the decoding, a group of at most `detector.group_pixels` pixels at a
    time (a larger photo alone): photos are decoded at most `workers` ahead of their group and
    dropped once aligned, so host memory does not grow with the batch size. The face kept per
    image follows vitnt_jax.mtcnn.select_face, and an image without a face keeps its row with the
    error NO_FACE.
    """
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    if align == "mtcnn" and detector is None:
        raise ValueError("align 'mtcnn' needs a detector")
    count = -(-len(indices) // batch_size)

    def chunk(k: int) -> list[int]:  # made when it is queued: a run of 40 million indices is no list of lists
        return list(indices[k * batch_size : (k + 1) * batch_size])

    def one(index: int) -> Prepared:
        try:
            return prepare(load(index), size, color, align)
        except ImageError as error:
            return Prepared(None, str(error) or "unreadable image")

    def decode(index: int) -> np.ndarray | str:
        try:
            return np.ascontiguousarray(to_rgb(load(index), color))
        except ImageError as error:
            return str(error) or "unreadable image"

    def decoded_ahead(chunk: list[int]) -> Iterator[np.ndarray | str]:
        """Yields each image of `chunk` decoded (or its error), keeping at most `workers` decodes ahead."""
        ahead: collections.deque = collections.deque()
        rest = iter(chunk)
        for index in itertools.islice(rest, max(1, workers)):
            ahead.append(pool.submit(decode, index))
        while ahead:
            done = ahead.popleft().result()
            for index in itertools.islice(rest, 1):
                ahead.append(pool.submit(decode, index))
            yield done

    def detect_and_align(chunk: list[int]) -> list[Prepared]:
        from vitnt_jax.mtcnn import select_face

        out: list[Prepared | None] = [None] * len(chunk)
        group: list[tuple[int, np.ndarray]] = []

        def align_group() -> None:
            found = detector.detect_batch([photo for _, photo in group])

            def warp(item: tuple[tuple[int, np.ndarray], object]) -> None:
                (k, photo), faces = item
                pick = select_face(faces, photo.shape[0], photo.shape[1])
                out[k] = prepare(photo, size, "rgb", "mtcnn", None if pick is None else faces.landmarks[pick])

            list(pool.map(warp, zip(group, found, strict=True)))
            group.clear()  # the photos go: only their aligned crops are kept

        pixels = 0
        for k, photo in enumerate(decoded_ahead(chunk)):
            if isinstance(photo, str):
                out[k] = Prepared(None, photo)
                continue
            # The detector's own grouping rule, applied before decoding further photos.
            if group and pixels + photo.shape[0] * photo.shape[1] > detector.group_pixels:
                align_group()
                pixels = 0
            group.append((k, photo))
            pixels += photo.shape[0] * photo.shape[1]
        if group:
            align_group()
        return out

    def assemble(chunk: list[int]) -> Batch:
        done = detect_and_align(chunk) if align == "mtcnn" else list(pool.map(one, chunk))
        images = np.zeros((batch_size, size, size, 3), np.uint8)
        valid = np.zeros(batch_size, bool)
        for row, p in enumerate(done):
            if p.image is not None:
                images[row], valid[row] = p.image, True
        return Batch(chunk, images, valid, [p.error for p in done], [p.resized_from for p in done])

    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    assembler = concurrent.futures.ThreadPoolExecutor(1)
    finished = False
    try:
        pending = [assembler.submit(assemble, chunk(k)) for k in range(min(prefetch, count))]
        for next_index in range(prefetch, count + prefetch):
            batch = pending.pop(0).result()
            if next_index < count:
                pending.append(assembler.submit(assemble, chunk(next_index)))
            yield batch
        finished = True
    finally:
        # Stopped early (closed, or an error): drop the queued work and do not wait for what runs. The garbage
        # collector may close an abandoned stream in any thread, even one holding _OPEN_LOCK that decoders need.
        for executor in (assembler, pool):
            executor.shutdown(wait=finished, cancel_futures=not finished)
