"""Where faces come from: an image folder, a path list, an insightface .bin pack or TFDS.

Every source is a random-access sequence: `ids[i]`, `labels[i]` (or None) and `load(i)` -> the
decoded (H, W, 3) uint8 array, raising `ImageError` for an unusable image. Ids are unique.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitnt_jax.data import IMAGE_SUFFIXES, ImageError, read_image


class SourceError(Exception):
    """A source that cannot be opened; the message names the problem and the fix."""


@dataclass
class Source:
    """A random-access face source. `color`/`align`: defaults for what its images hold.

    align: 'none' (aligned faces), 'center' (fixed face box) or 'mtcnn' (detect and align).
    """

    name: str
    ids: list[str]
    labels: list[str] | None
    loader: Any  # callable index -> np.ndarray
    color: str = "rgb"
    align: str = "none"
    problems: list[str] = field(default_factory=list)  # inputs that could not even be listed

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> np.ndarray:
        return self.loader(index)


def _check_unique(ids: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in seen:
            raise SourceError(f"{what} lists {x!r} twice (entries {seen[x] + 1} and {i + 1}); remove the duplicate.")
        seen[x] = i


def image_folder(root: str | Path) -> Source:
    """Returns every PNG/JPEG under `root` (recursive, following folder links); id = relative path.

    Ids are sorted. A sub-folder that cannot be listed is reported in `problems`, not skipped
    silently; a folder link that leads back into the tree is visited once.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"--images {root} is not a folder; pass the folder that holds the face images.")
    problems: list[str] = []
    found: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        problems.append(f"cannot list folder {error.filename} ({error.strerror}); its images are not scored")

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen:  # a link cycle: this folder was listed already
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    if not found:
        extra = f" ({problems[0]})" if problems else ""
        raise SourceError(f"no PNG or JPEG files under {root}{extra}; point --images at a folder of face images.")
    paths = [p for _, p in found]
    return Source(f"folder {root}", [i for i, _ in found], None, lambda i: read_image(paths[i]), problems=problems)


def path_list(list_file: str | Path, root: str | Path | None = None) -> Source:
    """Returns the images named one per line in `list_file` (the authors' image_path_list.txt).

    id = the line as written (without its newline); the path is `root / line` when root is given.
    Blank lines are skipped.
    """
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first path
    except FileNotFoundError:
        raise SourceError(f"--list {list_file} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(
            f"cannot read --list {list_file} ({error}); it must be UTF-8 text, one path per line."
        ) from None
    ids = [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]
    if not ids:
        raise SourceError(f"--list {list_file} names no images; write one image path per line.")
    _check_unique(ids, f"--list {list_file}")
    base = Path(root) if root is not None else None
    if base is not None and not base.is_dir():
        raise SourceError(f"--root {base} is not a folder; pass the folder the listed paths are relative to.")
    paths = [base / i if base is not None else Path(i) for i in ids]
    return Source(f"list {list_file}", ids, None, lambda i: read_image(paths[i]))


class _Refused(pickle.UnpicklingError):
    """The pack asked for a Python object we do not load."""


class _PackUnpickler(pickle.Unpickler):
    """Reads only plain containers, bytes, strings, bools and numbers: no class is ever looked up."""

    # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(latin-1 text); nothing else.
    _ALLOWED = {("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            import _codecs

            return _codecs.encode
        raise _Refused(f"it asks for {module}.{name}")


def insightface_bin(path: str | Path) -> Source:
    """Returns the images of an insightface verification pack (`lfw.bin`, `agedb_30.bin`, ...).

    The pack is a pickle of (list of encoded images, list of issame flags): image 2k and 2k+1 form
    pair k. It is read with a restricted unpickler, so a crafted file cannot run code.
    id = the image's position in the pack; label = its pair's issame flag (1 or 0).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            content = _PackUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise SourceError(f"--bin {path} does not exist; check the path.") from None
    except _Refused as error:
        raise SourceError(
            f"--bin {path} is not a plain insightface pack ({error}); refusing it, since loading it could run code."
        ) from None
    except IsADirectoryError:
        raise SourceError(f"--bin {path} is a folder; pass the .bin file itself.") from None
    except Exception as error:  # any other failure to parse means a damaged or foreign file
        raise SourceError(
            f"--bin {path} is unreadable ({type(error).__name__}); it is truncated or not a .bin pack."
        ) from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise SourceError(f"--bin {path} is not a (images, issame) pair; it is not an insightface .bin pack.")
    images, issame = content
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise SourceError(f"--bin {path} does not hold a list of encoded images; it is not an insightface .bin pack.")
    if not images:
        raise SourceError(f"--bin {path} holds no images.")
    flags = list(issame) if isinstance(issame, (list, tuple)) else []
    labels = None
    if len(flags) * 2 == len(images) and all(isinstance(f, (bool, int)) for f in flags):
        labels = [str(int(flags[i // 2])) for i in range(len(images))]
    blobs = [bytes(b) for b in images]
    return Source(f"pack {path}", [str(i) for i in range(len(images))], labels, lambda i: read_image(blobs[i]))


def tfds_source(
    spec: str,
    data_dir: str | None = None,
    image_key: str = "image",
    id_key: str | None = None,
    label_key: str | None = "label",
    prepare: bool = True,
) -> Source:
    """Returns a TFDS dataset read through `tfds.data_source` (ArrayRecord; no TensorFlow).

    spec: NAME or NAME:SPLIT (default split 'train'). id = the example's `id_key` feature, or
    NAME/SPLIT/INDEX. label = the `label_key` feature when the dataset has it. A dataset that is
    not prepared yet is downloaded and prepared in ArrayRecord format first.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SourceError("--tfds needs tensorflow-datasets: pip install 'vitnt-jax[tfds]'.") from None
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:
        raise SourceError(f"TFDS has no dataset {name!r}; check the name (tfds.list_builders()).") from None
    except Exception as first:  # not prepared yet (or prepared as TFRecord), or no such split
        splits = _known_splits(tfds, name, data_dir)
        if splits and split.split("[")[0] not in splits:
            raise SourceError(
                f"TFDS {name} has no split {split!r}; choose one of {', '.join(sorted(splits))}."
            ) from None
        if not prepare:
            raise SourceError(f"TFDS dataset {name} is not prepared in {data_dir or 'the default data dir'}.") from None
        data = _prepare_and_open(tfds, name, split, data_dir, first)
    n = len(data)
    if n == 0:
        raise SourceError(f"TFDS {name}:{split} holds no examples.")
    first_example = data[0]
    for key, flag in ((image_key, "--image-key"), (id_key, "--id-key")):
        if key is not None and key not in first_example:
            raise SourceError(f"TFDS {name} has no feature {key!r}; pass {flag} one of {sorted(first_example)}.")
    has_label = label_key is not None and label_key in first_example

    def text(value) -> str:
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return str(value.item() if isinstance(value, np.generic) else value)

    # Reading ids and labels touches every record once; images are decoded only when loaded.
    if id_key is None and not has_label:
        ids = [f"{name}/{split}/{i}" for i in range(n)]
        labels = None
    else:
        examples = [data[i] for i in range(n)]
        ids = [text(e[id_key]) for e in examples] if id_key else [f"{name}/{split}/{i}" for i in range(n)]
        labels = [text(e[label_key]) for e in examples] if has_label else None
        del examples
    _check_unique(ids, f"TFDS {name}:{split} ({id_key})")

    def load(i: int) -> np.ndarray:
        try:
            value = data[i][image_key]
        except Exception as error:  # a damaged record
            raise ImageError(f"unreadable record ({type(error).__name__}: {error})") from None
        if isinstance(value, bytes):
            return read_image(value)
        return np.asarray(value)

    # LFW holds unaligned 250x250 photos: detect and align the face (--align overrides it).
    aligned = name != "lfw"
    return Source(f"tfds {name}:{split}", ids, labels, load, "rgb", "none" if aligned else "mtcnn")


def _known_splits(tfds, name: str, data_dir: str | None) -> list[str]:
    try:
        return list(tfds.builder(name, data_dir=data_dir).info.splits)
    except Exception:  # no metadata yet: the dataset is simply not prepared
        return []


def _prepare_and_open(tfds, name, split, data_dir, first_error):
    import sys

    print(f"TFDS {name} is not prepared in ArrayRecord format; preparing it (this downloads it)...", file=sys.stderr)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as error:
        if "tensorflow" in str(error):
            raise SourceError(
                f"preparing TFDS {name} needs TensorFlow (pip install tensorflow), or prepare it elsewhere with "
                f"`tfds build {name} --file_format=array_record` and pass --data-dir."
            ) from None
        raise SourceError(f"preparing TFDS {name} failed ({error}).") from None
    except Exception as error:
        detail = str(error).splitlines()[0] if str(error) else ""
        raise SourceError(
            f"preparing TFDS {name} failed ({type(error).__name__}: {detail}); "
            "check the network, or prepare it elsewhere and pass --data-dir."
        ) from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:
        raise SourceError(
            f"TFDS {name}:{split} cannot be read after preparing ({str(error).splitlines()[0]}); it may be prepared "
            f"as TFRecord: rebuild it with `tfds build {name} --file_format=array_record`."
        ) from first_error
