"""The scoring settings of a result file, kept beside it so that `--resume` never mixes rows scored two ways.

A run records the settings that decide a score in `<out>.settings.json` (see `settings_path`):
the model's weights and config (`model_identity`), the block selection, alpha, the metric, the
aggregation (and the attention it reads when it reads one), the channel order, the alignment (with
MTCNN: its weights and smallest face), the compute dtype and the matmul precision. A resume whose
settings differ is refused in one sentence naming each difference (old -> new). Settings that only
change how a score is computed, not its value (batch size, workers, micro-batch, parallel mode,
attention kernel, devices, processes, progress), are not recorded: a result may be resumed on
another machine with another batch size. There is no flag to force a resume across different
settings: the rows could not be told apart afterwards, so such rows go to a new `--out` (or
replace the old ones with `--overwrite`).

A result written before settings were recorded has no such file: it is resumed with a warning, and
the file is written then.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vitnt_jax.files import open_regular
from vitnt_jax.output import OutputError

FORMAT = "vitnt-jax-settings"
VERSION = 1
MAX_BYTES = 1 << 20  # a record is a few hundred bytes; a larger file is not one of ours (and is not read whole)

# The recorded settings, in the order a refusal names them; each is a field of `vitnt_jax.pipeline.Job`.
KEYS = (
    "model",
    "blocks",
    "alpha",
    "metric",
    "aggregation",
    "attention",
    "color",
    "align",
    "mtcnn_weights",
    "min_face_size",
    "dtype",
    "precision",
)
# What a run knows before it opens its source (the rest depends on the source's default colour and alignment).
BEFORE_SOURCE = ("model", "blocks", "alpha", "metric", "aggregation", "attention", "dtype", "precision")


def settings_path(out: str | os.PathLike) -> Path:
    """Returns the path of the settings record of the result file `out`: `<out>.settings.json`."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


def model_identity(directory: str | os.PathLike, meta: Mapping[str, Any], shown: str) -> dict[str, str]:
    """Returns {'weights': an id of the checkpoint's weights and config, 'shown': `shown`} for the settings record.

    The id is a SHA-256 over the checkpoint's config and the checksum of its arrays recorded at conversion
    (`weights_sha256`, see `vitnt_jax.checkpoint.weights_digest`), so the same weights compare equal wherever
    their folder lies and however Orbax named its files. An older checkpoint without that checksum is
    identified by its config and what its conversion recorded of the source file (its SHA-256), and one
    that records neither by its whole metadata and its folder's absolute path.
    """
    config = json.dumps(meta.get("config"), sort_keys=True, default=str)
    source = meta.get("source") if isinstance(meta.get("source"), Mapping) else {}
    if isinstance(meta.get("weights_sha256"), str):
        recorded = f"{config}\nweights {meta['weights_sha256']}"
    elif isinstance(source.get("sha256"), str):
        recorded = f"{config}\nsource {json.dumps(source, sort_keys=True, default=str)}"
    else:
        recorded = f"{json.dumps(meta, sort_keys=True, default=str)}\nfolder {Path(directory).absolute()}"
    return {"weights": hashlib.sha256(recorded.encode()).hexdigest(), "shown": shown}


def file_identity(path: str | os.PathLike) -> str:
    """Returns 'sha256 <hex>' of a (small) weights file, or its absolute path when it cannot be read."""
    try:
        return "sha256 " + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return str(Path(path).absolute())


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if key == "model" and isinstance(value, Mapping):
        return str(value.get("shown") or value.get("weights"))
    if key == "blocks" and isinstance(value, list) and value:
        span = value == list(range(value[0], value[-1] + 1))
        return f"{value[0]}-{value[-1]}" if span else ",".join(map(str, value))
    if key == "alpha" and isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "attention" and (old is None or new is None):
        return True  # one side aggregates uniformly and reads no attention: the aggregation names the difference
    if key == "model" and isinstance(old, Mapping) and isinstance(new, Mapping):
        return old.get("weights") == new.get("weights")
    return old == new


def differences(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] = KEYS) -> list[str]:
    """Returns the keys among `keys` whose values differ between two settings records."""
    return [k for k in keys if not _same(k, old.get(k), new.get(k))]


def read(out: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the settings recorded for the result `out`, or None when it has no record (an older result)."""
    path = settings_path(out)
    try:
        # A FIFO planted under the record's name is refused instead of waited on.
        with open(open_regular(path), "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"it is larger than {MAX_BYTES // 1024} KiB")
        meta = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:
        detail = "it is nested too deeply" if isinstance(error, RecursionError) else None
        raise OutputError(
            f"cannot read {path} ({detail or getattr(error, 'strerror', None) or error}); it records the settings of "
            + "{out}: remove it to resume without the check, or replace the result with {overwrite}.",
            field="out",
            also=("overwrite",),
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("settings"), dict):
        raise OutputError(
            f"{path} is not a settings record of this tool; remove it to resume without the check, or replace "
            + "the result with {overwrite}.",
            field="out",
            also=("overwrite",),
        )
    version = meta.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= VERSION):
        raise OutputError(
            f"{path} is a settings record of format version {str(version)[:20]}, which this version of vitnt-jax "
            f"(format {VERSION}) cannot read; resume with the version that wrote it, or replace the result with "
            + "{overwrite}.",
            field="out",
            also=("overwrite",),
        )
    return meta["settings"]


def check(out: str | os.PathLike, current: Mapping[str, Any], keys: Iterable[str] = KEYS) -> None:
    """Raises OutputError, naming each setting of `keys` that differs (old -> new), unless `out` was scored so.

    A result without a record passes (the caller warns). The message renders every setting as its
    flag (`vitnt_jax.errors.UserError`).
    """
    old = read(out)
    if old is None:
        return
    changed = differences(old, current, keys)
    if not changed:
        return
    listed = "; ".join(
        "{" + k + "} " + f"{_shown(k, old.get(k))} -> {_shown(k, current.get(k))}".replace("{", "(").replace("}", ")")
        for k in changed
    )
    raise OutputError(
        f"{out} was scored with other settings ({listed}); resume it with the old settings, choose a new "
        + "{out}, or replace it with {overwrite}.",
        field="out",
        also=(*changed, "overwrite"),
    )


def write(out: str | os.PathLike, current: Mapping[str, Any]) -> Path:
    """Records `current` as the settings of the result `out` (atomically; an existing link is replaced, never
    written through); returns the record's path."""
    path = settings_path(out)
    text = json.dumps({"format": FORMAT, "version": VERSION, "settings": dict(current)}, indent=2, sort_keys=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from whoever reads the result
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
