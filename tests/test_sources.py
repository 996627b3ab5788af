"""Image decoding and the four sources: folders, path lists, insightface .bin packs, TFDS."""

import io
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from vitnt_jax import data, sources
from vitnt_jax.data import ImageError, center_crop, prepare, read_image

from helpers import png_bytes, smooth_faces


def test_read_image_converts_every_mode_to_rgb8(tmp_path):
    rgb = smooth_faces(1, seed=1)[0]
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((4, 5), 0x1234, np.uint16)).save(tmp_path / "sixteen.png")
    for name in ("grey.png", "palette.png", "rgba.png", "cmyk.jpg", "sixteen.png"):
        array = read_image(tmp_path / name)
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, as OpenCV does
    assert np.all(read_image(tmp_path / "sixteen.png") == 0x12)  # top 8 bits of 16-bit values
    grey = read_image(tmp_path / "grey.png")
    assert np.all(grey[..., 0] == grey[..., 1])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.png", b"", "not a readable image"),
        ("text.jpg", b"hello, I am not a picture", "not a readable image"),
    ],
)
def test_read_image_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(tmp_path / name)


def test_truncated_missing_directory_and_bomb(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(smooth_faces(1, 64)[0]).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:300])
    with pytest.raises(ImageError, match="unreadable image"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path / "folder.png")
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 Mpixel, a few kB on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused by our limit, without PIL's warning
        with pytest.raises(ImageError, match="pixel limit"):
            read_image(tmp_path / "bomb.png")


def test_importing_the_library_changes_no_process_wide_setting():
    code = (
        "import warnings, numpy; from PIL import Image; "
        "limit = Image.MAX_IMAGE_PIXELS; filters = list(warnings.filters); "
        "import vitnt_jax.data, vitnt_jax.sources, vitnt_jax.pipeline, vitnt_jax.score; "
        "assert Image.MAX_IMAGE_PIXELS == limit, Image.MAX_IMAGE_PIXELS; assert warnings.filters == filters"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_center_crop_is_the_documented_lfw_box():
    photo = np.zeros((250, 250, 3), np.uint8)
    photo[64, 69] = 255  # top-left corner of the expected box
    photo[175, 180] = 200  # bottom-right corner
    box = center_crop(photo)
    assert box.shape == (112, 112, 3)
    assert box[0, 0, 0] == 255 and box[111, 111, 0] == 200


def test_prepare_swaps_resizes_and_rejects_bad_arrays():
    face = smooth_faces(1, 32)[0]
    np.testing.assert_array_equal(prepare(face, 32, "bgr").image, face[..., ::-1])
    resized = prepare(face, 16)
    assert resized.image.shape == (16, 16, 3) and resized.resized_from == (32, 32)
    assert prepare(np.zeros((4, 4, 2), np.uint8), 16).error
    assert prepare(np.zeros((4, 4, 3), np.float32), 16).error
    assert prepare(face, 16, align="center").image.shape == (16, 16, 3)


def test_image_folder(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/x.JPG", "a.png", "c.jpeg"):
        Image.fromarray(smooth_faces(1)[0]).save(tmp_path / name)
    (tmp_path / "skip.txt").write_text("x")
    src = sources.image_folder(tmp_path)
    assert src.ids == ["a.png", "b/x.JPG", "c.jpeg"] and src.labels is None
    assert src.load(1).shape == (32, 32, 3)
    with pytest.raises(sources.SourceError, match="not a folder"):
        sources.image_folder(tmp_path / "a.png")


def test_path_list(tmp_path):
    faces = smooth_faces(2)
    (tmp_path / "imgs").mkdir()
    for i, face in enumerate(faces):
        Image.fromarray(face).save(tmp_path / "imgs" / f"{i}.png")
    listing = tmp_path / "image_path_list.txt"
    listing.write_text("imgs/1.png\n\nimgs/0.png\nimgs/missing.png\n")
    src = sources.path_list(listing, tmp_path)
    assert src.ids == ["imgs/1.png", "imgs/0.png", "imgs/missing.png"]
    np.testing.assert_array_equal(src.load(1), faces[0])
    with pytest.raises(ImageError, match="file not found"):
        src.load(2)
    listing.write_text("imgs/1.png\nimgs/0.png\nimgs/1.png\n")
    with pytest.raises(sources.SourceError, match="lists 'imgs/1.png' twice"):
        sources.path_list(listing, tmp_path)
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.path_list(tmp_path / "nope.txt")
    listing.write_text("imgs/1.png\n")
    with pytest.raises(sources.SourceError, match="^root .* is not a folder") as got:
        sources.path_list(listing, tmp_path / "nowhere")
    assert got.value.field == "root" and got.value.render(sources.flag_names()).startswith("--root ")


def _pack(tmp_path, protocol):
    faces = smooth_faces(4, seed=2)
    path = tmp_path / f"pack{protocol}.bin"
    path.write_bytes(pickle.dumps(([png_bytes(f) for f in faces], [True, False]), protocol=protocol))
    return path, faces


@pytest.mark.parametrize("protocol", [2, 4])
def test_insightface_bin(tmp_path, protocol):
    path, faces = _pack(tmp_path, protocol)
    src = sources.insightface_bin(path)
    assert src.ids == ["0", "1", "2", "3"]
    assert src.labels == ["1", "1", "0", "0"]  # images 2k, 2k+1 form pair k
    for i, face in enumerate(faces):
        np.testing.assert_array_equal(src.load(i), face)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_bin_is_refused_without_running_code(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([png_bytes(smooth_faces(1)[0]), _Exploit(marker)], [True])))
    with pytest.raises(sources.SourceError, match="refusing it"):
        sources.insightface_bin(path)
    assert not os.path.exists(marker)


class _OtherCodec:
    def __reduce__(self):
        import codecs

        return (codecs.encode, ("abc", "rot13"))


def test_a_bin_may_encode_latin1_bytes_only(tmp_path):
    # Protocol 2 stores bytes as _codecs.encode(text, 'latin1'): the one call a pack may make, with that codec.
    path = tmp_path / "codec.bin"
    path.write_bytes(pickle.dumps(([png_bytes(smooth_faces(1)[0]), _OtherCodec()], [True]), protocol=2))
    with pytest.raises(sources.SourceError, match=r"codec 'rot13'\); refusing it"):
        sources.insightface_bin(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (pickle.dumps({"images": []}), "not a \\(images, issame\\) pair"),
        (pickle.dumps(([1, 2], [True])), "list of encoded images"),
        (pickle.dumps(([b"x", b"y"], [True]))[:10], "unreadable"),
    ],
)
def test_malformed_bins(tmp_path, content, message):
    (tmp_path / "bad.bin").write_bytes(content)
    with pytest.raises(sources.SourceError, match=message):
        sources.insightface_bin(tmp_path / "bad.bin")


def test_tfds_lfw_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        src = sources.tfds_source("lfw")
        assert len(src) == 6 and src.ids[0] == "lfw/train/0"
        assert src.labels is not None and all(isinstance(x, str) for x in src.labels)
        assert src.align == "mtcnn"  # LFW photos are not aligned: detect and align the face
        assert src.load(0).shape == (250, 250, 3)
        with pytest.raises(sources.SourceError, match="no feature 'img'"):
            sources.tfds_source("lfw", image_key="img")
    with pytest.raises(sources.SourceError, match="TFDS has no dataset"):
        sources.tfds_source("no_such_dataset_xyz")


def test_batches_pad_the_tail_and_mark_it_invalid(tmp_path):
    from vitnt_jax.data import batches

    root = tmp_path / "faces"
    root.mkdir()
    for i, face in enumerate(smooth_faces(13, seed=21)):
        Image.fromarray(face).save(root / f"{i:02d}.png")
    src = sources.image_folder(root)
    got = list(batches(src.load, list(range(13)), 8, 32, workers=2))
    assert [b.indices for b in got] == [list(range(8)), list(range(8, 13))]
    assert got[1].images.shape == (8, 32, 32, 3)
    assert got[1].valid.tolist() == [True] * 5 + [False] * 3
    assert not got[1].images[5:].any()


def test_grey_and_alpha_arrays_become_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for array in (grey, grey[..., None]):
        out = prepare(array, 8).image
        assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    rgba = np.dstack([np.stack([grey] * 3, -1), np.zeros((8, 8), np.uint8)])
    assert np.array_equal(prepare(rgba, 8).image, np.stack([grey] * 3, -1))


def test_exif_orientation_is_applied_like_opencv(tmp_path):
    upright = smooth_faces(1, size=32, seed=8)[0][:, :24]  # 32 rows x 24 columns
    # Stored rotated, with Orientation=6 ("rotate 90 CW to view"): viewers and OpenCV show it upright.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    got = read_image(tmp_path / "phone.png")
    assert got.shape == upright.shape
    np.testing.assert_array_equal(got, upright)


def test_unprepared_tfds_dataset_says_what_is_missing(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def not_prepared(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format TFRECORD is not supported")

    class Builder:
        def download_and_prepare(self, **kwargs):
            assert kwargs == {"file_format": "array_record"}
            raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds, "data_source", not_prepared)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    with pytest.raises(
        sources.SourceError, match="needs TensorFlow .*--file_format=array_record.*pass data_dir"
    ) as got:
        sources.tfds_source("lfw")
    assert got.value.field == "data_dir" and got.value.render(sources.flag_names()).endswith("pass --data-dir.")
    assert isinstance(got.value.__cause__, ModuleNotFoundError)  # the cause is kept for --debug


def test_tfds_unreadable_after_preparing_keeps_the_real_cause(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def data_source(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NotImplementedError("not prepared")
        raise ValueError("prepared as TFRecord")

    class Builder:
        info = type("Info", (), {"splits": {"train": None}})()

        def download_and_prepare(self, **kwargs):
            pass

    monkeypatch.setattr(tfds, "data_source", data_source)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    with pytest.raises(sources.SourceError, match="cannot be read after preparing \\(prepared as TFRecord\\)") as got:
        sources.tfds_source("lfw")
    assert isinstance(got.value.__cause__, ValueError)  # --debug shows the failure that happened, not the first


def test_closing_batches_early_never_waits_for_the_decoders(tmp_path):
    # The garbage collector may finalize an abandoned batch stream in any thread, one that holds the image
    # open lock included: closing it must not wait for decoders that need that lock (it would never return).
    import threading

    paths = []
    for i, face in enumerate(smooth_faces(16, seed=3)):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(face).save(paths[-1])
    hold = threading.Event()

    def load(i):
        if i >= 4:
            hold.wait(10)
        return data.read_image(paths[i])

    stream = data.batches(load, range(16), 4, 32, workers=2)
    next(stream)

    def finalize():
        with data._OPEN_LOCK:
            hold.set()
            stream.close()

    closer = threading.Thread(target=finalize, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "closing the stream waited for decoders that need the lock it holds"
