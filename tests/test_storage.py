"""Object storage: local paths, s3:// (moto server) and gs:// (GCS emulator) on 127.0.0.1 behind one API."""

import importlib
import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vitnt_jax import storage

pytest_plugins = ["pytester", "storage_fixtures"]  # the servers' fixtures: storage_env, s3_bucket, gcs_bucket, ...


@pytest.fixture(params=["s3", "gs", "local"])
def place(request, tmp_path):
    """A folder location of each kind: a fresh bucket URL or a local folder."""
    if request.param == "local":
        return os.fspath(tmp_path)
    return request.getfixturevalue("s3_bucket" if request.param == "s3" else "gcs_bucket")


def test_write_read_list_remove(place):
    a, b = storage.join(place, "x/a.bin"), storage.join(place, "x/b.bin")
    storage.makedirs(storage.join(place, "x"))
    storage.write_bytes(a, b"hello")
    with storage.open_write(b) as f:
        f.write(b"wor")
        f.write(b"ld")
    assert storage.read_bytes(a) == b"hello" and storage.read_bytes(b) == b"world"
    assert storage.exists(a) and storage.size(b) == 5
    assert storage.listdir(storage.join(place, "x")) == ["a.bin", "b.bin"]
    assert storage.listdir(storage.join(place, "none")) == []
    with storage.open_read(b) as f:
        f.seek(2)
        assert f.read(2) == b"rl" and f.tell() == 4
    storage.write_bytes(a, b"again")  # replaced whole
    assert storage.read_bytes(a) == b"again"
    storage.remove(a)
    storage.remove(a)  # gone already: no error
    assert not storage.exists(a) and storage.listdir(storage.join(place, "x")) == ["b.bin"]
    assert storage.find(place) == [("x/b.bin", 5)] and storage.find_names(place) == ["x/b.bin"]


def test_open_write_leaves_nothing_when_the_block_raises(place):
    path = storage.join(place, "half.csv")
    with pytest.raises(RuntimeError, match="mid-write"), storage.open_write(path) as f:
        f.write(b"x" * 100_000)
        raise RuntimeError("mid-write")
    assert not storage.exists(path)
    storage.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), storage.open_write(path) as f:
        f.write(b"new and half")
        raise RuntimeError("mid-write")
    assert storage.read_bytes(path) == b"old"  # the old content stays whole
    if not storage.is_url(place):
        assert os.listdir(place) == ["half.csv"]  # no temporary left beside it


def test_a_remote_upload_interrupted_leaves_no_object(s3_bucket):
    path = s3_bucket + "/big.bin"
    with pytest.raises(RuntimeError), storage.open_write(path) as f:
        f.write(os.urandom(12 << 20))  # in s3fs's 50 MiB buffer, sent as one PUT at close: never sent
        raise RuntimeError("mid-write")
    assert not storage.exists(path) and storage.listdir(s3_bucket) == []


def test_glob(place):
    storage.makedirs(storage.join(place, "a/sub"))
    for name in ("a/1.png", "a/2.jpg", "a/sub/3.png", "b.png"):
        storage.write_bytes(storage.join(place, name), b"x")
    rel = lambda found: [p[len(place) + 1 :] for p in found]  # noqa: E731
    assert rel(storage.glob(storage.join(place, "a/*.png"))) == ["a/1.png"]
    assert rel(storage.glob(storage.join(place, "a/*"))) == ["a/1.png", "a/2.jpg"]
    assert rel(storage.glob(storage.join(place, "**/*.png"))) == ["a/1.png", "a/sub/3.png", "b.png"]
    assert rel(storage.glob(storage.join(place, "b.png"))) == ["b.png"]
    assert storage.glob(storage.join(place, "a")) == []  # a folder is no match
    assert storage.glob(storage.join(place, "none/*.png")) == []


def test_file_urls_are_local_paths(tmp_path):
    url = "file://" + os.fspath(tmp_path / "f.bin")
    storage.write_bytes(url, b"abc")
    assert (tmp_path / "f.bin").read_bytes() == b"abc" and storage.read_bytes(url) == b"abc"
    assert storage.glob("file://" + os.fspath(tmp_path) + "/*.bin") == [url]


def test_missing_file_and_folder_wordings(place):
    missing = storage.join(place, "nope.txt")
    with pytest.raises(storage.MissingError, match=r"nope\.txt does not exist; check the path\.$") as caught:
        storage.read_bytes(missing)
    assert isinstance(caught.value, FileNotFoundError) and caught.value.kind == "missing"
    with pytest.raises(FileNotFoundError):
        storage.size(missing)
    storage.makedirs(storage.join(place, "d"))
    storage.write_bytes(storage.join(place, "d/inner.txt"), b"x")
    with pytest.raises(storage.FolderError, match=r"d is a folder.*pass a file\.$"):
        storage.read_bytes(storage.join(place, "d"))
    with pytest.raises(storage.FolderError):
        storage.size(storage.join(place, "d"))


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_no_such_bucket(scheme, storage_env, no_remote_network):
    url = f"{scheme}://no-such-bucket-here/a.txt"
    with pytest.raises(storage.StorageError, match=rf"^no such bucket {scheme}://no-such-bucket-here .*name\.$"):
        storage.read_bytes(url)
    with pytest.raises(storage.StorageError, match="no such bucket"):
        storage.write_bytes(url, b"x")
    with pytest.raises(storage.StorageError, match="no such bucket"):
        storage.find(f"{scheme}://no-such-bucket-here/faces")
    assert not storage.exists(url)


def test_unreachable_endpoint_fails_in_seconds(unreachable_s3):
    start = time.monotonic()
    wording = r"^cannot reach the storage service for s3://b-x/a\.txt .*endpoint\.$"
    with pytest.raises(storage.StorageError, match=wording) as caught:
        storage.read_bytes("s3://b-x/a.txt")
    assert time.monotonic() - start < 20 and caught.value.kind == "unreachable"


def test_no_credentials(no_s3_credentials):
    with pytest.raises(storage.StorageError, match=r"^no credentials to read s3://b-x/a\.txt; set them up") as caught:
        storage.read_bytes("s3://b-x/a.txt")
    assert caught.value.kind == "credentials"


def test_access_denied_and_other_failures_are_one_sentence():
    denied = storage._translate(PermissionError(13, "Forbidden"), "gs://b/x", "write")
    assert str(denied) == "access denied to write gs://b/x; check that your credentials may write it."
    other = storage._translate(ValueError("odd\nreply"), "s3://b/x", "read")
    assert str(other) == "cannot read s3://b/x (ValueError: odd reply); check the location and access."


def test_a_scheme_without_its_package_names_it(monkeypatch):
    import fsspec.core

    def missing(url, **options):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(storage.StorageError, match=r"needs the s3fs package .*pip install s3fs\)\.$"):
        storage.read_bytes("s3://b/x")
    monkeypatch.undo()
    with pytest.raises(storage.StorageError, match=r"uses nosuchscheme://, which is not read or written here") as e:
        storage.read_bytes("nosuchscheme://b/x")
    assert e.value.kind == "scheme"


def test_local_writes_refuse_links_and_special_files(tmp_path):
    target = tmp_path / "target.csv"
    target.write_bytes(b"keep")
    (tmp_path / "link.csv").symlink_to(target)
    with pytest.raises(storage.StorageError, match="symbolic link; refusing"):
        storage.write_bytes(tmp_path / "link.csv", b"x")
    assert target.read_bytes() == b"keep"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(storage.StorageError, match="named pipe"):
        storage.write_bytes(tmp_path / "fifo", b"x")
    with pytest.raises(storage.StorageError, match="named pipe"):
        storage.read_bytes(tmp_path / "fifo")  # refused, never waited on
    with pytest.raises(storage.FolderError):
        storage.write_bytes(tmp_path, b"x")


def test_a_subprocess_reaches_the_servers(s3_bucket, gcs_bucket, storage_env):
    storage.write_bytes(s3_bucket + "/a.txt", b"from the test")
    code = (
        "import sys; from vitnt_jax import storage;"
        f"storage.write_bytes({gcs_bucket!r} + '/b.txt', storage.read_bytes({s3_bucket!r} + '/a.txt'))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=storage_env.env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert storage.read_bytes(gcs_bucket + "/b.txt") == b"from the test"


def test_the_guard_refuses_remote_addresses_and_allows_loopback():
    fixtures = importlib.import_module("storage_fixtures")  # registered by pytest_plugins
    RemoteNetworkUsed, network_guard = fixtures.RemoteNetworkUsed, fixtures.network_guard

    with network_guard() as attempts:
        with pytest.raises(RemoteNetworkUsed):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
        with socket.socket() as s, pytest.raises(RemoteNetworkUsed):
            s.connect(("10.255.255.1", 80))
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("storage.googleapis.com", 443)
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            socket.create_connection(server.getsockname(), timeout=1).close()  # loopback: allowed
    assert len(attempts) == 3 and "storage.googleapis.com" in attempts[2]


def test_the_guard_fails_a_test_that_reaches_out(pytester):
    folder = os.path.dirname(__file__)
    pytester.makepyfile(
        f"""
        import sys, socket
        sys.path.insert(0, {folder!r})
        from storage_fixtures import no_remote_network

        def test_reaches(no_remote_network):
            try:
                socket.create_connection(("192.0.2.1", 80), timeout=1)
            except OSError:
                pass  # a library that swallows the refusal: the test still fails
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the call passes; its teardown fails it
    result.stdout.fnmatch_lines(["*reached for the network beyond 127.0.0.1*192.0.2.1*"])


# --- sources and images read from object storage ---------------------------------------------------------------


def _image(value: int, fmt: str = "PNG", size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    array = np.full((*size, 3), value, np.uint8)
    array[0, 0] = (255 - value, value // 2, 3)
    Image.fromarray(array).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _rows(source) -> list:
    """Returns (id, label, pixels or error) of every input of a source."""
    from vitnt_jax.data import ImageError

    out = []
    for i, name in enumerate(source.ids):
        try:
            got = source.load(i)
        except ImageError as error:
            got = f"error: {error}"
        out.append((name, None if source.labels is None else source.labels[i], got))
    return out


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    """A fresh bucket URL on each server."""
    return request.getfixturevalue("s3_bucket" if request.param == "s3" else "gcs_bucket")


def test_image_folder_on_object_storage(bucket, tmp_path):
    from vitnt_jax import sources

    s3_bucket = bucket  # either server

    objects = {"faces/a/1.png": _image(10), "faces/b.jpg": _image(20, "JPEG"), "faces/c.webp": _image(30, "WEBP")}
    objects.update({"faces/notes.txt": b"not an image", "faces/bad.png": b"not a png", "other/x.png": _image(1)})
    for key, blob in objects.items():
        storage.write_bytes(f"{s3_bucket}/{key}", blob)
        if key.startswith("faces/"):
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(blob)
    remote = _rows(sources.image_folder(f"{s3_bucket}/faces/"))
    local = _rows(sources.image_folder(tmp_path / "faces"))
    assert [r[0] for r in remote] == ["a/1.png", "b.jpg", "bad.png", "c.webp"] == [r[0] for r in local]
    for (_, _, got), (_, _, want) in zip(remote, local, strict=True):
        if isinstance(want, str):
            assert got == want == "error: not a readable image (no PNG, JPEG or WEBP data)"
        else:
            np.testing.assert_array_equal(got, want)  # the same bytes decode alike, wherever they lie
    assert sources.image_folder(f"{s3_bucket}/faces").ids == [r[0] for r in remote]  # with or without the slash
    with pytest.raises(sources.SourceError, match=r"no PNG, JPEG or WEBP objects under (s3|gs)://t-\w+/empty"):
        sources.image_folder(f"{s3_bucket}/empty/")
    with pytest.raises(sources.SourceError, match="no such bucket"):
        sources.image_folder(bucket.split("://")[0] + "://no-such-bucket-here/faces/")


def test_list_on_object_storage_naming_urls_and_relative_keys(s3_bucket, gcs_bucket, tmp_path):
    from vitnt_jax import sources

    storage.write_bytes(f"{s3_bucket}/img/1.png", _image(1))
    storage.write_bytes(f"{gcs_bucket}/2.png", _image(2))
    (tmp_path / "3.png").write_bytes(_image(3))
    lines = [f"{gcs_bucket}/2.png", os.fspath(tmp_path / "3.png"), f"{s3_bucket}/img/gone.png", f"{s3_bucket}/img"]
    storage.write_bytes(f"{s3_bucket}/list.txt", ("\n".join(lines) + "\n").encode())
    rows = _rows(sources.path_list(f"{s3_bucket}/list.txt"))
    assert [r[0] for r in rows] == lines
    assert rows[0][2][0, 0, 0] == 253 and rows[1][2][0, 0, 0] == 252
    assert rows[2][2] == "error: file not found"  # as a missing local file
    assert rows[3][2] == "error: is a directory, not an image"
    storage.write_bytes(f"{s3_bucket}/rel.txt", b"1.png\nnone.png\n")
    rows = _rows(sources.path_list(f"{s3_bucket}/rel.txt", root=f"{s3_bucket}/img"))
    assert rows[0][2][0, 0, 0] == 254 and rows[1][2] == "error: file not found"
    with pytest.raises(sources.SourceError, match=r"list s3://t-\w+/none\.txt does not exist; check the path\."):
        sources.path_list(f"{s3_bucket}/none.txt")
    with pytest.raises(sources.SourceError, match=r"is a folder; pass a text file"):
        sources.path_list(f"{s3_bucket}/img")
    with pytest.raises(sources.SourceError, match=r"root s3://t-\w+/nothing is not a folder"):
        sources.path_list(f"{s3_bucket}/rel.txt", root=f"{s3_bucket}/nothing")
    storage.write_bytes(f"{s3_bucket}/binary.txt", b"a\0b")
    with pytest.raises(sources.SourceError, match="holds a NUL byte"):
        sources.path_list(f"{s3_bucket}/binary.txt")


def test_bin_pack_on_object_storage(s3_bucket, tmp_path):
    import pickle

    from vitnt_jax import sources

    blobs = [_image(5), _image(6), b"not an image", _image(7)]
    pack = pickle.dumps((blobs, [True, False]), protocol=2)
    storage.write_bytes(f"{s3_bucket}/lfw.bin", pack)
    rows = _rows(sources.insightface_bin(f"{s3_bucket}/lfw.bin"))
    assert [(r[0], r[1]) for r in rows] == [("0", "1"), ("1", "1"), ("2", "0"), ("3", "0")]
    assert rows[2][2].startswith("error: not a readable image") and rows[3][2][0, 0, 0] == 248

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo hostile",))

    storage.write_bytes(f"{s3_bucket}/hostile.bin", pickle.dumps(([b"x"], Boom())))
    with pytest.raises(sources.SourceError, match="is not a plain insightface pack .*could run code"):
        sources.insightface_bin(f"{s3_bucket}/hostile.bin")
    with pytest.raises(sources.SourceError, match=r"lfw2\.bin does not exist; check the path\."):
        sources.insightface_bin(f"{s3_bucket}/lfw2.bin")


def test_a_remote_image_above_the_object_limit_is_an_error_row_unread(s3_bucket, monkeypatch, tmp_path):
    import s3fs

    from vitnt_jax import data

    storage.write_bytes(f"{s3_bucket}/big.png", _image(9, size=(64, 64)))
    opened = []
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", lambda self, path, *a, **k: opened.append(path))
    monkeypatch.setattr(data, "MAX_OBJECT_BYTES", 100)
    with pytest.raises(data.ImageError, match=r"^object of \d+ bytes, above the 100 byte limit, not read$"):
        data.read_image(f"{s3_bucket}/big.png")
    assert opened == []  # refused on its size alone: never opened
    with pytest.raises(storage.StorageError, match=r"holds \d+ bytes, above the 10 byte limit; it is not read\.$"):
        storage.open_read(f"{s3_bucket}/big.png", max_bytes=10)
    local = tmp_path / "big.png"
    local.write_bytes(_image(9, size=(64, 64)))
    with pytest.raises(storage.StorageError, match="above the 10 byte limit"):
        storage.open_read(local, max_bytes=10)
    storage.open_read(local, max_bytes=1000).close()


def test_a_remote_read_that_cannot_reach_the_service_stops_the_run(unreachable_s3):
    from vitnt_jax import data

    with pytest.raises(storage.StorageError, match="cannot reach the storage service"):
        data.read_image("s3://b-x/a.png")  # not an error row: every row would fail alike


def test_webp_decodes_and_keeps_the_limits(tmp_path, monkeypatch):
    from vitnt_jax import data

    lossless = _image(40, "WEBP")
    np.testing.assert_array_equal(data.read_image(lossless), np.asarray(Image.open(io.BytesIO(_image(40)))))
    (tmp_path / "f.webp").write_bytes(lossless)
    assert data.read_image(tmp_path / "f.webp").shape == (8, 8, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(buffer, "WEBP")
    assert data.read_image(buffer.getvalue()).shape == (8, 8, 3)  # alpha dropped
    monkeypatch.setattr(data, "MAX_PIXELS", 63)
    with pytest.raises(data.ImageError, match=r"^image is 8x8 pixels, above the 63 pixel limit$"):
        data.read_image(lossless)
    with pytest.raises(data.ImageError, match=r"^not a PNG, JPEG or WEBP image \(it holds GIF data\)$"):
        data.read_image(_image(1, "GIF"))
    assert ".webp" in data.IMAGE_SUFFIXES and "WEBP" in data.IMAGE_FORMATS


def test_subprocesses_are_guarded_too(storage_env):
    code = "\n".join(
        [
            "import socket",
            "for reach in (lambda: socket.create_connection(('192.0.2.1', 80), 1),",
            "              lambda: socket.getaddrinfo('storage.googleapis.com', 443)):",
            "    try:",
            "        reach()",
            "    except OSError as e:",
            "        print('refused', e)",
        ]
    )
    storage_env.subprocess_attempts()
    done = subprocess.run([sys.executable, "-c", code], env=storage_env.env, capture_output=True, text=True, timeout=60)
    assert done.stdout.count("refused test subprocess reached for a non-loopback address") == 2, done.stderr
    attempts = storage_env.subprocess_attempts()
    assert len(attempts) == 2 and "192.0.2.1" in attempts[0] and "storage.googleapis.com" in attempts[1]
    assert storage_env.subprocess_attempts() == []  # read once


def test_the_scorer_reads_a_prefix_and_writes_its_result_to_object_storage(tiny_checkpoint, s3_bucket, tmp_path):
    import csv

    from vitnt_jax import score

    (tmp_path / "faces").mkdir()
    for i in range(5):
        blob = _image(40 * i, "WEBP" if i == 3 else "PNG", size=(16, 16))
        name = f"{i}.webp" if i == 3 else f"{i}.png"
        storage.write_bytes(f"{s3_bucket}/faces/{name}", blob)
        (tmp_path / "faces" / name).write_bytes(blob)
    storage.write_bytes(f"{s3_bucket}/faces/4.png", b"damaged")
    (tmp_path / "faces" / "4.png").write_bytes(b"damaged")
    common = ["--model", os.fspath(tiny_checkpoint), "--batch-size", "2"]
    assert score.main(["--images", f"{s3_bucket}/faces/", "--out", f"{s3_bucket}/scores.csv", *common]) == 0
    assert score.main(["--images", os.fspath(tmp_path / "faces"), "--out", os.fspath(tmp_path / "s.csv"), *common]) == 0
    remote = list(csv.reader(io.StringIO(storage.read_bytes(f"{s3_bucket}/scores.csv").decode())))
    local = list(csv.reader(open(tmp_path / "s.csv", newline="")))
    assert [r[0] for r in remote] == [r[0] for r in local] and len(remote) == 6  # header + 5 rows
    assert [r[-1] for r in remote] == [r[-1] for r in local]  # error column exact
    assert remote[5][0] == "4.png" and "no PNG, JPEG or WEBP data" in remote[5][-1] and remote[4][0] == "3.webp"
    for a, b in zip(remote[1:], local[1:], strict=True):
        if a[1]:
            np.testing.assert_allclose(float(a[1]), float(b[1]), rtol=1e-6)


def test_the_scorer_stops_with_one_line_when_storage_cannot_be_reached(tiny_checkpoint, unreachable_s3, capsys):
    from vitnt_jax import score

    argv = ["--images", "s3://b-x/faces/", "--model", os.fspath(tiny_checkpoint), "--out", "s3://b-x/s.csv"]
    assert score.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the storage service" in err[0], err
