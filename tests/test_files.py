"""The shared file-kind helper: every module names a special file alike and never waits on one."""

import os
import socket

import pytest

from vitnt_jax import files

from helpers import returns_within


def test_kinds_are_named_and_a_regular_file_has_none(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    os.mkfifo(tmp_path / "p")
    (tmp_path / "link").symlink_to(tmp_path / "p")
    assert files.file_kind(tmp_path / "f") is None and files.file_kind(tmp_path / "missing") is None
    assert files.file_kind(tmp_path) == "a folder"
    assert files.file_kind(tmp_path / "p") == "a named pipe (FIFO)" == files.file_kind(tmp_path / "link")
    assert files.file_kind(tmp_path / "link", follow=False) == "a symbolic link"
    assert files.file_kind("/dev/null") == "a character device"


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDWR])
def test_open_regular_refuses_a_fifo_a_socket_and_a_device_at_once(tmp_path, flags):
    os.mkfifo(tmp_path / "p")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    try:
        for path, kind in ((tmp_path / "p", "a named pipe (FIFO)"), (tmp_path / "s", "a socket"), ("/dev/null", None)):
            got = returns_within(2, lambda path=path: files.open_regular(path, flags))
            assert got is not None, f"opening {path} blocked"
            assert got[0] == "error" and isinstance(got[1], files.NotRegularFileError), got
            assert got[1].kind == (kind or "a character device")
            assert str(got[1]) == f"it is {got[1].kind}, not a regular file"
    finally:
        server.close()


def test_open_regular_gives_a_blocking_descriptor_of_a_regular_file(tmp_path):
    fd = files.open_regular(tmp_path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert os.get_blocking(fd) and os.write(fd, b"abc") == 3
    finally:
        os.close(fd)
    with open(files.open_regular(tmp_path / "new"), "rb") as f:
        assert f.read() == b"abc"
