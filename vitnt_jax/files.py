"""What a path is, for refusing anything but a regular file without ever waiting on it (a FIFO, a device).

Shared by every module that reads or writes a file a user names, so that each refusal calls the thing the same.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


class NotRegularFileError(OSError):
    """A path that is something other than a regular file (`kind` says what); its str is 'it is <kind>, ...'."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"it is {kind}, not a regular file")
        self.path, self.kind = os.fspath(path), kind


def kind(mode: int) -> str | None:
    """Returns what a file of this st_mode is ('a named pipe (FIFO)', 'a folder', ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def file_kind(path: str | os.PathLike, follow: bool = True) -> str | None:
    """Returns `kind` of what is at `path`, None for a regular file or nothing there (follow: False, lstat)."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except (OSError, ValueError):
        return None
    return kind(mode)


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """Returns a descriptor of `path` opened with `flags`, in blocking mode; NotRegularFileError for anything else.

    Opened non-blocking and checked on the open descriptor, so a FIFO (or one put in the file's place meanwhile)
    is refused at once, never waited on, and a device never read or written. Other failures raise as os.open.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), mode)
    except OSError as error:
        # A FIFO nobody reads, opened for writing, fails with ENXIO (a socket too); a folder with EISDIR.
        if error.errno in (errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP, errno.ENODEV):
            found = file_kind(path, follow=not flags & getattr(os, "O_NOFOLLOW", 0))
            if found is not None:
                raise NotRegularFileError(path, found) from None
        raise
    try:
        found = kind(os.fstat(fd).st_mode)
        if found is not None:
            raise NotRegularFileError(path, found)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
