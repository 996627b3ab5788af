"""Object storage attacked: odd schemes and URLs, odd keys, hostile or failing endpoints, writes cut short."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vitnt_jax import data, sources, storage

pytest_plugins = ["storage_fixtures"]


def _png(value: int = 7) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# --- schemes and URL forms ------------------------------------------------------------------------------------

REFUSED = [
    "http://169.254.169.254/latest/meta-data/iam/x.png",  # an instance's metadata server, named by a list line
    "https://example.com/x.png",
    "ftp://example.com/x.png",
    "memory://x/y.png",  # another program's (or a test's) in-process state
    "zip://a.png::file:///tmp/a.zip",  # a remote-looking name reading a local archive
    "simplecache://b/x.png",
    "blockcache://b/x.png",
    "data://x",
    "s3://bucket/a::b.png",  # fsspec would read this key as a chain of two locations
    "gs://bucket/x.png::s3://other/y",
]


@pytest.mark.parametrize("url", REFUSED)
def test_urls_of_other_schemes_and_chains_are_refused_without_a_request(url, no_remote_network):
    import fsspec

    for action in (
        storage.read_bytes,
        lambda u: storage.write_bytes(u, b"x"),
        storage.size,
        storage.find_names,
        storage.glob,
        storage.exists,
    ):
        with pytest.raises(storage.StorageError, match=r"(which is not read or written here|chains locations)") as e:
            action(url)
        assert e.value.kind == "scheme" and str(e.value).endswith(".") and "\n" not in str(e.value)
    assert not fsspec.filesystem("memory").store  # nothing was written to fsspec's memory store either
    with pytest.raises(data.ImageError, match=r"^not read: .*(not read or written here|chains locations)"):
        data.read_image(url)  # as a list line: that row's error, not a stopped run


def test_a_scheme_in_capitals_is_the_same_scheme(s3_bucket):
    storage.write_bytes(s3_bucket + "/a.png", _png(5))
    upper = "S3" + s3_bucket[2:] + "/a.png"
    assert storage.read_bytes(upper) == _png(5) and data.read_image(upper)[0, 0, 0] == 5  # fsspec: "not known"


def test_a_local_name_holding_a_double_colon_stays_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "simplecache::x.png").write_bytes(_png())
    assert not storage.is_url("simplecache::x.png")
    assert data.read_image("simplecache::x.png").shape == (4, 4, 3)


def test_file_urls_name_local_absolute_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(_png(9))
    assert storage.local_path(f"file://{tmp_path}/sub/a.png") == f"{tmp_path}/sub/a.png"
    assert storage.local_path(f"file://localhost{tmp_path}/sub/a.png") == f"{tmp_path}/sub/a.png"
    assert data.read_image(f"file://{tmp_path}/sub/../sub/a.png")[0, 0, 0] == 9  # '..' as in any local path
    for url in ("file://sub/a.png", "file://fileserver/share/a.png"):  # fsspec would read the first in the cwd
        with pytest.raises(storage.StorageError, match=r"names the host '\w+', and only local files .*three slashes"):
            storage.read_bytes(url)
        with pytest.raises(data.ImageError, match="^not read: .*names the host"):
            data.read_image(url)
    with pytest.raises(storage.StorageError, match="names the host"):  # a UserError: one line
        sources.image_folder("file://sub")


def test_a_list_on_object_storage_may_name_other_buckets_but_not_other_schemes(s3_bucket, gcs_bucket, tmp_path):
    storage.write_bytes(f"{gcs_bucket}/g.png", _png(3))
    (tmp_path / "l.png").write_bytes(_png(4))
    lines = [f"{gcs_bucket}/g.png", f"file://{tmp_path}/l.png", "http://169.254.169.254/x.png", "memory://m.png"]
    storage.write_bytes(f"{s3_bucket}/list.txt", "\n".join(lines).encode())
    source = sources.path_list(f"{s3_bucket}/list.txt")
    assert source.load(0)[0, 0, 0] == 3 and source.load(1)[0, 0, 0] == 4
    for i in (2, 3):
        with pytest.raises(data.ImageError, match="which is not read or written here"):
            source.load(i)


# --- odd keys --------------------------------------------------------------------------------------------------

ODD_KEYS = [
    "with space.png",
    "per%2Fcent.png",
    "question?mark.png",
    "hash#tag.png",
    "ünï/cödé 顔.png",
    "semi;colon+plus=eq&amp.png",
    "d" * 200 + "/" + "k" * 700 + ".png",  # 905 bytes: S3 allows 1024
]


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    return request.getfixturevalue("s3_bucket" if request.param == "s3" else "gcs_bucket")


def test_odd_keys_are_listed_and_read_back_as_written(bucket):
    keys = ODD_KEYS if bucket.startswith("s3") else [k for k in ODD_KEYS if ";" not in k]  # the emulator's urlparse
    for i, key in enumerate(keys):
        storage.write_bytes(f"{bucket}/faces/{key}", _png(i))
    fs, inner = storage._fs(bucket)
    if bucket.startswith("s3"):  # a "folder" marker named like an image (s3fs would strip a path's last slash)
        fs.call_s3("put_object", Bucket=inner, Key="faces/a-folder.png/", Body=b"")
    else:
        storage.write_bytes(f"{bucket}/faces/a-folder.png/", b"")
    source = sources.image_folder(f"{bucket}/faces/")
    assert source.ids == sorted(keys)  # the marker is no row (s3fs lists it as a file named a-folder.png)
    for i, key in enumerate(keys):
        assert source.load(source.ids.index(key))[0, 0, 0] == i, key
        assert storage.size(f"{bucket}/faces/{key}") == len(_png(i))


def test_a_prefix_is_listed_page_by_page_into_one_sorted_list(bucket, monkeypatch):
    monkeypatch.setattr(storage, "_PAGE", 2)  # five keys: three pages, each asked with the last one's token
    keys = ["b/2.png", "a.png", "b/1.png", "c.png", "b/10.png"]
    for key in keys:
        storage.write_bytes(f"{bucket}/p/{key}", b"x")
    storage.write_bytes(f"{bucket}/pq.png", b"x")  # a sibling whose name starts like the prefix: not under it
    assert storage.find_names(f"{bucket}/p") == sorted(keys)
    assert storage.find_names(bucket) == sorted([f"p/{k}" for k in keys] + ["pq.png"])


def test_keys_that_look_like_relative_paths_read_their_own_object(s3_bucket):
    fs, inner = storage._fs(s3_bucket)
    keys = ["faces//a.png", "faces/./b.png", "faces/../c.png", "faces/d.png", "faces/c.png"]
    for i, key in enumerate(keys):
        fs.call_s3("put_object", Bucket=inner, Key=key, Body=_png(i))  # S3 keeps keys as written: no normalizing
    source = sources.image_folder(f"{s3_bucket}/faces/")
    assert source.ids == ["../c.png", "./b.png", "/a.png", "c.png", "d.png"]
    assert [int(source.load(j)[0, 0, 0]) for j in range(5)] == [2, 1, 0, 4, 3]  # never another key's object


# --- failing endpoints -----------------------------------------------------------------------------------------


def test_credentials_expiring_mid_run_stop_the_run_instead_of_making_error_rows(scripted_s3):
    scripted_s3.objects.update({f"bkt/{c}.png": _png(i) for i, c in enumerate("abc")})
    assert data.read_image("s3://bkt/a.png")[0, 0, 0] == 0
    # A session token expired: S3 answers HEAD with a bare 400 (no body), GET with ExpiredToken.
    scripted_s3.fail = lambda method, key, n: (400, "ExpiredToken")
    with pytest.raises(storage.StorageError, match=r"^the storage service refused the credentials to read") as e:
        data.read_image("s3://bkt/b.png")
    assert e.value.kind == "credentials" and "--resume continues" in str(e.value)
    # A key that is no longer valid: 403 on HEAD (no body), InvalidAccessKeyId on the GET asked to tell why.
    scripted_s3.fail = lambda method, key, n: (403, "InvalidAccessKeyId")
    with pytest.raises(storage.StorageError, match=r"refused the credentials .*\(InvalidAccessKeyId\)"):
        data.read_image("s3://bkt/b.png")
    # One object this key may not read: that row's error, and the next object reads.
    scripted_s3.fail = lambda method, key, n: (403, "AccessDenied") if key == "bkt/b.png" else None
    with pytest.raises(data.ImageError, match="^permission denied$"):
        data.read_image("s3://bkt/b.png")
    assert data.read_image("s3://bkt/c.png")[0, 0, 0] == 2


def test_throttling_is_retried_a_bounded_number_of_times_then_stops_the_run(scripted_s3):
    scripted_s3.objects["bkt/a.png"] = _png()
    scripted_s3.fail = lambda method, key, n: (503, "SlowDown") if n <= 2 else None
    assert data.read_image("s3://bkt/a.png").shape == (4, 4, 3)  # two refusals: retried, then read
    scripted_s3.requests.clear()
    scripted_s3.fail = lambda method, key, n: (503, "SlowDown")
    with pytest.raises(storage.StorageError, match=r"^the storage service kept failing to read .*throttling") as e:
        data.read_image("s3://bkt/a.png")  # not an error row: a rerun with --resume reads it again
    assert e.value.kind == "busy"
    # botocore's 3 attempts inside s3fs's S3_RETRIES tries, for the metadata request (and no more).
    assert len(scripted_s3.requests) <= 3 * storage.S3_RETRIES, scripted_s3.requests


def test_an_s3_endpoint_that_never_answers_fails_in_bounded_time(scripted_s3, monkeypatch):
    monkeypatch.setitem(storage.S3_CONFIG, "read_timeout", 0.5)
    scripted_s3.objects["bkt/a.png"] = _png()
    scripted_s3.fail = lambda method, key, n: "hang"
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"^cannot reach the storage service for s3://bkt/a\.png") as e:
        data.read_image("s3://bkt/a.png")
    elapsed = time.monotonic() - start
    # s3fs's own 5 tries around botocore's 3 made it 30 requests of read_timeout each (40 s with 1 s).
    assert e.value.kind == "unreachable" and elapsed < 30, elapsed
    assert len(scripted_s3.requests) <= 3 * storage.S3_RETRIES * 2, scripted_s3.requests


def test_a_gcs_endpoint_that_never_answers_fails_in_bounded_time(storage_env, no_remote_network, monkeypatch):
    import asyncio
    import types

    import gcsfs.retry

    fixtures = sys.modules["storage_fixtures"]
    real_sleep = asyncio.sleep
    # gcsfs backs off about 30 s over its 6 tries, which it lets no caller change: not waited for here.
    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=lambda seconds: real_sleep(0)))
    monkeypatch.setitem(storage.GCS_TIMEOUT, "sock_read", 1)
    outcome = []
    with fixtures.silent_server() as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        fixtures.clear_instance_caches()

        def read() -> None:
            try:
                storage.read_bytes("gs://bkt/a.png")
            except storage.StorageError as error:
                outcome.append(error)

        thread = threading.Thread(target=read, daemon=True)
        start = time.monotonic()
        thread.start()
        thread.join(60)  # gcsfs sent its requests with no timeout at all: this waited forever
        elapsed = time.monotonic() - start
    fixtures.clear_instance_caches()
    assert not thread.is_alive() and outcome, f"still waiting after {elapsed:.0f} s"
    assert outcome[0].kind == "unreachable" and "cannot reach the storage service for gs://bkt/a.png" in str(outcome[0])
    assert elapsed < 30, elapsed


# --- writes cut short ------------------------------------------------------------------------------------------

_KILLED_UPLOAD = """
import os, signal, sys
from vitnt_jax import storage
with storage.open_write(sys.argv[1]) as f:
    f.write(os.urandom(51 << 20))  # past s3fs's 50 MiB block: a multipart upload begins, its first part is sent
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_upload_killed_mid_way_leaves_no_object_only_an_unfinished_upload(s3_bucket, storage_env):
    import fsspec

    path = f"{s3_bucket}/big.csv"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_UPLOAD, path], env=storage_env.env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not storage.exists(path) and storage.find_names(s3_bucket) == []  # invisible to every reader
    uploads = fsspec.filesystem("s3", use_listings_cache=False).list_multipart_uploads(s3_bucket[5:])
    assert [u["Key"] for u in uploads] == ["big.csv"]  # its parts stay stored until aborted (a lifecycle rule)


def test_a_local_output_folder_replaced_by_a_link_while_writing_is_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    with pytest.raises(storage.StorageError, match=r"its folder was replaced while it was written") as e:
        with storage.open_write(out / "scores.csv") as f:
            f.write(b"rows")
            out.rename(tmp_path / "moved")
            out.symlink_to(elsewhere)
    assert e.value.kind == "link"
    assert os.listdir(elsewhere) == [] and os.listdir(tmp_path / "moved") == []  # nothing written, no temporary


def test_a_local_output_folder_that_is_a_link_is_written_in_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")  # the user's own choice of folder: only the file is checked
    storage.write_bytes(tmp_path / "out" / "scores.csv", b"rows")
    assert (tmp_path / "real" / "scores.csv").read_bytes() == b"rows"


# --- WEBP ------------------------------------------------------------------------------------------------------


def test_webp_animations_and_claimed_canvases_cost_no_more_than_one_frame(monkeypatch):
    frames = [Image.fromarray(np.full((8, 8, 3), i % 250, np.uint8)) for i in range(5000)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=1)
    animated = bytearray(buffer.getvalue())
    start = time.monotonic()
    assert data.read_image(bytes(animated))[0, 0, 0] == 0  # the first frame only
    assert time.monotonic() - start < 2
    assert animated[12:16] == b"VP8X"  # the canvas size: 24-bit width - 1 and height - 1 at bytes 24..29
    animated[24:27] = (16383).to_bytes(3, "little")
    animated[27:30] = (16383).to_bytes(3, "little")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who turned PIL's own guard off
    with pytest.raises(data.ImageError, match=r"^image is 16384x16384 pixels, above the 64000000 pixel limit$"):
        data.read_image(bytes(animated))


# --- the fixtures' own guard -----------------------------------------------------------------------------------


def test_a_subprocess_gets_every_probe_switch_and_no_credential_lookup_elsewhere(storage_env, monkeypatch):
    import json

    fixtures = sys.modules["storage_fixtures"]
    # An operator's shell: a profile, a container's credential endpoint (botocore would ask 169.254.170.2 once the
    # dummy keys are gone), a web identity (an STS call), a proxy.
    monkeypatch.setenv("AWS_PROFILE", "production")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://169.254.170.2/v2/credentials")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    code = (
        "import json, os, socket; print(json.dumps({'env': dict(os.environ), "
        "'guarded': socket.socket.connect.__module__ == 'sitecustomize'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=storage_env.env, capture_output=True, timeout=60, text=True)
    child = json.loads(done.stdout)
    assert child["guarded"], done.stderr
    assert not set(fixtures.UNSET) & set(child["env"])
    probes = ("AWS_EC2_METADATA_DISABLED", "GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT", "NO_GCE_CHECK")
    for key in (*probes, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        assert child["env"][key] == storage_env.variables[key], key


def test_only_answers_that_say_so_stop_the_run():
    import errno

    from gcsfs.retry import HttpError

    expired = storage._translate(HttpError({"code": 401, "message": "Invalid Credentials"}), "gs://b/x", "read")
    assert expired.kind == "credentials" and "(401)" in str(expired)
    busy = storage._translate(HttpError({"code": 503, "message": "Backend Error"}), "gs://b/x", "read")
    assert busy.kind == "busy"
    # A GCS 400 names a bad request (an odd object name), not credentials: that row's error.
    assert storage._translate(HttpError({"code": 400, "message": "Bad"}), "gs://b/x", "read").kind == "other"
    # A local file system's EBUSY is no storage service's throttling.
    local = storage._translate(OSError(errno.EBUSY, "Device or resource busy"), "/mnt/x.csv", "write")
    assert local.kind == "other" and "throttling" not in str(local)


def test_a_remote_pack_claiming_a_huge_item_is_refused_unallocated(s3_bucket):
    import pickle

    claim = pickle.PROTO + b"\x04" + pickle.BINBYTES8 + (1 << 40).to_bytes(8, "little") + b"x" * 64
    storage.write_bytes(f"{s3_bucket}/claim.bin", claim)
    with pytest.raises(sources.SourceError, match=r"claim\.bin is unreadable \(UnpicklingError\); it is truncated"):
        sources.insightface_bin(f"{s3_bucket}/claim.bin")  # bounded by the object's size: no 1 TB allocation
