"""insightface verification packs (`lfw.bin`, `agedb_30.bin`, ...): the one reader every command uses.

A pack is a pickle of (list of encoded images, list of issame flags): image 2k and 2k+1 form pair
k. It is read with a restricted unpickler that looks up no class at all, except the one function
Python 3 uses to write bytes at pickle protocol 2 (`_codecs.encode` of latin-1 text), so a crafted
file cannot run code and a pack written at any protocol (0 to 5, by Python 2 or 3) is read alike.

A pack also costs memory and time in proportion to its file, or is refused before anything is
copied: only the opcodes that build lists, tuples, bytes, strings, numbers and that one call run
(no dict or set, whose crafted keys could collide); every read is checked against the bytes the
file still holds (a claimed 2**60-byte string is no allocation); the latin-1 call may produce at
most as many bytes as the file holds; instructions number at most one per 16 bytes of file;
and the images together must not hold more bytes than the file (one image referenced 20,000
times through the pickle memo is refused, not copied 20,000 times).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from vitnt_jax import storage
from vitnt_jax.errors import UserError

# Opcodes a pack may use: plain containers, bytes, strings, numbers, the memo, and GLOBAL + REDUCE for the one
# call find_class allows. Anything else (dicts, sets, BUILD, INST, OBJ, NEWOBJ, EXT, PERSID, buffers) is refused.
_ALLOWED_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 UNICODE "
    "BINUNICODE SHORT_BINUNICODE BINUNICODE8 EMPTY_LIST LIST APPEND APPENDS EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 "
    "TUPLE3 GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL REDUCE".split()
)
# Containers no pack holds, refused as foreign (their crafted keys could also collide, costing quadratic time).
_FOREIGN_OPCODES = {
    **dict.fromkeys(("EMPTY_DICT", "DICT", "SETITEM", "SETITEMS"), "dict"),
    **dict.fromkeys(("EMPTY_SET", "ADDITEMS", "FROZENSET"), "set"),
}
# Every instruction is counted: a one-byte one can keep tens of bytes (a list, a tuple, a memo entry: 2 MB of
# MEMOIZE kept 165 MB), so a pack may hold one per BYTES_PER_INSTRUCTION bytes of file. An insightface pack holds
# about three per image (the bytes, a memo entry, an append), each image kilobytes long.
BYTES_PER_INSTRUCTION = 16
_SPARE_INSTRUCTIONS = 4096  # a tiny pack (a test's, of one-byte images) still holds its lists, flags and memo entries


class PackError(UserError):
    """A .bin pack that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Pack:
    """The content of a pack: `images[i]` encoded bytes; `issame[k]` for pair (2k, 2k+1), or None.

    issame is None when the pack's flags do not form one flag per pair of images.
    """

    images: tuple[bytes, ...]
    issame: tuple[bool, ...] | None


class _Refused(pickle.UnpicklingError):
    """The pack asked for a Python object we do not load."""


class _Foreign(pickle.UnpicklingError):
    """The pack holds a container no insightface pack holds."""


class _Bomb(pickle.UnpicklingError):
    """The pack would cost more memory or time than its size accounts for."""


class _Bounded:
    """A file whose reads may not ask for more bytes than it still holds (no allocation a header merely claims)."""

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        if n > left:
            raise pickle.UnpicklingError(f"pickle data was truncated (an item of {n} bytes, {left} left)")
        return self._f.read(n)

    def readline(self) -> bytes:
        return self._f.readline()


def _refuse_opcode(name: str):
    def refuse(self):
        if name in _FOREIGN_OPCODES:
            raise _Foreign(f"it holds a {_FOREIGN_OPCODES[name]}")
        raise _Refused(f"it uses the pickle opcode {name}")

    return refuse


def _counted(load):
    def count(self):
        self._instructions += 1
        if self._instructions > self._max_instructions:
            raise _Bomb(
                f"it holds more than {self._max_instructions} pickle instructions (lists, tuples, memo entries, "
                "...), more than a pack of its size holds"
            )
        load(self)

    return count


def _dispatch() -> dict:
    """Returns the pure-Python unpickler's opcode table, restricted to _ALLOWED_OPCODES."""
    names = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
    table = {}
    for code, load in pickle._Unpickler.dispatch.items():
        name = names.get(code, repr(bytes([code])))
        if name not in _ALLOWED_OPCODES:
            table[code] = _refuse_opcode(name)
        else:
            table[code] = _counted(load)
    return table


class _PackUnpickler(pickle._Unpickler):
    """Builds only plain containers, bytes, strings, bools and numbers: no class is ever looked up.

    The pure-Python unpickler, so that each opcode can be allowed or refused and accounted for (the C one
    also sizes its memo by the largest index a file names: a 10-byte file can ask for gigabytes).
    """

    dispatch = _dispatch()

    def __init__(self, f, size: int):
        super().__init__(_Bounded(f, size), encoding="bytes")
        self._budget = size  # bytes the latin-1 call may still produce
        self._instructions = 0
        self._max_instructions = _SPARE_INSTRUCTIONS + size // BYTES_PER_INSTRUCTION

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 at protocol 2
            return self._latin1_bytes
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):  # b"" at protocol 2
            return _empty_bytes
        raise _Refused(f"it asks for {module}.{name}")

    def _latin1_bytes(self, text, encoding="utf-8", *rest):
        """Returns the bytes Python 3 pickles at protocol 2 as `_codecs.encode(text, 'latin1')`: no other codec runs."""
        if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and not rest):
            raise _Refused(f"it asks for _codecs.encode with {type(text).__name__} and codec {encoding!r}")
        self._budget -= len(text)
        if self._budget < 0:  # one memo'd string encoded again and again
            raise _Bomb("its strings encode to more bytes than the file holds")
        return text.encode("latin-1")

    def load_bytearray8(self):
        # The stock loader allocates the claimed size before reading it: read first (bounded), then copy.
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _counted(load_bytearray8)


def _empty_bytes(*args):
    if args:
        raise _Refused("it asks for builtins.bytes with arguments")
    return b""


def _read_remote(url: str) -> tuple[object, int]:
    """Returns (unpickled content, size) of a pack on object storage, under the restricted unpickler's limits."""
    with storage.open_read(url) as f:  # one metadata request: the size the unpickler is bounded by is the one read
        size = int(f.size)
        return _PackUnpickler(f, size).load(), size


def read_bin(path: str | Path) -> Pack:
    """Returns the images and issame flags of a pack; raises PackError (field 'bin') for any other file."""
    remote = storage.is_url(path) and storage.protocol(path) != "file"
    path = path if remote else Path(storage.local_path(path))

    def fail(reason: str) -> PackError:
        return PackError("{bin} " + f"{path} {reason}", field="bin")

    try:
        if remote:  # read through storage (gs://, s3://, ...): one object, unpickled under the same limits
            content, size = _read_remote(path)
        elif stat.S_ISDIR(os.stat(path).st_mode):
            raise IsADirectoryError(path)
        else:
            # Non-blocking, then checked: a FIFO or a device given as the pack is refused, never waited on.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
            with open(fd, "rb") as f:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise fail("is not a regular file (a pipe or a device); pass the .bin file itself.")
                os.set_blocking(fd, True)
                content = _PackUnpickler(f, info.st_size).load()
                size = info.st_size
    except PackError:
        raise
    except storage.StorageError as error:
        if error.kind == "missing":
            raise fail("does not exist; check the path.") from error
        if error.kind == "folder":
            raise fail("is a folder; pass the .bin file itself.") from error
        raise PackError("{bin}: " + str(error), field="bin") from error
    except FileNotFoundError as error:
        raise fail("does not exist; check the path.") from error
    except IsADirectoryError as error:
        raise fail("is a folder; pass the .bin file itself.") from error
    except PermissionError as error:
        raise fail("cannot be read (permission denied); check its permissions.") from error
    except _Refused as error:
        raise fail(
            f"is not a plain insightface pack ({error}); refusing it, since loading it could run code."
        ) from error
    except _Foreign as error:
        raise fail(f"is not a (images, issame) pair ({error}); it is not an insightface .bin pack.") from error
    except _Bomb as error:
        raise fail(
            f"is refused: {error} (a crafted pack that would exhaust memory or time); it is no insightface pack."
        ) from error
    except MemoryError:
        raise
    except OSError as error:  # a path too long, a link loop, an I/O error: not the pack's content
        raise fail(f"cannot be read ({error.strerror or error}); check the path and the disk.") from error
    except Exception as error:  # any other failure to parse means a damaged or foreign file
        raise fail(f"is unreadable ({type(error).__name__}); it is truncated or not a .bin pack.") from error
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise fail("is not a (images, issame) pair; it is not an insightface .bin pack.")
    images, issame = content
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise fail("does not hold a list of encoded images; it is not an insightface .bin pack.")
    if not images:
        raise fail("holds no images.")
    total = sum(len(b) for b in images)
    if total > size:  # checked before anything is copied
        raise fail(
            f"is refused: its images hold {total} bytes, more than the {size} bytes of the file (it repeats "
            "images by reference, which no insightface pack does); rebuild the pack with one copy of each image."
        )
    flags = list(issame) if isinstance(issame, (list, tuple)) else []
    paired = flags and len(flags) * 2 == len(images) and all(isinstance(x, (bool, int)) for x in flags)
    return Pack(tuple(bytes(b) for b in images), tuple(bool(x) for x in flags) if paired else None)
