"""insightface verification packs (`lfw.bin`, `agedb_30.bin`, ...): the one reader every command uses.

A pack is a pickle of (list of encoded images, list of issame flags): image 2k and 2k+1 form pair
k. It is read with a restricted unpickler that looks up no class at all, except the one function
Python 3 uses to write bytes at pickle protocol 2 (`_codecs.encode` of latin-1 text), so a crafted
file cannot run code and a pack written at any protocol (0 to 5, by Python 2 or 3) is read alike.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from vitnt_jax.errors import UserError


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


class _PackUnpickler(pickle.Unpickler):
    """Builds only plain containers, bytes, strings, bools and numbers: no class is ever looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 at protocol 2
            return _latin1_bytes
        raise _Refused(f"it asks for {module}.{name}")


def _latin1_bytes(text, encoding="utf-8", *rest):
    """Returns the bytes Python 3 pickles at protocol 2 as `_codecs.encode(text, 'latin1')`: no other codec runs."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and not rest):
        raise _Refused(f"it asks for _codecs.encode with {type(text).__name__} and codec {encoding!r}")
    return text.encode("latin-1")


def read_bin(path: str | Path) -> Pack:
    """Returns the images and issame flags of a pack; raises PackError (field 'bin') for any other file."""
    path = Path(path)

    def fail(reason: str) -> PackError:
        return PackError("{bin} " + f"{path} {reason}", field="bin")

    try:
        with open(path, "rb") as f:
            content = _PackUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as error:
        raise fail("does not exist; check the path.") from error
    except IsADirectoryError as error:
        raise fail("is a folder; pass the .bin file itself.") from error
    except _Refused as error:
        raise fail(
            f"is not a plain insightface pack ({error}); refusing it, since loading it could run code."
        ) from error
    except Exception as error:  # any other failure to parse means a damaged or foreign file
        raise fail(f"is unreadable ({type(error).__name__}); it is truncated or not a .bin pack.") from error
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise fail("is not a (images, issame) pair; it is not an insightface .bin pack.")
    images, issame = content
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise fail("does not hold a list of encoded images; it is not an insightface .bin pack.")
    if not images:
        raise fail("holds no images.")
    flags = list(issame) if isinstance(issame, (list, tuple)) else []
    paired = flags and len(flags) * 2 == len(images) and all(isinstance(x, (bool, int)) for x in flags)
    return Pack(tuple(bytes(b) for b in images), tuple(bool(x) for x in flags) if paired else None)
