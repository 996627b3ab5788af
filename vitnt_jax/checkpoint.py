"""Self-describing converted checkpoints: a directory with config.json and Orbax variables.

Layout of DIR:
  config.json   {"format": "vitnt-jax", "version": 1, "config": {...ViTConfig...}, "source": {...},
                 "config_sha256": "...", "weights_sha256": "..."}
  variables/    Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}

The two checksums are written at conversion and verified on every load, so a damaged file (a
flipped bit, a truncated copy, a hand edit) is refused instead of scoring with other weights:
`config_sha256` covers the "config" entry as written, `weights_sha256` every array (see
`weights_sha256`). `source` records the converted file's name and SHA-256 (see `describe`).
Checkpoints written before the checksums existed still load, with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vitnt_jax.config import ViTConfig
from vitnt_jax.errors import UserError
from vitnt_jax.files import open_regular
from vitnt_jax.model import variable_shapes

log = logging.getLogger(__name__)
FORMAT = "vitnt-jax"
VERSION = 1
PyTree = Any


class CheckpointError(UserError):
    """A checkpoint directory that cannot be used; the message says what to do.

    A message may name the setting `model` (the checkpoint folder) or `overwrite` as `{model}` /
    `{overwrite}`: a command line shows its flag there (see `vitnt_jax.errors.UserError`).
    """


def _paths_and_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _flat(tree: PyTree) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted(("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat)


def weights_sha256(variables: PyTree) -> str:
    """Returns the SHA-256 over every array's path, dtype, shape and bytes, in path order.

    The path order makes it independent of how the tree was built; dtype and shape make two trees
    with equal bytes but different layouts differ.
    """
    digest = hashlib.sha256()
    for path, leaf in _flat(variables):
        array = np.ascontiguousarray(leaf)
        digest.update(json.dumps([path, array.dtype.str, list(array.shape)]).encode() + b"\n")
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _open_file(path: Path):
    """Returns `path` opened for reading, or OSError when it is no regular file (a FIFO is never waited on)."""
    return os.fdopen(open_regular(path), "rb")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_file(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file()]


def _printable(text: str, limit: int = 300) -> str:
    """Returns `text` with every control character escaped (no terminal escape reaches a log line), bounded."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_sha256(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _again(directory: Path) -> str:
    """Returns how to redo `directory`: a named model's cache folder is deleted, anything else converted again."""
    from vitnt_jax.cache import cache_dir

    try:
        cached = Path(directory).resolve().parent == cache_dir().resolve()
    except OSError:
        cached = False
    if cached:
        return f"delete {directory} so that the named model is converted again on the next run"
    return "convert it again"


def _damaged(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory} is damaged: its {what} do not match the checksum recorded when it was converted; "
        f"{_again(directory)}."
    )


def _first_line(error: BaseException) -> str:
    # TensorStore appends its whole JSON spec to the first line: keep the sentence before it.
    line = next((x for x in str(error).splitlines() if x.strip()), "no detail")
    line = line.split(" [tensorstore_spec=")[0]
    return line if len(line) <= 300 else line[:297] + "..."


def check_variables(config: ViTConfig, variables: PyTree, what: str) -> None:
    """Raises CheckpointError naming every missing, unexpected or mis-shaped variable."""
    want = _paths_and_shapes(variable_shapes(config))
    got = _paths_and_shapes(variables)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = [f"{k} is {got[k]} but should be {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append("; ".join(shapes))
    if problems:
        raise CheckpointError(f"{what} does not match config {config.name!r}: {'; '.join(problems)}.")


def save(
    directory: str | os.PathLike,
    config: ViTConfig,
    variables: PyTree,
    source: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes `variables` and `config` to `directory` and returns its absolute path.

    The checkpoint is written into a temporary sibling and moved into place at the end, so an
    interrupted save never leaves a half checkpoint. With `overwrite`, only an existing vitnt-jax
    checkpoint (or an empty folder) is replaced: any other folder is refused, never deleted.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    check_variables(config, variables, "the converted variables")
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise CheckpointError(f"{directory} exists and is not a folder; choose another output path.")
        if not overwrite:
            raise CheckpointError(
                f"{directory} already exists; choose a new path, or replace it with " + "{overwrite}.",
                field="overwrite",
            )
        if any(directory.iterdir()) and not is_checkpoint(directory):
            raise CheckpointError(
                f"{directory} is a folder that is not a vitnt-jax checkpoint; refusing to replace it, "
                "choose another output path."
            )
    temporary = directory.with_name(f".{directory.name}.writing-{os.getpid()}")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        # Stored in the dtypes `load` restores them as, so the checksum of what is read back is this one.
        dtypes = {path: leaf.dtype for path, leaf in _flat(variable_shapes(config))}
        arrays = jax.tree_util.tree_map_with_path(
            lambda path, leaf: np.asarray(leaf, dtype=dtypes["/".join(str(getattr(k, "key", k)) for k in path)]),
            variables,
        )
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(temporary / "variables", arrays)
        checkpointer.wait_until_finished()
        config_dict = json.loads(config.to_json())
        variables = temporary / "variables"
        files = _weight_files(variables)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": config_dict,
            "source": source or {},
            "config_sha256": _config_sha256(config_dict),
            "weights_sha256": weights_sha256(arrays),
            "files_sha256": {p.relative_to(variables).as_posix(): _file_sha256(p) for p in files},
            # Compared before any file is hashed, so a file grown since (or a huge one put in its
            # place) is refused at once rather than read to the end.
            "files_bytes": {p.relative_to(variables).as_posix(): p.stat().st_size for p in files},
        }
        (temporary / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _move_into_place(temporary, directory, overwrite)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(
            f"cannot write the checkpoint to {directory} ({error.strerror or error}); choose a writable output path."
        ) from error
    return directory


def _move_into_place(temporary: Path, directory: Path, overwrite: bool) -> None:
    """Renames the finished `temporary` onto `directory`; a checkpoint there is replaced only with `overwrite`.

    Another process may have written `directory` since `save` looked (two conversions of one named
    model): without `overwrite` its checkpoint is kept and this one dropped, so no reader ever sees
    a folder half removed. With `overwrite` the old one is first renamed aside, then deleted.
    """
    aside = None
    if overwrite and (directory.exists() or directory.is_symlink()):
        aside = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    try:
        os.rename(temporary, directory)  # fails when another process put a non-empty folder there first
    except OSError as error:
        if aside is not None:
            os.replace(aside, directory)
        elif directory.is_dir() and is_checkpoint(directory):
            shutil.rmtree(temporary, ignore_errors=True)
            raise CheckpointError(
                f"{directory} was written by another process meanwhile; use it, or replace it with " + "{overwrite}.",
                field="overwrite",
            ) from error
        raise
    if aside is not None:
        if aside.is_symlink() or not aside.is_dir():
            aside.unlink()
        else:
            shutil.rmtree(aside, ignore_errors=True)


MAX_META_BYTES = 1 << 20  # a config.json is ~2 KB; anything this large is no checkpoint's


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"it names the key {_printable(twice, 60)!r} twice")
    return out


def _read_meta(path: Path) -> Any:
    """Returns the parsed config.json; ValueError for one too large or not strict JSON, OSError for no file.

    RecursionError: nested too deep. A key given twice is refused: a reader of the file would see
    one value and the loader use the other. A FIFO is refused at once, never waited on. (NaN and
    Infinity literals parse; every config field that must be a number refuses them.)
    """
    with _open_file(path) as f:
        text = f.read(MAX_META_BYTES + 1)
    if len(text) > MAX_META_BYTES:
        raise ValueError(f"it is larger than {MAX_META_BYTES} bytes")
    return json.loads(text, object_pairs_hook=_unique_keys)


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Returns whether `directory` holds a vitnt-jax checkpoint (by its config.json)."""
    try:
        meta = _read_meta(Path(directory) / "config.json")
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_config(directory: str | os.PathLike) -> tuple[ViTConfig, dict]:
    """Returns (config, metadata) of the checkpoint in `directory`."""
    directory = Path(directory)
    meta_path = directory / "config.json"
    if directory.is_file():
        raise CheckpointError(
            f"model checkpoint {directory} is a file; convert it first with `python -m converters.cvlface "
            f"{directory} DST` and give the folder DST as " + "{model}.",
            field="model",
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"model checkpoint {directory} does not exist; convert one with "
            "`python -m converters.cvlface SRC DST` and give DST as {model}.",
            field="model",
        )
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory} is not a vitnt-jax checkpoint (no config.json); convert the PyTorch "
            "weights with `python -m converters.cvlface SRC DST` first."
        )
    try:
        meta = _read_meta(meta_path)
    except (OSError, ValueError, RecursionError) as error:
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CheckpointError(f"{meta_path} is unreadable ({detail}); convert the checkpoint again.") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{meta_path} is not a version-{VERSION} vitnt-jax checkpoint; convert the checkpoint again."
        )
    recorded = meta.get("config_sha256")
    if recorded is not None and recorded != _config_sha256(meta.get("config")):
        raise _damaged(directory, "config.json settings")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path} holds no config; convert the checkpoint again.")
    try:
        config = ViTConfig.from_dict(meta["config"])
    except ValueError as error:  # ConfigError: one sentence naming the field, its value and what is allowed
        raise CheckpointError(
            f"{meta_path} holds an invalid config: {str(error).rstrip('.')}; convert the checkpoint again."
        ) from error
    return config, meta


def weights_digest(directory: str | os.PathLike) -> str | None:
    """Returns the weights checksum recorded in `directory` at conversion (None when it records none).

    Reads config.json only; `load` is what verifies the arrays against it. Two checkpoints with the
    same digest hold the same arrays.
    """
    _, meta = load_config(directory)
    digest = meta.get("weights_sha256")
    # Only a digest as `save` writes it: other text (a crafted one) would reach messages and records.
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def describe(directory: str | os.PathLike) -> str:
    """Returns a short text naming the weights in `directory`: the folder and, where recorded, their source file.

    E.g. "checkpoint /x/vit_b (from model.pt, sha256 3f2a...)". Conversions record the source file's
    name and SHA-256; a checkpoint written without them (an older one, or random weights) is named by
    its folder, with its family when known. Never raises: it is meant for a log line.
    """
    folder = Path(directory).absolute()
    try:
        meta = _read_meta(folder / "config.json")
        source = meta.get("source") if isinstance(meta, dict) else None
    except (OSError, ValueError, RecursionError):
        source = None
    text = f"checkpoint {_printable(str(folder), 1000)}"
    if not isinstance(source, dict):
        return text
    name, digest = source.get("file"), source.get("sha256")
    if isinstance(name, str) and isinstance(digest, str):  # both come from the file: shown escaped and bounded
        return f"{text} (from {_printable(name, 200)}, sha256 {_printable(digest, 64)})"
    if source.get("family") == "random":
        return f"{text} (random weights, seed {_printable(str(source.get('seed')), 40)})"
    return text


def _check_files(directory: Path, recorded: Any, sizes: Any) -> None:
    """Raises CheckpointError unless every file written under variables/ is there with its recorded SHA-256.

    Checked before Orbax reads anything, so a damaged file is named here rather than failing (or
    not) somewhere inside TensorStore. Sizes (recorded since they were) are compared first, so no
    file is hashed unless every file has the size it had.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not (sizes is None or isinstance(sizes, dict)):
        raise _damaged(directory, "weights")
    folder = directory / "variables"
    for name in sorted(recorded):
        path = folder / name
        shown = _printable(name, 200)
        if ".." in Path(name).parts or Path(name).is_absolute() or not name:
            raise _damaged(directory, "weights")
        if not path.is_file():
            what = "is missing" if not (path.exists() or path.is_symlink()) else "is no regular file"
            raise CheckpointError(
                f"checkpoint {directory} is damaged: its weights file variables/{shown} {what}; {_again(directory)}."
            )
        if sizes is not None and path.stat().st_size != sizes.get(name):
            raise _damaged(directory, "weights")
    for name, digest in sorted(recorded.items()):
        path = folder / name
        try:
            if _file_sha256(path) != digest:
                raise _damaged(directory, "weights")
        except OSError as error:
            raise CheckpointError(
                f"cannot read the weights file {path} ({error.strerror or error}); check its permissions."
            ) from error


def load(directory: str | os.PathLike) -> tuple[ViTConfig, PyTree]:
    """Returns (config, variables) of the checkpoint in `directory`, checked strictly."""
    import orbax.checkpoint as ocp

    config, meta = load_config(directory)
    directory = Path(directory)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), variable_shapes(config))
    recorded = meta.get("weights_sha256")
    _check_files(directory, meta.get("files_sha256"), meta.get("files_bytes"))
    checkpointer = ocp.StandardCheckpointer()
    try:
        if meta.get("files_sha256") is None:
            # Files not verified (an older checkpoint): Orbax restores the shapes its metadata claims,
            # whatever the target says, so they are checked against the config before any array is
            # allocated (a crafted claim of a huge shape would otherwise be allocated first).
            stored = checkpointer.metadata(directory.absolute() / "variables")
            stored = getattr(stored, "item_metadata", stored)
            shapes_ok = _paths_and_shapes(stored) == _paths_and_shapes(target)
        else:
            shapes_ok = True
        if shapes_ok:
            variables = checkpointer.restore(directory.absolute() / "variables", target)
    # Whatever Orbax and TensorStore raise for missing, truncated, damaged or foreign files
    # (FileNotFoundError, JSONDecodeError, ValueError DATA_LOSS, KeyError, TypeError, ...): the
    # files are ours to read, so any failure reading them means the checkpoint is unusable.
    except Exception as error:
        detail = f"{type(error).__name__}: {_first_line(error)}"
        if recorded is not None:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: its weights could not be read ({detail}); {_again(directory)}."
            ) from error
        raise CheckpointError(
            f"could not read the variables of {directory} ({detail}); convert the checkpoint again."
        ) from error
    if not shapes_ok:
        check_variables(config, stored, f"checkpoint {directory}")
    if recorded is None:
        check_variables(config, variables, f"checkpoint {directory}")
        log.warning(
            "checkpoint %s records no checksum of its weights (written by an older vitnt-jax), so damage to it "
            "cannot be detected; convert it again to add one.",
            directory,
        )
    elif weights_sha256(variables) != recorded:
        raise _damaged(directory, "weights")
    else:
        check_variables(config, variables, f"checkpoint {directory}")
    return config, variables
