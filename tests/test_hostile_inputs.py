"""Hostile and unlucky inputs: foreign image formats, special files, links, odd names, pack bombs, offline TFDS.

Every crafted input is made here, small enough to run in a fraction of a second, yet the same shape as
the attack it stands for.
"""

import io
import os
import pickle
import socket
import struct
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from vitnt_jax import data, sources
from vitnt_jax.data import ImageError, read_image

from helpers import png_bytes, returns_within, smooth_faces

# ---------------------------------------------------------------------------------------------- decoders


def _saved(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 100).save(buffer, format=fmt)
    return buffer.getvalue()


def _dds_unknown_pixel_format() -> bytes:
    # 'DDS ' + a 124-byte header whose pixel format names an unknown FourCC: PIL's DDS plugin raised
    # NotImplementedError on it, which ended the whole run.
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I4s5I", 32, 0x4, b"XXXX", 0, 0, 0, 0, 0)
    return b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(64)


# PostScript that would loop forever in Ghostscript, where one is installed.
_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n"

FOREIGN = {
    "dds": (lambda: _saved("DDS"), "holds DDS data"),
    "dds_unknown_fourcc": (_dds_unknown_pixel_format, "holds DDS data"),
    "blp": (lambda: _saved("BLP", "P"), "holds BLP data"),
    "spider": (lambda: _saved("SPIDER", "F"), "not a readable image"),  # SPIDER has no signature to name it by
    "eps": (lambda: _EPS, "holds EPS data"),
    "ico": (lambda: _saved("ICO"), "holds ICO data"),
    "tiff": (lambda: _saved("TIFF"), "holds TIFF data"),
    "gif": (lambda: _saved("GIF", "P"), "holds GIF data"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_other_formats_under_an_image_name_are_refused_without_decoding(tmp_path, kind):
    make, message = FOREIGN[kind]
    content = make()
    (tmp_path / "face.png").write_bytes(content)
    for source in (tmp_path / "face.png", content):
        with pytest.raises(ImageError, match=message):
            read_image(source)


def test_each_foreign_file_in_a_folder_is_exactly_one_error_row(tmp_path):
    good = smooth_faces(2, seed=4)
    for i, face in enumerate(good):
        (tmp_path / f"good{i}.png").write_bytes(png_bytes(face))
    for kind, (make, _) in FOREIGN.items():
        (tmp_path / f"{kind}.png").write_bytes(make())
    src = sources.image_folder(tmp_path)
    assert len(src) == len(FOREIGN) + 2
    rows = list(data.batches(src.load, range(len(src)), 4, 8, workers=2))
    errors = dict(zip(src.ids, [e for b in rows for e in b.errors], strict=True))
    valid = dict(zip(src.ids, [bool(v) for b in rows for v in b.valid[: len(b.indices)]], strict=True))
    assert [i for i in src.ids if valid[i]] == ["good0.png", "good1.png"]
    assert all(errors[f"{kind}.png"] for kind in FOREIGN)
    assert errors["good0.png"] == errors["good1.png"] == ""


def test_foreign_images_inside_a_bin_pack_are_error_rows(tmp_path):
    face = smooth_faces(1, seed=5)[0]
    path = tmp_path / "pack.bin"
    path.write_bytes(pickle.dumps(([png_bytes(face), _dds_unknown_pixel_format(), _EPS, _saved("BLP", "P")], [1, 0])))
    src = sources.insightface_bin(path)
    np.testing.assert_array_equal(src.load(0), face)
    for i, message in ((1, "DDS"), (2, "EPS"), (3, "BLP")):
        with pytest.raises(ImageError, match=f"holds {message} data"):
            src.load(i)


@pytest.mark.parametrize("error", [NotImplementedError("odd"), KeyError("tag"), RuntimeError("x"), ZeroDivisionError()])
def test_any_decoder_failure_is_an_image_error(tmp_path, monkeypatch, error):
    (tmp_path / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))

    def broken(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(ImageError, match=type(error).__name__):
        read_image(tmp_path / "a.png")


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt, SystemExit])
def test_running_out_of_memory_or_an_interrupt_is_not_an_image_error(tmp_path, monkeypatch, error):
    (tmp_path / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))

    def broken(self):
        raise error()

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(error):
        read_image(tmp_path / "a.png")


# ---------------------------------------------------------------------------------------------- special files


def _unblock(fifo) -> None:
    """Releases a reader stuck opening `fifo` (so a failing test leaves no thread holding a lock)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waits on it
        pass


def test_a_fifo_named_like_an_image_is_an_error_row_at_once(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))
    os.mkfifo(tmp_path / "pipe.png")
    src = sources.image_folder(tmp_path)
    assert src.ids == ["a.png", "pipe.png"]
    got = returns_within(10, lambda: src.load(1))
    _unblock(tmp_path / "pipe.png")
    assert got is not None, "reading a FIFO blocked"
    assert got[0] == "error" and isinstance(got[1], ImageError) and "named pipe" in str(got[1])
    assert src.load(0).shape == (32, 32, 3)


def test_a_list_naming_a_device_or_a_fifo_gives_error_rows(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"/dev/zero\n{tmp_path / 'pipe.png'}\n{tmp_path}\n")
    src = sources.path_list(listing)
    for index, message in ((0, "character device"), (1, "named pipe"), (2, "directory")):
        got = returns_within(10, lambda index=index: src.load(index))
        _unblock(tmp_path / "pipe.png")
        assert got is not None, f"reading {src.ids[index]} blocked"
        assert got[0] == "error" and message in str(got[1])


def test_a_list_that_is_a_pipe_nobody_writes_to_reads_as_empty(tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    got = returns_within(10, lambda: sources.path_list(tmp_path / "list.txt"))
    _unblock(tmp_path / "list.txt")
    assert got is not None, "opening a list FIFO without a writer blocked"
    assert got[0] == "error" and "names no images" in str(got[1])


def test_folder_links_are_not_followed(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (images / "sub" / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))
    (outside / "secret.png").write_bytes(png_bytes(smooth_faces(1, seed=1)[0]))
    os.symlink(outside, images / "out")  # a link out of the tree (a link to / listed other processes' files)
    os.symlink(images, images / "sub" / "loop")  # a loop back into it
    src = sources.image_folder(images)
    assert src.ids == ["sub/a.png"]
    assert sorted(p.split(" ")[2] for p in src.problems) == ["out", "sub/loop"]
    assert all("not followed" in p for p in src.problems)


def test_file_links_are_read_only_inside_the_folder(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    inner, secret = smooth_faces(2, seed=6)
    (images / "sub" / "real.png").write_bytes(png_bytes(inner))
    (outside / "secret.png").write_bytes(png_bytes(secret))
    os.symlink(images / "sub" / "real.png", images / "inside.png")
    os.symlink(outside / "secret.png", images / "outside.png")
    os.symlink(images / "nothing.png", images / "broken.png")
    os.symlink(images / "loop_b.png", images / "loop_a.png")
    os.symlink(images / "loop_a.png", images / "loop_b.png")
    src = sources.image_folder(images)
    assert src.ids == ["broken.png", "inside.png", "loop_a.png", "loop_b.png", "outside.png", "sub/real.png"]
    np.testing.assert_array_equal(src.load(1), inner)
    np.testing.assert_array_equal(src.load(5), inner)
    with pytest.raises(ImageError, match="outside the folder"):
        src.load(4)
    with pytest.raises(ImageError, match="file not found"):
        src.load(0)
    for index in (2, 3):
        got = returns_within(10, lambda index=index: src.load(index))
        assert got is not None and got[0] == "error" and isinstance(got[1], ImageError)


def test_a_file_swapped_for_a_link_after_listing_is_not_followed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))
    (tmp_path / "secret.png").write_bytes(png_bytes(smooth_faces(1, seed=2)[0]))
    src = sources.image_folder(images)
    (images / "a.png").unlink()
    os.symlink(tmp_path / "secret.png", images / "a.png")
    with pytest.raises(ImageError, match="link"):
        src.load(0)


def test_a_file_name_that_is_not_utf8_is_listed_and_read(tmp_path):
    # os.walk returns such a name surrogate-escaped; the id keeps it, and the file reads by the same name.
    face = smooth_faces(1, seed=7)[0]
    with open(os.path.join(os.fsencode(tmp_path), b"bad_\xff.png"), "wb") as f:
        f.write(png_bytes(face))
    src = sources.image_folder(tmp_path)
    assert src.ids == ["bad_\udcff.png"]
    np.testing.assert_array_equal(src.load(0), face)


# ---------------------------------------------------------------------------------------------- --list lines


def test_list_lines_end_at_line_feed_only(tmp_path):
    # str.splitlines also splits on these; a file name may hold every one of them.
    names = [f"a{c}b.png" for c in ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r")]
    faces = smooth_faces(len(names), seed=8)
    for name, face in zip(names, faces, strict=True):
        (tmp_path / name).write_bytes(png_bytes(face))
    listing = tmp_path / "list.txt"
    listing.write_bytes("".join(f"{n}\r\n" for n in names[:4]).encode() + "".join(f"{n}\n" for n in names[4:]).encode())
    src = sources.path_list(listing, tmp_path)
    assert src.ids == names
    for i, face in enumerate(faces):
        np.testing.assert_array_equal(src.load(i), face)


# ---------------------------------------------------------------------------------------------- pack bombs


def _op(name: str) -> bytes:
    return getattr(pickle, name)


def _repeated_reference_pack(n: int, size: int, kind: str) -> bytes:
    """A pack whose image list refers n times to one `size`-byte object through the pickle memo."""
    body = b"\x80\x05" + _op("EMPTY_LIST") + _op("MARK")
    if kind == "bytearray":
        body += _op("BYTEARRAY8") + struct.pack("<Q", size) + os.urandom(size) + _op("MEMOIZE")
    elif kind == "bytes":
        body += _op("BINBYTES") + struct.pack("<I", size) + os.urandom(size) + _op("MEMOIZE")
    body += (_op("LONG_BINGET") + struct.pack("<I", 0)) * (n - 1) + _op("APPENDS")
    return body + _op("EMPTY_LIST") + _op("TUPLE2") + _op("STOP")


def _repeated_codec_pack(n: int, size: int) -> bytes:
    """A protocol-2 pack calling _codecs.encode n times on one memoised `size`-character string."""
    text = ("x" * size).encode()
    body = b"\x80\x02" + _op("GLOBAL") + b"_codecs\nencode\n" + _op("BINPUT") + b"\x00"
    body += _op("BINUNICODE") + struct.pack("<I", size) + text + _op("SHORT_BINUNICODE") + b"\x06latin1"
    body += _op("TUPLE2") + _op("BINPUT") + b"\x01" + _op("POP") + _op("EMPTY_LIST") + _op("MARK")
    body += (_op("BINGET") + b"\x00" + _op("BINGET") + b"\x01" + _op("REDUCE")) * n + _op("APPENDS")
    return body + _op("EMPTY_LIST") + _op("TUPLE2") + _op("STOP")


def _peak_bytes(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        try:
            outcome = call()
        except Exception as error:  # noqa: BLE001 - handed back to the test
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["bytearray", "bytes"])
def test_a_pack_repeating_one_image_by_reference_is_refused_before_copying(tmp_path, kind):
    path = tmp_path / "bomb.bin"
    path.write_bytes(_repeated_reference_pack(2000, 64 << 10, kind))  # 64 KiB file bytes, 125 MiB of images
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError), got
    assert str(got).startswith(f"bin {path} is refused: its images hold {2000 * (64 << 10)} bytes, more than")
    assert peak < 8 * path.stat().st_size, peak


def test_a_pack_encoding_one_string_again_and_again_is_refused(tmp_path):
    path = tmp_path / "codec_bomb.bin"
    path.write_bytes(_repeated_codec_pack(2000, 64 << 10))
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError), got
    assert "is refused: its strings encode to more bytes than the file holds" in str(got)
    assert peak < 8 * path.stat().st_size, peak


def test_a_pack_naming_a_huge_memo_index_costs_no_memory(tmp_path):
    # The C unpickler sizes its memo by the largest index named: this 9-byte file asked it for 256 MiB
    # (and with 0x7ffffff0, 32 GiB).
    path = tmp_path / "memo.bin"
    path.write_bytes(b"\x80\x02" + _op("NONE") + _op("LONG_BINPUT") + struct.pack("<I", 1 << 24) + _op("STOP"))
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError) and "not a (images, issame) pair" in str(got)
    assert peak < 4 << 20, peak


def test_a_pack_of_colliding_dict_keys_is_refused_at_once(tmp_path):
    # Integers equal modulo 2**61 - 1 share one hash: building a dict of them takes quadratic time.
    keys = [k * (2**61 - 1) for k in range(1, 5001)]
    path = tmp_path / "dict.bin"
    path.write_bytes(pickle.dumps(({key: None for key in keys}, [])))
    started = time.monotonic()
    with pytest.raises(sources.SourceError, match=r"not a \(images, issame\) pair \(it holds a dict\)"):
        sources.insightface_bin(path)
    assert time.monotonic() - started < 5  # a generous bound: refusing reads only the file's first opcodes


def test_a_pack_of_many_empty_lists_is_refused(tmp_path):
    path = tmp_path / "lists.bin"
    path.write_bytes(b"\x80\x02" + _op("EMPTY_LIST") * 200_000 + _op("STOP"))  # 11 MiB of lists from 200 kB
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError) and "more than 16596 pickle instructions" in str(got), got
    # At most one list (56 bytes) per 16 bytes of file is built before the refusal, plus the stack's pointers.
    assert peak < 6 * path.stat().st_size, peak


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x80\x04" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc", "unreadable"),  # BINBYTES8 of 1 TiB
        (b"\x80\x05" + b"\x96" + struct.pack("<Q", 1 << 33) + b"abc", "unreadable"),  # BYTEARRAY8 of 8 GiB
        (b"\x80\x04" + b"\x95" + struct.pack("<Q", 1 << 40) + b"N.", "unreadable"),  # FRAME of 1 TiB
        (b"L" + b"9" * 100_000 + b"L\n.", "unreadable"),  # a 100,000-digit integer (quadratic to parse)
        (b"\x80\x02" + b"(i" + b"os\nsystem\n" + b".", "refusing it"),  # INST
        (b"\x80\x02" + b"\x82\x01" + b".", "refusing it"),  # EXT1
        (b"\x80\x02" + b"Pid\n" + b".", "refusing it"),  # PERSID
    ],
)
def test_packs_claiming_huge_sizes_or_calling_code_are_one_line(tmp_path, content, message):
    path = tmp_path / "claim.bin"
    path.write_bytes(content)
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError) and message in str(got), got
    assert peak < 4 << 20, peak


def test_a_pack_may_not_call_encode_with_another_codec(tmp_path):
    # punycode's decoder is quadratic: a 733 KB pack pinned a CPU for hours.
    class Punycode:
        def __reduce__(self):
            import codecs

            return (codecs.encode, ("abc", "punycode"))

    path = tmp_path / "punycode.bin"
    path.write_bytes(pickle.dumps(([png_bytes(smooth_faces(1)[0]), Punycode()], [True]), protocol=2))
    with pytest.raises(sources.SourceError, match=r"codec 'punycode'\); refusing it"):
        sources.insightface_bin(path)


# ---------------------------------------------------------------------------------------------- TFDS offline


class _UnpreparedBuilder:
    url_infos = {"https://downloads.example.invalid/lfw.tgz": None}
    downloads = 0

    def download_and_prepare(self, **kwargs):
        type(self).downloads += 1
        raise AssertionError("a download started although the network probe failed")


def test_unprepared_tfds_offline_fails_in_one_line_before_any_download(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    probed = []

    def not_prepared(*args, **kwargs):
        raise NotImplementedError("not prepared")

    monkeypatch.setattr(tfds, "data_source", not_prepared)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _UnpreparedBuilder())
    monkeypatch.setattr(sources, "probe", lambda host, port: probed.append((host, port)) or "timed out")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    with pytest.raises(sources.SourceError) as got:
        sources.tfds_source("lfw", data_dir=str(tmp_path))
    assert probed == [("downloads.example.invalid", 443)] and _UnpreparedBuilder.downloads == 0
    line = got.value.render(sources.flag_names())
    assert line == (
        f"TFDS dataset lfw is not prepared in {tmp_path} and the network is unreachable (downloads.example.invalid: "
        "timed out); prepare it on a machine with network access (`tfds build lfw --file_format=array_record "
        "--data_dir DIR`), copy DIR here and pass --data-dir DIR."
    )


def test_real_tfds_lfw_offline_fails_in_seconds_without_touching_the_network(monkeypatch, tmp_path, caplog):
    pytest.importorskip("tensorflow_datasets")
    import logging

    caplog.set_level(logging.WARNING)
    levels = {name: logging.getLogger(name).level for name in ("absl", "urllib3")}
    reached = []

    def no_network(*args, **kwargs):
        reached.append(args[:2])
        raise OSError("the test blocks the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(sources, "probe", lambda host, port: "blocked by the test")
    got = returns_within(60, lambda: sources.tfds_source("lfw", data_dir=str(tmp_path)))
    assert got is not None, "opening an unprepared TFDS dataset offline did not return"
    assert got[0] == "error" and isinstance(got[1], sources.SourceError), got
    assert "not prepared in" in str(got[1]) and "blocked by the test" in str(got[1])
    assert reached == []  # nothing but the (replaced) probe would have reached out
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []  # TFDS's folder warnings stay out
    assert {name: logging.getLogger(name).level for name in levels} == levels  # and are heard again after


def test_the_probe_answers_within_its_timeout():
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert sources.probe("127.0.0.1", port, timeout_s=2)  # refused: a reason, not None


def test_the_probe_bounds_a_name_lookup_that_never_answers(monkeypatch):
    release = threading.Event()

    def stuck_lookup(*args, **kwargs):
        release.wait(30)
        raise OSError("late")

    monkeypatch.setattr(socket, "getaddrinfo", stuck_lookup)
    started = time.monotonic()
    try:
        why = sources.probe("downloads.example.invalid", 443, timeout_s=0.2)
    finally:
        release.set()
    assert why == "no answer within 0.2 s" and time.monotonic() - started < 5


def test_tfds_images_are_decoded_by_read_image_and_ids_decode_none(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    face = smooth_faces(1, seed=9)[0]
    blobs = [png_bytes(face), _EPS, _dds_unknown_pixel_format()]
    opened = []

    class Records:
        class dataset_info:  # noqa: N801 - the attribute TFDS data sources carry
            features = {"image": tfds.features.Image(), "label": tfds.features.Text()}

        def __init__(self, decoders):
            self.encoded = decoders is not None and isinstance(decoders.get("image"), tfds.decode.SkipDecoding)

        def __len__(self):
            return len(blobs)

        def __getitem__(self, i):
            if not self.encoded:  # TFDS's own decoding opens any format PIL knows
                raise AssertionError("TFDS decoded an image")
            return {"image": blobs[i], "label": b"someone"}

    def data_source(name, split=None, data_dir=None, download=True, decoders=None):
        opened.append(decoders)
        return Records(decoders)

    monkeypatch.setattr(tfds, "data_source", data_source)
    src = sources.tfds_source("lfw")
    assert src.ids == ["lfw/train/0", "lfw/train/1", "lfw/train/2"] and src.labels == ["someone"] * 3
    np.testing.assert_array_equal(src.load(0), face)
    for i, what in ((1, "EPS"), (2, "DDS")):
        with pytest.raises(ImageError, match=f"holds {what} data"):
            src.load(i)


def test_a_pack_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.bin")
    for path in (tmp_path / "pipe.bin", "/dev/zero"):
        got = returns_within(10, lambda path=path: sources.insightface_bin(path))
        _unblock(tmp_path / "pipe.bin")
        assert got is not None, f"opening {path} as a pack blocked"
        assert got[0] == "error" and "is not a regular file" in str(got[1]), got


def test_a_list_naming_a_file_whose_name_is_not_utf8_reads_it(tmp_path):
    face = smooth_faces(1, seed=10)[0]
    with open(os.path.join(os.fsencode(tmp_path), b"bad_\xff.png"), "wb") as f:
        f.write(png_bytes(face))
    (tmp_path / "list.txt").write_bytes(b"good.png\nbad_\xff.png\n")
    (tmp_path / "good.png").write_bytes(png_bytes(face))
    src = sources.path_list(tmp_path / "list.txt", tmp_path)
    assert src.ids == ["good.png", "bad_\udcff.png"]
    np.testing.assert_array_equal(src.load(1), face)


# ---------------------------------------------------------------------------------------------- decoding costs


def _jpeg_segments(blob: bytes):
    """Yields (marker, start, end) of a JPEG's segments; a scan's segment runs to the end of its entropy data."""
    i = 2
    while blob[i + 1] != 0xD9:
        (length,) = struct.unpack(">H", blob[i + 2 : i + 4])
        end = i + 2 + length
        if blob[i + 1] == 0xDA:
            while blob[end] != 0xFF or blob[end + 1] == 0 or 0xD0 <= blob[end + 1] <= 0xD7:
                end += 1
        yield blob[i + 1], i, end
        i = end


def _progressive_jpeg(repeats: int) -> bytes:
    """A progressive grey JPEG whose last AC scan (a few bytes of end-of-block runs) stands `repeats` times."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", progressive=True)
    blob = buffer.getvalue()
    scans = [(start, end) for marker, start, end in _jpeg_segments(blob) if marker == 0xDA]
    start, end = scans[-1]
    return blob[:end] + blob[start:end] * (repeats - 1) + blob[end:]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    # Every scan is a pass over all blocks: 10,000 scans of a 16 Mpixel JPEG (370 KB) took 3 minutes to decode.
    assert read_image(_progressive_jpeg(1)).shape == (64, 64, 3)  # libjpeg's own 6 scans read as before
    assert read_image(_progressive_jpeg(data.MAX_JPEG_SCANS - 6)).shape == (64, 64, 3)
    (tmp_path / "scans.jpg").write_bytes(_progressive_jpeg(5000))
    for source in (tmp_path / "scans.jpg", _progressive_jpeg(5000)):
        with pytest.raises(ImageError, match=f"JPEG of more than {data.MAX_JPEG_SCANS} scans"):
            read_image(source)


def test_the_scan_count_follows_the_segments_as_libjpeg_reads_them():
    # Stray bytes before the scans are skipped by libjpeg: they must not hide the scans from the count either.
    bomb = _progressive_jpeg(5000)
    scans = [start for marker, start, _ in _jpeg_segments(bomb) if marker == 0xDA]
    hidden = bomb[: scans[0]] + b"\x00\x17" + bomb[scans[0] :]
    with pytest.raises(ImageError, match="scans"):
        read_image(hidden)
    # FF DA byte pairs inside a comment (or an EXIF thumbnail) and an MPO's further frames are no scans it decodes.
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 50).save(buffer, "JPEG", comment=b"\xff\xda" * 500)
    assert read_image(buffer.getvalue()).shape == (8, 8, 3)
    frames = io.BytesIO()
    Image.new("RGB", (8, 8), 50).save(frames, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), 9)] * 150)
    assert read_image(frames.getvalue()).shape == (8, 8, 3)


def test_a_sixteen_bit_image_costs_no_wider_copy(tmp_path):
    # The grey 16-bit path made three int64 copies: a 95 KB 7000x7000 PNG cost 1.2 GB.
    (tmp_path / "deep.png").write_bytes(png_bytes(np.full((1000, 1000), 0xABCD, np.uint16)))
    got, peak = _peak_bytes(lambda: read_image(tmp_path / "deep.png"))
    assert isinstance(got, np.ndarray) and np.all(got == 0xAB)
    assert peak < 9 * 1000 * 1000, peak  # the RGB result (3 bytes a pixel) and the 16-bit values, no more


def _exif(orientation: int, order: str = "<", junk_tags: int = 0) -> bytes:
    """An EXIF block holding Orientation and `junk_tags` tags whose data lies past the block's end."""
    mark = b"II*\0" if order == "<" else b"MM\0*"
    entries = [struct.pack(order + "HHIHH", 0x9000 + k, 7, 1 << 20, 8, 0) for k in range(junk_tags)]
    entries.append(struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0))
    return b"Exif\0\0" + mark + struct.pack(order + "IH", 8, len(entries)) + b"".join(entries) + bytes(4)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_every_exif_orientation_is_applied_as_pil_turns_it(fmt, order):
    from PIL import ImageOps

    upright = smooth_faces(1, size=16, seed=11)[0][:, :12]
    for orientation in range(1, 9):
        buffer = io.BytesIO()
        Image.fromarray(upright).save(buffer, fmt, exif=_exif(orientation, order), quality=95)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
        np.testing.assert_array_equal(read_image(buffer.getvalue()), expected, err_msg=f"orientation {orientation}")


def test_decoding_warns_nothing(tmp_path):
    # A palette PNG with transparency warned once per image (the open lock's filters reset Python's memory of
    # warnings shown), and a crafted EXIF block once per damaged tag: thousands of stderr lines per file.
    palette = Image.new("P", (8, 8))
    palette.putpalette(bytes(range(256)) * 3)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=bytes([0, 255] * 128))
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), 90).save(jpeg, "JPEG", exif=_exif(6, junk_tags=2000))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for _ in range(3):
            assert read_image(buffer.getvalue()).shape == (8, 8, 3)
            assert read_image(jpeg.getvalue()).shape == (8, 8, 3)
    assert [str(w.message) for w in shown] == []


def test_a_system_error_row_does_not_repeat_a_long_path(tmp_path):
    (tmp_path / "list.txt").write_text("x" * 5000 + ".png\n")
    src = sources.path_list(tmp_path / "list.txt")
    with pytest.raises(ImageError) as got:
        src.load(0)
    assert str(got.value) == "unreadable image (File name too long)"


# ---------------------------------------------------------------------------------------------- listing costs


def _nest(top, depth: int) -> int:
    """Makes `depth` nested folders `d` under top (by descriptor: no path grows); returns the innermost's fd."""
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    return fd


def _unnest(top, depth: int) -> None:
    """Removes what _nest made, innermost first (shutil.rmtree recurses, and fails at this depth)."""
    fds = [os.open(top, os.O_RDONLY)]
    for _ in range(depth):
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    for name in os.listdir(fds[-1]):
        os.unlink(name, dir_fd=fds[-1])
    for parent, child in zip(fds[-2::-1], fds[:0:-1], strict=True):
        os.close(child)
        os.rmdir("d", dir_fd=parent)
    os.close(fds[0])


def test_a_folder_nested_deeper_than_pythons_recursion_limit_is_listed(tmp_path):
    # os.walk recursed once per level (Python 3.11): 1,100 levels (a 2.2 KB path) ended the run with RecursionError.
    depth = 1100
    fd = _nest(tmp_path, depth)
    try:
        with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(png_bytes(smooth_faces(1, seed=12)[0]))
        os.close(fd)
        src = sources.image_folder(tmp_path)
        assert src.ids == ["d/" * depth + "deep.png"] and src.problems == []
        np.testing.assert_array_equal(src.load(0), smooth_faces(1, seed=12)[0])
    finally:
        _unnest(tmp_path, depth)


def test_listing_a_folder_keeps_only_the_ids(tmp_path):
    # A Path, a partial and a tuple per file cost ~480 bytes: 20 GB for a 42-million-image folder.
    for k in range(4):
        (tmp_path / f"identity{k}").mkdir()
        for i in range(1000):
            (tmp_path / f"identity{k}" / f"{i:05d}.jpg").touch()
    got, peak = _peak_bytes(lambda: sources.image_folder(tmp_path))
    assert len(got) == 4000 and got.ids[0] == "identity0/00000.jpg" and got.ids[-1] == "identity3/00999.jpg"
    assert peak < 150 * 4000, peak  # the id strings and the list of them


def test_listing_a_path_list_keeps_only_the_ids(tmp_path, monkeypatch):
    # A Path per line kept ~380 bytes a line; the ids alone are ~75. The text is read and split block by block.
    monkeypatch.setattr(sources, "_LIST_READ", 1 << 16)
    n = 20_000
    (tmp_path / "list.txt").write_text("".join(f"identity/{i:06d}.jpg\n" for i in range(n)))
    tracemalloc.start()
    try:
        got = sources.path_list(tmp_path / "list.txt", tmp_path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == n
    assert kept < 120 * n, kept
    assert peak < 130 * n, peak  # the ids, and one block of the file read


def test_list_lines_split_across_read_blocks_read_as_written(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_LIST_READ", 3)  # a BOM, CR LF pairs and multi-byte characters straddle blocks
    names = ["a.png", "b\u2028c.png", "é\x85.png", "bad_\udcff.png", "x\ry.png"]
    body = b"".join(n.encode("utf-8", "surrogateescape") + b"\r\n" for n in names)
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf" + body + b"  \n\t\nlast.png")
    assert sources.path_list(tmp_path / "list.txt").ids == [*names, "last.png"]


@pytest.mark.parametrize(
    "content, kind",
    [
        ("a.png\nb.png\n".encode("utf-16"), "it is UTF-16 text"),  # Windows Notepad's "Unicode"
        (b"a.png\n" + png_bytes(smooth_faces(1)[0]), "it is a binary file or UTF-16 text"),
    ],
)
def test_a_list_holding_nul_bytes_is_refused_in_one_line(tmp_path, content, kind):
    # Each line was an error row "embedded null byte": a run of nothing but failures.
    (tmp_path / "list.txt").write_bytes(content)
    with pytest.raises(sources.SourceError) as got:
        sources.path_list(tmp_path / "list.txt")
    assert str(got.value).startswith(f"list {tmp_path / 'list.txt'} holds a NUL byte (line ")
    assert str(got.value).endswith(f"{kind}; save it as UTF-8 text.")


def test_a_list_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(sources.SourceError) as got:
        sources.path_list(tmp_path)
    assert str(got.value) == f"list {tmp_path} is a folder; pass a text file, one image path per line."


def test_a_duplicate_list_line_is_named_within_one_line_of_text(tmp_path):
    name = "x" * 100_000
    (tmp_path / "list.txt").write_text(f"{name}\n{name}\n")
    with pytest.raises(sources.SourceError, match="twice") as got:
        sources.path_list(tmp_path / "list.txt")
    assert len(str(got.value)) < 400


# ---------------------------------------------------------------------------------------------- TFDS records


def _fake_tfds(monkeypatch, records, calls=None):
    """Replaces tfds.data_source by one serving `records` (dicts); returns the tfds module."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class Records:
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            return records[i]()

    def data_source(*args, **kwargs):
        if calls is not None:
            calls.append(kwargs.get("split"))
        return Records()

    monkeypatch.setattr(tfds, "data_source", data_source)
    return tfds


def test_tfds_ids_that_are_not_utf8_stay_apart(monkeypatch):
    # Decoded with 'replace', b"a\xff" and b"a\xfe" both became "a\ufffd": the dataset was refused as duplicated.
    face = png_bytes(smooth_faces(1)[0])
    _fake_tfds(monkeypatch, [lambda: {"image": face, "id": b"a\xff"}, lambda: {"image": face, "id": b"a\xfe"}])
    src = sources.tfds_source("lfw", id_key="id", label_key=None)
    assert src.ids == ["a\udcff", "a\udcfe"]


def test_tfds_ids_and_labels_are_read_one_record_at_a_time(monkeypatch):
    # Every record (images included) was held at once while ids were read: a large dataset's whole size.
    live, most = [0], [0]

    class Record(dict):
        def __init__(self, i):
            super().__init__(image=b"", label=b"p%d" % i)
            live[0] += 1
            most[0] = max(most[0], live[0])

        def __del__(self):
            live[0] -= 1

    _fake_tfds(monkeypatch, [lambda i=i: Record(i) for i in range(50)])
    src = sources.tfds_source("lfw")
    assert src.labels == [f"p{i}" for i in range(50)]
    assert most[0] <= 3, most[0]  # the first record (checked for its features), the last one and the next


@pytest.mark.parametrize("split", ["train[abc]", "train[", "train[1:2:3]"])
def test_a_malformed_tfds_split_is_one_line_before_anything_is_opened(monkeypatch, split):
    # It failed like an unprepared dataset: a network probe, then "not prepared ... network unreachable".
    calls = []
    tfds = _fake_tfds(monkeypatch, [], calls)
    monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: calls.append("builder"))
    monkeypatch.setattr(sources, "probe", lambda host, port: calls.append("probe") or "timed out")
    with pytest.raises(sources.SourceError) as got:
        sources.tfds_source(f"lfw:{split}")
    assert str(got.value).startswith(f"TFDS split {split!r} is not one TFDS reads (") and calls == []


def test_a_tfds_split_sum_is_checked_part_by_part(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def not_prepared(*args, **kwargs):
        raise NotImplementedError("not prepared")

    class Builder:
        info = type("Info", (), {"splits": {"train": None, "test": None}})()
        url_infos = {}

        def download_and_prepare(self, **kwargs):
            raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds, "data_source", not_prepared)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    with pytest.raises(sources.SourceError, match="needs TensorFlow"):  # train+test exists: it goes on to prepare
        sources.tfds_source("lfw:train+test[:10]")  # was refused as a split named 'train+test'

    with pytest.raises(sources.SourceError, match="has no split 'train\\+val'; choose one of test, train"):
        sources.tfds_source("lfw:train+val")


# ---------------------------------------------------------------------------------------------- packs, second look


def test_a_pack_of_memo_entries_is_refused_in_proportion_to_its_size(tmp_path):
    # MEMOIZE is one byte and keeps a memo entry (~80 bytes): 2 MB of them kept 165 MB before the pack was refused.
    path = tmp_path / "memo.bin"
    path.write_bytes(b"\x80\x04N" + _op("MEMOIZE") * 200_000 + _op("STOP"))
    got, peak = _peak_bytes(lambda: sources.insightface_bin(path))
    assert isinstance(got, sources.SourceError) and "pickle instructions" in str(got), got
    assert peak < 6 * path.stat().st_size, peak


# Packs as Python 2's pickle wrote them (insightface's lfw.bin, cfp_fp.bin, agedb_30.bin): str is bytes there,
# written with STRING (protocol 0) or SHORT_BINSTRING / BINSTRING (1 and 2); bools as INT 01/00 before protocol 2.
_LONG = bytes(range(256)) + b"\xff\xd8" * 30  # 316 bytes: BINSTRING, not SHORT_BINSTRING
_PY2_IMAGES = (b"\xff\xd8\x00'\"\\", b"c\nd", _LONG, b"")
_PY2_PACKS = {
    0: b"((lp0\nS'\\xff\\xd8\\x00\\'\"\\\\'\np1\naS'c\\nd'\np2\naS'"
    + "".join(f"\\x{b:02x}" for b in _LONG).encode()
    + b"'\np3\naS''\np4\na(lp5\nI01\naI00\natp6\n.",
    1: b"(]q\x00(U\x06\xff\xd8\x00'\"\\q\x01U\x03c\ndq\x02T"
    + struct.pack("<I", len(_LONG))
    + _LONG
    + b"q\x03U\x00q\x04e]q\x05(I01\nI00\netq\x06.",
    2: b"\x80\x02]q\x00(U\x06\xff\xd8\x00'\"\\q\x01U\x03c\ndq\x02T"
    + struct.pack("<I", len(_LONG))
    + _LONG
    + b"q\x03U\x00q\x04e]q\x05(\x88\x89e\x86q\x06.",
}


@pytest.mark.parametrize("protocol", sorted(_PY2_PACKS))
def test_packs_written_by_python2_read_as_bytes(tmp_path, protocol):
    from vitnt_jax.packs import read_bin

    content = _PY2_PACKS[protocol]
    # The crafted stream is what the stock unpickler reads as Python 2's str: bytes, with encoding='bytes'.
    assert pickle.loads(content, encoding="bytes") == (list(_PY2_IMAGES), [True, False])
    path = tmp_path / "py2.bin"
    path.write_bytes(content)
    pack = read_bin(path)
    assert pack.images == _PY2_IMAGES and all(type(b) is bytes for b in pack.images)
    assert pack.issame == (True, False)


def test_a_pack_path_that_cannot_be_opened_says_why(tmp_path):
    os.symlink(tmp_path / "loop_b.bin", tmp_path / "loop_a.bin")
    os.symlink(tmp_path / "loop_a.bin", tmp_path / "loop_b.bin")
    loop = (tmp_path / "loop_a.bin", "Too many levels of symbolic links")
    for path, why in (loop, ("x" * 5000, "File name too long")):
        with pytest.raises(sources.SourceError) as got:
            sources.insightface_bin(path)
        assert str(got.value) == f"bin {path} cannot be read ({why}); check the path and the disk."


def test_decoding_many_good_and_bad_files_on_many_threads_gives_what_one_thread_gives(tmp_path):
    # The decoders share PIL's plugin tables, the open lock and warning filters: results must not depend on timing.
    faces = smooth_faces(6, seed=13)
    kinds = [
        lambda k: png_bytes(faces[k % 6]),
        lambda k: _jpeg_of(faces[k % 6], progressive=k % 2 == 0),
        lambda k: png_bytes(faces[k % 6])[: 40 + k],  # truncated
        lambda k: FOREIGN[sorted(FOREIGN)[k % len(FOREIGN)]][0](),
        lambda k: b"",
        lambda k: _progressive_jpeg(200),  # too many scans
        lambda k: _jpeg_of(faces[k % 6], exif=_exif(1 + k % 8, "<>"[k % 2], junk_tags=k % 50)),
    ]
    for k in range(210):
        (tmp_path / f"{k:03d}.png").write_bytes(kinds[k % len(kinds)](k))
    src = sources.image_folder(tmp_path)

    def outcome(i):
        try:
            return src.load(i).tobytes()
        except ImageError as error:
            return str(error)

    alone = [outcome(i) for i in range(len(src))]
    assert sum(isinstance(x, bytes) for x in alone) == 90
    for _ in range(2):
        rows = list(data.batches(src.load, range(len(src)), 16, 32, workers=8))
        errors = [e for b in rows for e in b.errors]
        assert errors == [x if isinstance(x, str) else "" for x in alone]
        images = [b.images[r] for b in rows for r in range(len(b.indices))]
        for x, image in zip(alone, images, strict=True):
            if isinstance(x, bytes):
                assert image.tobytes() == x  # 32x32 already: no resize


def _jpeg_of(face, progressive=False, exif=b""):
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, "JPEG", progressive=progressive, exif=exif, quality=95)
    return buffer.getvalue()


def test_a_folder_of_many_folder_links_reports_a_bounded_number_of_lines(tmp_path):
    # Every link was its own warning line (and string kept): a million links, a million lines.
    (tmp_path / "a.png").write_bytes(png_bytes(smooth_faces(1)[0]))
    (tmp_path / "target").mkdir()
    for k in range(sources.MAX_PROBLEMS + 50):
        os.symlink(tmp_path / "target", tmp_path / f"link{k:03d}")
    src = sources.image_folder(tmp_path)
    assert src.ids == ["a.png"] and len(src.problems) == sources.MAX_PROBLEMS + 1
    assert src.problems[0].startswith("folder link link000 is not followed")
    assert src.problems[-1] == "50 more folder links or folders that cannot be listed; their images are not scored"


def test_the_scan_count_reads_each_byte_of_many_small_segments_a_bounded_number_of_times():
    # Reading a whole block at every segment made 100,000 four-byte comments cost 100,000 blocks (20 GB).
    class Counted(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            out = super().read(n)
            self.read_bytes += len(out)
            return out

    blob = _progressive_jpeg(1)
    markers = list(_jpeg_segments(blob))
    scans = [start for marker, start, _ in markers if marker == 0xDA]
    many = blob[: scans[1]] + b"\xff\xfe\x00\x02" * 900 + blob[scans[1] :]
    stream = Counted(many)
    assert data._jpeg_counts(stream) == (len(markers) + 900, len(scans))
    assert stream.read_bytes < 40 * len(many), stream.read_bytes
    assert read_image(many).shape == (64, 64, 3)


@pytest.mark.parametrize("segment", [b"\xff\xe5\x00\x02", b"\xff\xfe\x00\x02"])
def test_a_jpeg_of_a_million_tiny_segments_is_refused_before_pil_parses_it(segment):
    # PIL parses the segments before the image data in Python (~4 s a MB) holding the lock all decoders open under.
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 1).save(buffer, "JPEG")
    blob = buffer.getvalue()
    opened = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "_open", lambda stream: opened.append(1))
        with pytest.raises(ImageError, match=f"JPEG of more than {data.MAX_JPEG_SEGMENTS} segments"):
            read_image(blob[:2] + segment * 1_000_000 + blob[2:])
    assert opened == []


def _png_with(chunk_type: bytes, count: int, face) -> bytes:
    """The PNG of `face` with `count` empty chunks of `chunk_type` before its image data."""
    import zlib

    blob = png_bytes(face)
    chunk = struct.pack(">I", 0) + chunk_type + struct.pack(">I", zlib.crc32(chunk_type))
    return blob[:33] + chunk * count + blob[33:]  # after the signature (8) and IHDR (25)


@pytest.mark.parametrize("chunk_type, count", [(b"abCd", 200_000), (b"tEXt", 200_000), (b"IDAT", 200_000)])
def test_a_png_of_a_million_tiny_chunks_is_refused_before_pil_parses_it(chunk_type, count):
    face = smooth_faces(1, size=8)[0]
    assert np.array_equal(read_image(_png_with(chunk_type, 500, face)), face)  # many, but not absurdly many
    opened = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "_open", lambda stream: opened.append(1))
        with pytest.raises(ImageError, match="PNG of more than"):
            read_image(_png_with(chunk_type, count, face))
    assert opened == []
