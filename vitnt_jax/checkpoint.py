"""Self-describing converted checkpoints: a directory with config.json and Orbax variables.

Layout of DIR:
  config.json   {"format": "vitnt-jax", "version": 1, "config": {...ViTConfig...}, "source": {...}}
  variables/    Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vitnt_jax.config import ViTConfig
from vitnt_jax.errors import UserError
from vitnt_jax.model import variable_shapes

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
        arrays = jax.tree.map(np.asarray, variables)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(temporary / "variables", arrays)
        checkpointer.wait_until_finished()
        meta = {"format": FORMAT, "version": VERSION, "config": json.loads(config.to_json()), "source": source or {}}
        (temporary / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(
            f"cannot write the checkpoint to {directory} ({error.strerror or error}); choose a writable output path."
        ) from error
    return directory


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Returns whether `directory` holds a vitnt-jax checkpoint (by its config.json)."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
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
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{meta_path} is unreadable ({error}); convert the checkpoint again.") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{meta_path} is not a version-{VERSION} vitnt-jax checkpoint; convert the checkpoint again."
        )
    try:
        config = ViTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, NotImplementedError) as error:
        raise CheckpointError(
            f"{meta_path} holds an invalid config ({error}); convert the checkpoint again."
        ) from error
    return config, meta


def describe(directory: str | os.PathLike) -> str:
    """Returns a short text naming the weights in `directory`: the folder and, where recorded, their source file.

    E.g. "checkpoint /x/vit_b (from model.pt, sha256 3f2a...)". Conversions record the source file's
    name and SHA-256; a checkpoint written without them (an older one, or random weights) is named by
    its folder, with its family when known. Never raises: it is meant for a log line.
    """
    folder = Path(directory).absolute()
    try:
        meta = json.loads((folder / "config.json").read_text())
        source = meta.get("source") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        source = None
    if not isinstance(source, dict):
        return f"checkpoint {folder}"
    name, digest = source.get("file"), source.get("sha256")
    if isinstance(name, str) and isinstance(digest, str):
        return f"checkpoint {folder} (from {name}, sha256 {digest})"
    if source.get("family") == "random":
        return f"checkpoint {folder} (random weights, seed {source.get('seed')})"
    return f"checkpoint {folder}"


def load(directory: str | os.PathLike) -> tuple[ViTConfig, PyTree]:
    """Returns (config, variables) of the checkpoint in `directory`, checked strictly."""
    import orbax.checkpoint as ocp

    config, _ = load_config(directory)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), variable_shapes(config))
    try:
        variables = ocp.StandardCheckpointer().restore(Path(directory).absolute() / "variables", target)
    # What Orbax and TensorStore raise for missing, truncated or foreign files: FileNotFoundError,
    # JSONDecodeError, ValueError (NOT_FOUND, DATA_LOSS), KeyError/TypeError for another tree.
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"could not read the variables of {directory} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); convert the checkpoint again."
        ) from error
    check_variables(config, variables, f"checkpoint {directory}")
    return config, variables
