"""The scoring pipeline: source -> decode/align -> fixed batches -> dispatch/fetch double buffer -> writer.

Python API ("load once, score many")::

    from vitnt_jax import pipeline
    from vitnt_jax.sources import SourceSpec

    scorer = pipeline.load_scorer("cvlface_vit_base_webface4m")        # a named model or a checkpoint folder
    q = pipeline.score_array(scorer, images)["quality"]                 # (N, 112, 112, 3) uint8 RGB -> (N,)
    for r in pipeline.score_iter(scorer, ["a.png", ("b", array)]):      # paths, bytes, arrays or (id, item)
        print(r.id, r.quality, r.error)
    summary = pipeline.score_folder(scorer, "faces/", "scores.csv")    # one row per image, resumable
    summary = pipeline.run(pipeline.Job(SourceSpec("images", "faces/"), out="scores.csv"))  # what the CLI runs

`load_scorer` compiles once per batch shape; every function below takes any `BatchScorer`
(`vitnt_jax.scorer.Scorer` is one; the experiments' baselines are others): `padded_size(n)`,
`dispatch(uint8 (B, H, W, C)) -> pending` and `fetch(pending) -> {'quality': (B,), optional
'embedding' (B, E), 'patch_quality' (B, P)}`. Batches have one fixed size (the tail is padded), so
nothing recompiles; batch k+1 is dispatched before batch k is fetched, so the host decodes and
writes while the devices score.

`Job` is the whole description of a scoring run (a frozen, validated dataclass whose field names
are the flags of `python -m vitnt_jax.score` without their dashes); `run(job)` opens the source,
resolves the model, scores this process's share and writes through `vitnt_jax.output.ResultWriter`.
`score_source` is the same loop for a Source and a scorer you already have; `scored_batches` is
the loop without the writer (it yields `ScoredBatch`es), for callers that use the results themselves.

Bad inputs: with on_error="record" (the default) an unreadable image (or, aligning with MTCNN, a
photo without a face, or an input whose scores are not all finite numbers) keeps its row with an
empty quality and the reason; with "fail" the rows before it are written and `InputError` is raised.

`run` locks every output for the whole run (`vitnt_jax.output.lock_output`; a second run on them is
refused), records the scoring settings beside the result (`vitnt_jax.fingerprint`; a resume with
other settings is refused), writes no file through a symbolic link, and checks the cheap things
(outputs, model, blocks, recorded settings) before it opens the source or loads any weights.

Progress and warnings go to the `vitnt_jax` loggers; errors a user can fix are
`vitnt_jax.errors.UserError`s (JobError, InputError, SourceError, OutputError) naming the setting
by its field name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vitnt_jax import chunked, files, fingerprint, sources, storage
from vitnt_jax.data import ALIGNS, IMAGE_SUFFIXES, Batch, ImageError, batches, read_image
from vitnt_jax.errors import UserError
from vitnt_jax.output import (
    FORMATS,
    ResultWriter,
    Row,
    check_ids,
    columns,
    lock_output,
    part_path,
    read_ids,
    refuse_existing,
    render_id,
)
from vitnt_jax.sources import Source, SourceError, SourceSpec

logger = logging.getLogger(__name__)

__all__ = [
    "BatchScorer",
    "InputError",
    "Job",
    "JobError",
    "Result",
    "ScoredBatch",
    "Summary",
    "load_scorer",
    "run",
    "score_array",
    "score_folder",
    "score_iter",
    "score_source",
    "scored_batches",
]


class JobError(UserError):
    """A job setting (or the model, or an output path) that cannot work; names the setting and the fix."""


class InputError(UserError):
    """An input that cannot be scored under on_error='fail'; `id` names it, and the rows before it are kept."""

    def __init__(self, message: str, *, id: str, reason: str, **kwargs):
        self.id, self.reason = id, reason
        super().__init__(message, **kwargs)


class BatchScorer(Protocol):
    """What the pipeline scores with (see the module docstring); `vitnt_jax.scorer.Scorer` is one."""

    def padded_size(self, n: int) -> int: ...

    def dispatch(self, images: np.ndarray) -> Any: ...

    def fetch(self, pending: Any) -> dict[str, np.ndarray]: ...


# ---------------------------------------------------------------------------------------------------- the job


def _micro_batch_value(value):
    if value in ("auto", None) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value or None
    raise JobError(
        "{micro_batch} must be a number of images (0 = off), 'auto' or None " + f"(got {value!r}).",
        field="micro_batch",
    )


FLOAT32_MAX = float(np.finfo(np.float32).max)
URL_FIELDS = ("out", "save_embeddings", "save_patch_quality")  # the outputs that may be URLs (object storage)
RESULT_FORMATS = (*FORMATS, "parquet")  # parquet: chunked runs only (a Parquet file cannot be appended to)


def _host_port(text: str) -> tuple[str, int] | None:
    """Returns (host, port) of 'HOST:PORT' ('[v6]:PORT' too), or None when it is not one."""
    host, colon, port = str(text).rpartition(":")
    if not (colon and host.strip("[]") and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return host, int(port)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_overlaps(job: Job) -> None:
    """Raises JobError when an output would be written into what the run reads, or into the crops folder.

    A run never writes its own input: no crop and no output named like an image lies in the --images folder
    being scored (a CSV beside the images is fine: it is not listed), and no output is the --list or --bin
    file. Results and crops stay apart (a crop must not replace a result).
    """
    files = [(n, getattr(job, n)) for n in URL_FIELDS if getattr(job, n) and not storage.is_url(getattr(job, n))]
    written = [(n, p.resolve()) for n, p in files]
    if not storage.is_url(job.out):
        written.append(("out", fingerprint.settings_path(job.out).resolve()))
    crops = job.save_aligned.resolve() if job.save_aligned is not None else None
    for name, path in written:
        if crops is not None and _inside(path, crops):
            where = "is" if path == crops else "lies in"
            raise JobError(
                "{" + name + "} " + f"{path} {where} the " + "{save_aligned} " + f"folder {job.save_aligned}; "
                "keep results and crops apart: choose another path for one of them.",
                field=name,
                also=("save_aligned",),
            )
    kind, location = job.source.kind, job.source.location
    if (
        kind not in ("images", "list", "bin")
        or not isinstance(location, (str, os.PathLike))
        or storage.is_url(location)
    ):
        return
    source = Path(location).resolve()
    for name, path in written + ([("save_aligned", crops)] if crops is not None else []):
        # In a folder being scored, a crop or a file with an image's name is (or becomes) one of its inputs.
        image_like = name == "save_aligned" or path.suffix.lower() in IMAGE_SUFFIXES
        if path == source or (kind == "images" and image_like and _inside(path, source)):
            where = "lies in the {images} folder" if kind == "images" else "is the {" + kind + "} file"
            raise JobError(
                "{" + name + "} " + f"{path} " + where + f" {location} that this run reads; a run never writes into "
                "its own input: choose a path outside it.",
                field=name,
                also=(kind,),
            )


@dataclass(frozen=True)
class Job:
    """One scoring run, validated when made (JobError names the field). Defaults are the method's.

    source: what to score (`vitnt_jax.sources.SourceSpec`). out: the result file.
    model: a named model (`python -m vitnt_jax.models`) or a converted checkpoint folder; None = the paper's.
    blocks, alpha, metric, aggregation, attention: the method (see `vitnt_jax.stability.ScoreSettings`);
      blocks None = the model's published selection.
    color, align: what the source holds ('rgb'/'bgr'; 'none'/'center'/'mtcnn'); None = the source's default.
    mtcnn_weights, min_face_size: with align 'mtcnn' only.
    workers: decoding threads. batch_size: images per step over all local devices (rounded up by the scorer).
    parallel, dtype, micro_batch, attention_kernel, precision: see `vitnt_jax.scorer.Scorer`.
    format: a result format of `vitnt_jax.output.FORMATS`. save_embeddings / save_patch_quality: .npy files
      of per-row arrays; save_aligned: a folder for every scored row's model input.
    resume / overwrite: continue an existing `out` / replace it (without either, an existing result is refused).
    on_error: 'record' (bad inputs keep a row with the reason) or 'fail' (stop at the first one).
    num_processes, process_id, coordinator: multi-process runs; distributed: JAX's automatic cluster detection.
    process_timeout: seconds a process waits for the others at the end of a multi-process run.
    chunk_rows: inputs per committed chunk of a chunked run (see `vitnt_jax.chunked`; None: 4096, or what a
      resumed run recorded). A run is chunked when `out` or an array file is a URL, the source is read piece by
      piece (rec, wds, parquet), the format is parquet, or chunk_rows is given.
    compile_cache: JAX's persistent compilation cache folder (None: under the cache folder; 'off': none).
    out, save_embeddings, save_patch_quality: local paths or URLs (kept as str).
    """

    source: SourceSpec
    out: Path = Path("scores.csv")
    model: str | None = None
    blocks: str | None = None
    alpha: float = 8.0
    metric: str = "euclidean"
    aggregation: str = "attention"
    attention: str = "last"
    color: str | None = None
    align: str | None = None
    mtcnn_weights: Path | None = None
    min_face_size: float | None = None
    workers: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))
    batch_size: int = 64
    parallel: str = "jit"
    dtype: str = "float32"
    micro_batch: int | str | None = "auto"
    attention_kernel: str = "matmul"
    precision: str = "highest"
    format: str = "csv"
    save_embeddings: Path | None = None
    save_patch_quality: Path | None = None
    save_aligned: Path | None = None
    resume: bool = False
    overwrite: bool = False
    on_error: str = "record"
    num_processes: int | None = None
    process_id: int | None = None
    coordinator: str | None = None
    distributed: bool = False
    process_timeout: float = 3600.0
    chunk_rows: int | None = None
    compile_cache: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        for name in ("out", "mtcnn_weights", "save_embeddings", "save_patch_quality", "save_aligned"):
            value = getattr(self, name)
            if name in URL_FIELDS and storage.is_url(value):
                continue  # a URL stays text: a Path would fold its double slash
            if value is not None and not isinstance(value, Path):
                set_(name, Path(value))
        for name in ("mtcnn_weights", "save_aligned"):
            if storage.is_url(os.fspath(getattr(self, name) or "")):
                raise JobError("{" + name + "} " + "must be a local path (got a URL).", field=name)
        if not isinstance(self.source, SourceSpec):
            raise JobError(
                "{source} must be a vitnt_jax.sources.SourceSpec " + f"(got {self.source!r}).", field="source"
            )
        set_("micro_batch", _micro_batch_value(self.micro_batch))
        choices = {
            "aggregation": ("mean", "attention"),
            "attention": ("last", "all"),
            "color": ("rgb", "bgr", None),
            "align": (*ALIGNS, None),
            "parallel": ("jit", "pmap"),
            "dtype": ("float32", "bfloat16"),
            "attention_kernel": ("matmul", "xla", "cudnn"),
            "precision": ("highest", "default"),
            "format": RESULT_FORMATS,
            "on_error": ("record", "fail"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a is not None)
                raise JobError("{" + name + "} " + f"must be one of {shown} (got {getattr(self, name)!r}).", field=name)
        from vitnt_jax.stability import METRICS  # imports JAX: a Job is made after flags are parsed

        if self.metric not in METRICS:
            raise JobError(
                "{metric} " + f"must be one of {', '.join(sorted(METRICS))} (got {self.metric!r}).", field="metric"
            )
        for name in ("batch_size", "workers", "chunk_rows"):
            value = getattr(self, name)
            if name == "chunk_rows" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise JobError("{" + name + "} " + f"must be at least 1 (got {value}).", field=name)
        if self.attention_kernel == "cudnn" and self.dtype != "bfloat16":
            raise JobError(
                "{attention_kernel} cudnn runs in bfloat16 only; add {dtype} bfloat16.",
                field="attention_kernel",
                also=("dtype",),
            )
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise JobError("{alpha} " + f"must be a positive number (got {self.alpha}).", field="alpha")
        if self.alpha > FLOAT32_MAX:  # the score runs in float32: alpha would become infinity there, and d = 0 NaN
            raise JobError(
                "{alpha} " + f"must be at most {FLOAT32_MAX:.3g}, the float32 range (got {self.alpha:g}).",
                field="alpha",
            )
        multi = [self.num_processes, self.process_id, self.coordinator]
        if any(v is not None for v in multi) and not all(v is not None for v in multi):
            raise JobError(
                "multi-process runs need all of {num_processes}, {process_id} and {coordinator}.",
                field="num_processes",
                also=("process_id", "coordinator"),
            )
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise JobError(
                "{process_id} " + f"must be in 0..{self.num_processes - 1} (got {self.process_id}).",
                field="process_id",
            )
        if self.coordinator is not None and _host_port(self.coordinator) is None:
            raise JobError(
                "{coordinator} " + f"must be HOST:PORT, a port from 1 to 65535 (got {self.coordinator!r}).",
                field="coordinator",
            )
        for name in ("save_embeddings", "save_patch_quality"):
            path = getattr(self, name)
            if path is not None and not os.fspath(path).endswith(".npy"):
                raise JobError("{" + name + "} " + f"{path} must end in .npy.", field=name)
        # MTCNN's smallest window is 12 px: a smaller face size upsamples every photo (12/size)^2-fold.
        size = self.min_face_size
        if size is not None and not (math.isfinite(size) and size >= 12):
            raise JobError(
                "{min_face_size} " + f"must be at least 12 pixels, MTCNN's window (got {size:g}).",
                field="min_face_size",
            )
        timeout = self.process_timeout
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise JobError(
                "{process_timeout} " + f"must be a positive number of seconds (got {self.process_timeout}).",
                field="process_timeout",
            )
        if self.resume and self.overwrite:
            raise JobError(
                "{resume} and {overwrite} exclude each other; choose one.", field="resume", also=("overwrite",)
            )
        finals = [p for p in (self.out, self.save_embeddings, self.save_patch_quality) if p is not None]
        if len({p if storage.is_url(p) else p.resolve() for p in finals}) != len(finals):
            raise JobError(
                "{out}, {save_embeddings} and {save_patch_quality} must be three different files.",
                field="out",
                also=("save_embeddings", "save_patch_quality"),
            )
        if self.chunked and self.save_aligned is not None:
            raise JobError(
                "{save_aligned} is not written by chunked runs (a URL output, a rec, wds or parquet source, "
                "the parquet format or {chunk_rows}); drop it, or score a local source into a local CSV.",
                field="save_aligned",
                also=("chunk_rows",),
            )
        if self.compile_cache is not None and not isinstance(self.compile_cache, str):
            set_("compile_cache", os.fspath(self.compile_cache))
        _refuse_overlaps(self)

    @property
    def chunked(self) -> bool:
        """Whether this run is chunked (see `vitnt_jax.chunked` and the class docstring)."""
        urls = any(storage.is_url(getattr(self, n)) for n in URL_FIELDS)
        return urls or self.source.chunked or self.format == "parquet" or self.chunk_rows is not None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Returns the names of the job's fields (each a flag of the CLI, dashes for underscores)."""
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Summary:
    """What a run did: rows scored and failed (this process), rows skipped as already written, time, file."""

    scored: int
    failed: int
    skipped: int
    seconds: float
    out: Path

    @property
    def rate(self) -> float:
        """Returns the images (scored or failed) per second."""
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Result:
    """One scored input of `score_iter`: quality None (and the reason in `error`) when it failed.

    embedding / patch_quality: that input's rows when the scorer returns them (None otherwise).
    """

    id: str
    quality: float | None
    error: str = ""
    embedding: np.ndarray | None = None
    patch_quality: np.ndarray | None = None


# -------------------------------------------------------------------------------------------- scorer loading


def load_scorer(
    model: str | os.PathLike | None = None,
    *,
    blocks: str | Sequence[int] | None = None,
    alpha: float = 8.0,
    metric: str = "euclidean",
    aggregation: str = "attention",
    attention: str = "last",
    embeddings: bool = False,
    patch_quality: bool = False,
    precision: str = "highest",
    dtype: str = "float32",
    parallel: str = "jit",
    micro_batch: int | str | None = "auto",
    attention_kernel: str = "matmul",
    devices: list | None = None,
):
    """Returns a compiled `vitnt_jax.scorer.Scorer` for a named model or checkpoint folder (None = the paper's).

    The model is resolved (named models are downloaded and converted once, see `vitnt_jax.models`)
    and loaded once; reuse the scorer for every batch. Raises JobError naming the setting.
    """
    import jax.numpy as jnp

    from vitnt_jax import checkpoint, models
    from vitnt_jax.scorer import Scorer
    from vitnt_jax.selection import parse_blocks
    from vitnt_jax.stability import ScoreSettings

    try:
        model_dir = models.resolve(model if model is not None else models.DEFAULT_MODEL)
    except models.ModelError as error:
        raise JobError(str(error), field="model") from error
    try:
        config, variables = checkpoint.load(model_dir)
    except checkpoint.CheckpointError as error:
        raise JobError(str(error), field="model") from error
    try:
        selected = parse_blocks(blocks if blocks is not None else config.default_blocks, config.depth)
    except ValueError as error:
        raise JobError(str(error), field="blocks") from error
    try:
        settings = ScoreSettings(selected, alpha=alpha, metric=metric, aggregation=aggregation, attention=attention)
    except ValueError as error:
        raise JobError(str(error)) from error
    if embeddings and config.head == "none":
        raise JobError(f"model {config.name} has no embedding head; drop " + "{embeddings}.", field="embeddings")
    outputs = ("quality",) + (("embedding",) if embeddings else ()) + (("patch_quality",) if patch_quality else ())
    try:
        return Scorer(
            config,
            variables,
            settings,
            embed=embeddings,
            outputs=outputs,
            precision=precision,
            dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
            devices=devices,
            parallel=parallel,
            attention_kernel=attention_kernel,
            micro_batch=micro_batch,
        )
    except ValueError as error:
        raise JobError(str(error)) from error


def _image_size(scorer, size: int | None) -> int:
    if size is not None:
        return size
    config = getattr(scorer, "config", None)
    if config is None:
        raise TypeError("pass size= (the scorer's input size): this scorer has no .config to read it from.")
    return config.img_size


# ------------------------------------------------------------------------------------------------ the engine


@dataclass
class ScoredBatch:
    """One batch with its scores: `result[key][row]` for `batch.indices[row]`, rows < `rows` to be kept.

    rows: all the batch's inputs, or (on_error 'fail') those before its bad one.
    """

    batch: Batch
    result: dict[str, np.ndarray]
    rows: int


def _scored_batches(
    scorer: BatchScorer,
    stream: Iterable[Batch],
    on_error: str,
    source_ids: Sequence[str] | None = None,
    on_batch: Callable[[Batch], None] | None = None,
) -> Iterator[ScoredBatch]:
    """Yields every batch of `stream` with its scores, dispatching batch k+1 before fetching batch k.

    on_error 'fail': the rows before the first bad input are yielded, then InputError is raised.
    Running out of host or device memory is a JobError naming batch_size.
    """
    try:
        yield from _double_buffered(scorer, stream, on_error, source_ids, on_batch)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "RESOURCE_EXHAUSTED" not in str(error):
            raise  # XLA's out-of-memory status; any other runtime error is not the user's to fix
        where = "the host" if isinstance(error, MemoryError) else "the devices"
        lines = str(error).strip().splitlines()
        detail = lines[0][:200] if lines else type(error).__name__
        raise JobError(f"{where} ran out of memory ({detail}); lower " + "{batch_size}.", field="batch_size") from error
    finally:
        if hasattr(stream, "close"):  # stop its decoders now, not whenever the garbage collector gets to it
            stream.close()


def _non_finite(batch: Batch, result: dict[str, np.ndarray]) -> None:
    """Turns every valid row whose scores hold NaN or infinity into a failed one (its reason in `batch.errors`)."""
    for key in ("quality", "embedding", "patch_quality"):
        if key not in result:
            continue
        values = np.asarray(result[key])
        n = min(len(batch.indices), values.shape[0])
        finite = np.isfinite(values[:n].reshape(n, -1)).all(axis=1)
        for row in np.flatnonzero(batch.valid[:n] & ~finite):
            batch.valid[row] = False
            shown = float(values[row]) if values.ndim == 1 else "nan or inf"
            batch.errors[row] = (
                f"non-finite score; the model gave {shown} as {key} for this input: check the checkpoint's "
                "weights and config"
            )


def _double_buffered(scorer, stream, on_error, source_ids, on_batch) -> Iterator[ScoredBatch]:
    def fetched(item):
        batch, handle = item
        result = scorer.fetch(handle)
        _non_finite(batch, result)  # a NaN score is never counted as scored: the row fails with the reason
        return batch, result

    def finish(batch, result) -> Iterator[ScoredBatch]:
        bad = next((k for k, e in enumerate(batch.errors) if e), None) if on_error == "fail" else None
        if bad is None:
            yield ScoredBatch(batch, result, len(batch.indices))
            return
        yield ScoredBatch(batch, result, bad)
        index = batch.indices[bad]
        name = source_ids[index] if source_ids is not None else str(index)
        raise InputError(
            f"{name}: {batch.errors[bad]} (" + "{on_error} fail)",
            id=name,
            reason=batch.errors[bad],
            field="on_error",
        )

    pending = None
    for batch in stream:
        if on_batch is not None:
            on_batch(batch)
        dispatched = (batch, scorer.dispatch(batch.images))
        if on_error == "fail" and any(batch.errors):  # stop here: nothing after the bad input is dispatched
            if pending is not None:
                yield from finish(*fetched(pending))
            yield from finish(*fetched(dispatched))
        if pending is not None:
            yield from finish(*fetched(pending))
        pending = dispatched
    if pending is not None:
        yield from finish(*fetched(pending))


def scored_batches(
    scorer: BatchScorer,
    source: Source,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    size: int | None = None,
    color: str | None = None,
    align: str | None = None,
    detector=None,
    workers: int = 4,
    on_error: str = "record",
) -> Iterator[ScoredBatch]:
    """Yields the source's `indices` (default all) in fixed batches with their scores, in order.

    The engine under `score_source`, for callers that handle the results themselves (e.g. the
    experiments): decoding runs ahead on `workers` threads and batch k+1 is dispatched before
    batch k is fetched. Arguments as in `score_source`.
    """
    size = _image_size(scorer, size)
    stream = batches(
        source.load,
        list(range(len(source)) if indices is None else indices),
        scorer.padded_size(batch_size),
        size,
        color=color or source.color or "rgb",
        align=align or source.align or "none",
        workers=workers,
        detector=detector,
    )
    return _scored_batches(scorer, stream, on_error, source.ids, _resize_warning(size))


def _rows(scored: ScoredBatch, source: Source, shapes: dict[str, tuple[int, ...]]):
    """Returns (rows, {key: (rows, *shape) array, NaN rows for failed inputs}, failed count) of a scored batch."""
    n, batch, result = scored.rows, scored.batch, scored.result
    valid = batch.valid[:n]
    rows, failed = [], 0
    for row, index in enumerate(batch.indices[:n]):
        label = source.labels[index] if source.labels is not None else None
        if valid[row]:
            rows.append(Row(source.ids[index], float(result["quality"][row]), label))
        else:
            rows.append(Row(source.ids[index], None, label, batch.errors[row]))
            failed += 1
    arrays = {}
    for key, shape in shapes.items():
        values = np.array(result[key][:n], np.float32)
        values[~valid] = np.nan  # failed inputs keep their row, filled with NaN
        arrays[key] = values.reshape(n, *shape)
    return rows, arrays, failed


def _resize_warning(size: int) -> Callable[[Batch], None]:
    warned = []

    def check(batch: Batch) -> None:
        if not warned and any(batch.resized):
            w, h = next(r for r in batch.resized if r)
            logger.warning("some images (e.g. %dx%d) are not %dx%d; resizing them bilinearly", w, h, size, size)
            warned.append(True)

    return check


def score_source(
    scorer: BatchScorer,
    source: Source,
    out: str | os.PathLike | ResultWriter | None = None,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    size: int | None = None,
    color: str | None = None,
    align: str | None = None,
    detector=None,
    workers: int = 4,
    on_error: str = "record",
    fmt: str = "csv",
    resume: bool = False,
    overwrite: bool = False,
    crops: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Scores `source` (the `indices` given, default all not yet in a resumed `out`) into a result file.

    out: a path (a ResultWriter is opened on it with fmt/resume/overwrite and closed at the end), an
      open ResultWriter (left open, for callers that own it), or None (nothing written; the Summary only).
    size: the scorer's input size (default: scorer.config.img_size). color/align: default the source's.
    crops: save every valid row's model input there first (see `crop_name`).
    progress: called with the rows written after each batch.
    Raises InputError under on_error='fail' after writing the rows before the bad input.
    """
    size = _image_size(scorer, size)
    own = isinstance(out, (str, os.PathLike))  # else a writer: a ResultWriter, or one piece's chunked.Collector
    writer = (
        ResultWriter(Path(out), fmt=fmt, with_label=source.labels is not None, resume=resume, overwrite=overwrite)
        if own
        else out
    )
    done = set(writer.done_ids) if writer is not None else set()
    todo = [k for k in (range(len(source)) if indices is None else indices) if render_id(source.ids[k]) not in done]
    stream = scored_batches(
        scorer,
        source,
        indices=todo,
        batch_size=batch_size,
        size=size,
        color=color,
        align=align,
        detector=detector,
        workers=workers,
        on_error=on_error,
    )
    shapes = {k: s.row_shape for k, s in writer.sinks.items()} if writer is not None else {}
    scored = failed = 0
    finished = False
    start = time.perf_counter()
    try:
        for item in stream:
            rows, arrays, bad = _rows(item, source, shapes)
            if crops is not None:
                _save_crops(crops, source, item.batch, item.rows)
            if writer is not None:
                writer.write(rows, arrays)
            scored, failed = scored + len(rows) - bad, failed + bad
            if progress is not None:
                progress(len(rows))
        finished = True
    finally:
        stream.close()
        if own:
            writer.close(finished)
    return Summary(scored, failed, len(done), time.perf_counter() - start, Path(writer.path) if writer else None)


def score_array(scorer: BatchScorer, images: np.ndarray, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Returns the scorer's outputs for (N, H, W, C) uint8 RGB images at its input size, rows in order.

    Batches of one fixed size (the tail padded), double-buffered: one compilation for any N.
    """
    images = np.asarray(images)
    padded = scorer.padded_size(batch_size)
    n = images.shape[0]
    pending, parts = None, []
    for lo in range(0, n, padded):
        chunk = images[lo : lo + padded]
        if chunk.shape[0] < padded:
            chunk = np.concatenate([chunk, np.zeros((padded - chunk.shape[0], *images.shape[1:]), images.dtype)])
        dispatched = (min(padded, n - lo), scorer.dispatch(chunk))
        if pending is not None:
            parts.append((pending[0], scorer.fetch(pending[1])))
        pending = dispatched
    if pending is not None:
        parts.append((pending[0], scorer.fetch(pending[1])))
    if not parts:
        raise ValueError("score_array needs at least one image.")
    return {key: np.concatenate([got[key][:k] for k, got in parts]) for key in parts[0][1]}


def _decode(item) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    if isinstance(item, (str, os.PathLike, bytes)):
        return read_image(item if isinstance(item, bytes) else Path(item))
    raise ImageError(f"expected an image array, a path or encoded bytes, got {type(item).__name__}")


def score_iter(
    scorer: BatchScorer,
    items: Iterable,
    *,
    batch_size: int = 64,
    size: int | None = None,
    color: str = "rgb",
    align: str = "none",
    detector=None,
    workers: int = 4,
    window: int = 8,
) -> Iterator[Result]:
    """Yields one Result per item, in order: items are arrays, paths or encoded bytes, or (id, item) pairs.

    id = the pair's id, else the path, else the item's position. Up to `window` batches of items
    are held at a time (the double buffer runs within each window), so any iterable streams.
    """
    size = _image_size(scorer, size)
    padded = scorer.padded_size(batch_size)
    it = iter(items)
    position = 0
    while True:
        chunk = []
        for item in it:
            ident, thing = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if ident is None:
                ident = str(thing) if isinstance(thing, (str, os.PathLike)) else str(position)
            chunk.append((str(ident), thing))
            position += 1
            if len(chunk) == padded * window:
                break
        if not chunk:
            return
        source = Source("items", [i for i, _ in chunk], None, lambda k, c=chunk: _decode(c[k][1]))
        stream = scored_batches(
            scorer, source, batch_size=padded, size=size, color=color, align=align, detector=detector, workers=workers
        )
        for item in stream:
            result, batch = item.result, item.batch
            for row, index in enumerate(batch.indices):
                ok = bool(batch.valid[row])
                extra = {
                    key: result[key][row] if ok else None for key in ("embedding", "patch_quality") if key in result
                }
                quality = float(result["quality"][row]) if ok else None
                yield Result(source.ids[index], quality, batch.errors[row], **extra)


def score_folder(scorer: BatchScorer, folder: str | os.PathLike, out: str | os.PathLike | None, **options) -> Summary:
    """Scores every PNG/JPEG/WEBP under `folder` into `out` (see `score_source` for the options)."""
    from vitnt_jax.sources import image_folder

    return score_source(scorer, image_folder(folder), out, **options)


# ----------------------------------------------------------------------------------------------- whole runs


class Progress:
    """tqdm on a terminal (images/s, ETA) when `bar`; else a log line every 30 s (batch-job logs)."""

    def __init__(self, total: int | None, bar: bool | None = None):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.update(n)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= 30:
            self.last = now
            rate = self.done / (now - self.start)
            if self.total is None:  # inputs counted only as they are read (tar shards)
                logger.info("%d images, %.1f images/s", self.done, rate)
                return
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("%d/%d images, %.1f images/s, ETA %.0f s", self.done, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def crop_name(index: int, image_id: str) -> str:
    """Returns the file name of a saved crop: '<index, 8+ digits>_<file-safe id>.png'.

    The source index makes names unique (the first '_' ends it); the id part keeps letters,
    digits, '.', '-' and '_' (anything else becomes '_'), drops an image suffix, and is cut at 100
    characters.
    """
    import re

    stem = image_id[: image_id.rfind(".")] if image_id.lower().endswith(IMAGE_SUFFIXES) else image_id
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "image"
    return f"{index:08d}_{safe}.png"


def _save_crops(folder: Path, source: Source, batch: Batch, n: int) -> None:
    for row, index in enumerate(batch.indices[:n]):
        if batch.valid[row]:
            path = folder / crop_name(index, source.ids[index])
            try:
                _write_png(path, batch.images[row])
            except OSError as error:
                raise JobError(
                    f"cannot write {path} ({error.strerror or error}); free space or choose another "
                    + "{save_aligned}.",
                    field="save_aligned",
                ) from error


def _write_png(path: Path, image: np.ndarray) -> None:
    """Writes `image` as the PNG `path`: into a new file beside it, renamed onto the name at the end, so a link
    already there is replaced and never written through, and no half crop is ever left under the name."""
    from PIL import Image

    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # as a plainly created file (mkstemp makes it 0600)
            Image.fromarray(image).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_writable(name: str, path: Path) -> None:
    """Raises JobError unless a file can be created at `path` (checked before any work starts)."""
    slot = "{" + name + "} "
    if path.is_dir():
        raise JobError(slot + f"{path} is a folder; give a file path.", field=name)
    kind = _special_kind(path)
    if kind is not None:  # opening one would wait on it (a FIFO) or write into a device
        raise JobError(slot + f"{path} is {kind}, not a file; give a file path.", field=name)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JobError(slot + f"{path} lies under {parent}, which is a file; choose another path.", field=name)
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise JobError(slot + f"{path} is not writable (permission denied); choose another path.", field=name)


def _special_kind(path: Path) -> str | None:
    """Returns what `path` is when it exists and is neither a regular file nor a folder (e.g. 'a named pipe')."""
    kind = files.file_kind(path)
    return None if kind == "a folder" else kind


def _make_folder(name: str, folder: Path) -> None:
    """Creates `folder` (and its parents) or raises JobError naming the problem."""
    slot = "{" + name + "} "
    if folder.exists() and not folder.is_dir():
        raise JobError(slot + f"{folder} is a file; give a folder path.", field=name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise JobError(
            "cannot create " + slot + f"{folder} ({error.strerror}); choose another folder.", field=name
        ) from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise JobError(slot + f"{folder} is not writable (permission denied); choose another folder.", field=name)


def _refuse_existing(job: Job, processes: int) -> None:
    """Raises a UserError for an existing result the job neither resumes nor overwrites, before any model loads.

    Also creates the crops folder. A multi-process run's parts are checked again by their writers.
    """
    if not (job.resume or job.overwrite):
        if processes == 1:
            refuse_existing(job.out)
        names = [n for n in ("save_embeddings", "save_patch_quality") if getattr(job, n) is not None]
        for name in names + (["out"] if processes > 1 else []):
            path = getattr(job, name)
            if path.exists():
                raise JobError(
                    f"{path} already exists; pass " + "{overwrite} or {resume}, or choose another path.",
                    field=name,
                    also=("overwrite", "resume"),
                )
    if job.save_aligned is not None:
        _make_folder("save_aligned", job.save_aligned)
        if not (job.resume or job.overwrite) and any(job.save_aligned.glob("*.png")):
            raise JobError(
                "{save_aligned} " + f"{job.save_aligned} already holds crops; pass " + "{overwrite} or {resume}, "
                "or choose an empty folder.",
                field="save_aligned",
                also=("overwrite", "resume"),
            )


def _detector(job: Job, align: str):
    """Returns the MTCNN detector for align 'mtcnn' (None otherwise)."""
    if align != "mtcnn":
        for name in ("mtcnn_weights", "min_face_size"):
            if getattr(job, name) is not None:
                raise JobError(
                    "{" + name + "} only applies to {align} mtcnn, " + f"but this run aligns with {align!r}.",
                    field=name,
                    also=("align",),
                )
        return None
    from vitnt_jax import models, mtcnn

    size = job.min_face_size if job.min_face_size is not None else mtcnn.DEFAULT_MIN_FACE
    try:
        # The named-model layer converts the default weights; the detector only reads a weights file.
        return mtcnn.Detector.load(models.mtcnn_weights(job.mtcnn_weights), min_face_size=size)
    except (mtcnn.MTCNNError, models.ModelError) as error:
        raise JobError(error.template, field="mtcnn_weights") from error  # the command line names the setting


def _span(blocks: tuple[int, ...]) -> str:
    if list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


def _initialize(job: Job) -> tuple[int, int]:
    """Joins the job's process group (if any); returns (process index, process count)."""
    from vitnt_jax import distributed

    try:
        return distributed.initialize(
            job.num_processes,
            job.process_id,
            job.coordinator,
            job.distributed,
            timeout_s=min(job.process_timeout, distributed.CONNECT_TIMEOUT_S),
        )
    except distributed.DistributedError as error:
        if job.num_processes is None:
            raise JobError("{distributed} " + str(error), field="distributed") from error
        raise


def _inputs_identity(rendered: Sequence[str]) -> str:
    """Returns '<count> inputs, sha256 <hex of their ids>': the same source on every process of a run."""
    import hashlib

    digest = hashlib.sha256()
    for text in rendered:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return f"{len(rendered)} inputs, sha256 {digest.hexdigest()}"


def _refuse_mixed_settings(job: Job, processes: int, settings: dict[str, Any]) -> None:
    """Raises JobError when another process scored its part with other settings than process 0 (its part's record).

    Each process records its settings beside its part (`fingerprint.write` of the part path); a part scored
    with another model, blocks, source colour, ... must never be merged with process 0's rows.
    """
    for i in range(1, processes):
        part = part_path(job.out, i, processes)
        recorded = fingerprint.read(part)
        keys = (*fingerprint.KEYS, "inputs")  # the source too: each process reads its share of one list of inputs
        changed = fingerprint.differences(settings, recorded, keys) if recorded is not None else []
        if recorded is not None and not changed:
            continue
        shown = ["{" + k + "}" if k in fingerprint.KEYS else "the inputs (another source)" for k in changed]
        what = "recorded no settings beside it" if recorded is None else "differing: " + ", ".join(shown)
        changed = [k for k in changed if k in fingerprint.KEYS]
        fix = (
            "start every process with the same flags and rerun all of them with {overwrite} (or remove "
            + f"{part} and its arrays, then rerun all with "
            + "{resume})."
        )
        raise JobError(
            f"process {i} scored its part with other settings than process 0 ({what}); nothing was merged: " + fix,
            field="overwrite",
            also=("resume", *changed),
        )


def _wait_for_processes(job: Job, processes: int, work: str, kept: str) -> None:
    """Process 0: waits (bounded) for every process's end-of-run status; JobError naming the first that failed.

    work: what each process finishes ('its part'); kept: what stays for a resume ('every part').
    """
    from vitnt_jax import distributed

    def waiting(process: int, seconds: float) -> None:
        logger.info("waiting for process %d to finish %s (%.0f s)", process, work, seconds)

    statuses = distributed.wait_for_all(processes, job.process_timeout, waiting)
    failed = next((i for i in sorted(statuses) if statuses[i] != "ok"), None)
    if failed is not None:
        raise JobError(
            f"process {failed} {statuses[failed]}; nothing was merged and {kept} is kept: fix it and rerun all "
            "processes with {resume}.",
            field="resume",
        )


def _wait_and_merge(job: Job, processes: int, settings: dict[str, Any]) -> None:
    from vitnt_jax.output import merge_parts

    _wait_for_processes(job, processes, "its part", "every part")
    _refuse_mixed_settings(job, processes, settings)
    arrays = [p for p in (job.save_embeddings, job.save_patch_quality) if p is not None]
    rows = merge_parts(job.out, processes, job.format, arrays, append=job.resume and job.out.exists())
    for i in range(processes):  # the merged table's own record stands for them now
        fingerprint.settings_path(part_path(job.out, i, processes)).unlink(missing_ok=True)
    logger.info("merged %d parts (%d new rows) into %s", processes, rows, job.out)


def _rendered_ids(source: Source) -> list[str]:
    """Returns every id of `source` as a result file writes it; raises SourceError when two come out the same."""
    rendered = [render_id(i) for i in source.ids]
    if len(set(rendered)) != len(rendered):
        seen: dict[str, int] = {}
        for k, text in enumerate(rendered):
            if text in seen:
                first, second, written = (sources.shown(t) for t in (source.ids[seen[text]], source.ids[k], text))
                raise SourceError(
                    f"{source.name} holds {first} and {second}, which a result file writes as the same id {written}; "
                    "rename one of them."
                )
            seen[text] = k
    return rendered


def _outputs(job: Job, process: int, processes: int) -> list[tuple[str, Path]]:
    """Returns (setting, path) of every file this process writes: its table and arrays (parts when several
    processes run), and for process 0 the final files it merges into."""
    named = [(n, getattr(job, n)) for n in ("out", "save_embeddings", "save_patch_quality") if getattr(job, n)]
    mine = [(n, part_path(p, process, processes) if processes > 1 else p) for n, p in named]
    return mine + (named if processes > 1 and process == 0 else [])


def _refuse_links(job: Job, process: int, processes: int) -> None:
    """Raises JobError for an output path that is a symbolic link (a result is never written through a link)."""
    # Each output and the files written on the way to it: an array's rows and its finished .npy, a merge's result.
    steps = {"out": ("", ".merging"), "save_embeddings": ("", ".partial", ".tmp.npy", ".merging.npy")}
    paths = []
    for name, path in _outputs(job, process, processes):
        paths += [(name, path.with_name(path.name + s)) for s in steps.get(name, steps["save_embeddings"])]
    if process == 0:
        paths.append(("out", fingerprint.settings_path(job.out)))
    if processes > 1:
        paths.append(("out", fingerprint.settings_path(part_path(job.out, process, processes))))
    for name, path in paths:
        if path.is_symlink():
            raise JobError(
                "{" + name + "} " + f"{path} is a symbolic link (to {os.readlink(path)}); results are never written "
                "through a link: remove it, or give the file it points to.",
                field=name,
            )


def _hold_locks(job: Job, process: int, processes: int, held: contextlib.ExitStack) -> None:
    """Takes, for the whole run, the lock of every output this process writes (and process 0 the merged ones).

    Taken before anything is removed, truncated or written, so a second run on the same outputs (fresh,
    resumed or overwriting) is refused in one line and the first one's rows stay as they are.
    """
    for name, path in _outputs(job, process, processes):
        path.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock_output(path, name))
    if job.save_aligned is not None and process == 0:
        _make_folder("save_aligned", job.save_aligned)
        held.enter_context(lock_output(job.save_aligned, "save_aligned"))


def _as_job_error(error: UserError, field: str) -> JobError:
    main = error.field or field
    return JobError(error.template, field=main, also=tuple(f for f in error.fields if f != main))


def _resolve_model(job: Job):
    """Returns (checkpoint folder, config, metadata, selected blocks) of the job's model, loading no weights.

    Named models are converted once (see `vitnt_jax.models`); a model or block selection that cannot
    work is a JobError before any source is opened.
    """
    from vitnt_jax import checkpoint, models
    from vitnt_jax.selection import parse_blocks

    try:
        model_dir = models.resolve(job.model if job.model is not None else models.DEFAULT_MODEL)
        config, meta = checkpoint.load_config(model_dir)
    except (models.ModelError, checkpoint.CheckpointError) as error:
        raise _as_job_error(error, "model") from error
    try:
        blocks = parse_blocks(job.blocks if job.blocks is not None else config.default_blocks, config.depth)
    except ValueError as error:
        raise JobError(str(error), field="blocks") from error
    if job.save_embeddings is not None and config.head == "none":
        raise JobError(
            f"model {config.name} has no embedding head; drop " + "{save_embeddings}.", field="save_embeddings"
        )
    return model_dir, config, meta, blocks


def _job_scorer(job: Job, model_dir) -> Any:
    """Returns the scorer of the job's model and method (what both kinds of run compile)."""
    return load_scorer(
        model_dir,
        blocks=job.blocks,
        alpha=job.alpha,
        metric=job.metric,
        aggregation=job.aggregation,
        attention=job.attention,
        embeddings=job.save_embeddings is not None,
        patch_quality=job.save_patch_quality is not None,
        precision=job.precision,
        dtype=job.dtype,
        parallel=job.parallel,
        micro_batch=job.micro_batch,
        attention_kernel=job.attention_kernel,
    )


def _method_settings(job: Job, model: dict, blocks: tuple[int, ...]) -> dict[str, Any]:
    """Returns the settings that decide a score and are known before the source opens (`vitnt_jax.fingerprint`)."""
    return {
        "model": model,
        "blocks": list(blocks),
        "alpha": float(job.alpha),
        "metric": job.metric,
        "aggregation": job.aggregation,
        "attention": job.attention if job.aggregation == "attention" else None,  # mean aggregation reads none
        "dtype": job.dtype,
        "precision": job.precision,
    }


def _input_settings(job: Job, color: str, align: str) -> dict[str, Any]:
    """Returns the settings that decide a score and depend on the source (its default colour and alignment)."""
    if align != "mtcnn":
        return {"color": color, "align": align, "mtcnn_weights": None, "min_face_size": None}
    from vitnt_jax.mtcnn import DEFAULT_MIN_FACE

    weights = fingerprint.file_identity(job.mtcnn_weights) if job.mtcnn_weights is not None else "default"
    size = float(job.min_face_size if job.min_face_size is not None else DEFAULT_MIN_FACE)
    return {"color": color, "align": align, "mtcnn_weights": weights, "min_face_size": size}


def _holds_rows(job: Job, processes: int) -> bool:
    """Returns whether rows of an earlier run may exist: in the result file or any part of it.

    A file holding its header only (an --overwrite stopped before its first batch) holds none, so its
    old settings record does not stand in the way of resuming it with others.
    """
    paths = [job.out]
    if processes > 1:
        paths += job.out.parent.glob(glob.escape(job.out.name) + ".part*-of-*")
    form = FORMATS[job.format]
    headers = (form.header(False), form.header(True))
    for path in paths:
        try:
            with open(files.open_regular(path), "rb") as f:  # never waits on a FIFO
                start = f.read(4096).decode("utf-8", "replace")
        except FileNotFoundError:
            continue
        except OSError:  # not a result at all (a FIFO, a device: files.NotRegularFileError): the writer says so
            return True
        if not any(h.startswith(start) for h in headers):
            return True
    return False


def run(job: Job, *, progress_bar: bool | None = None) -> Summary:
    """Runs a scoring job (this process's share of it in a multi-process run); returns what it did.

    Checks run cheapest first: the job's fields (when it is made), the output paths, the output locks,
    existing results, the model and its block selection (no weights loaded), a resumed result's recorded
    settings; then the source is opened, and only then are the weights loaded and compiled. Every output
    is locked for the whole run (process 0 keeps the merged files' locks through the merge).

    Multi-process: every process reports success or its error (`vitnt_jax.distributed`), and process 0
    merges the parts into `job.out` once all succeeded, or raises JobError naming the failed one;
    every wait is bounded by `job.process_timeout` (DistributedError when a process never reports).
    progress_bar: tqdm bar (default: when stderr is a terminal), else a log line every 30 s.
    """
    from vitnt_jax import cache

    # JAX's persistent compilation cache (vitnt_jax.cache): a rerun, and every host of a pod, loads the programs.
    with cache.compile_cache(job.compile_cache):
        return _run(job, progress_bar)


def _run(job: Job, progress_bar: bool | None) -> Summary:
    from vitnt_jax import distributed

    process, processes = _initialize(job)
    if job.chunked:
        return _run_chunked(job, process, processes, progress_bar)
    with contextlib.ExitStack() as held:
        if processes == 1:
            return _run_part(job, 0, 1, progress_bar, held, {})
        recorded: dict[str, Any] = {}
        try:
            summary = _run_part(job, process, processes, progress_bar, held, recorded)
        except BaseException as error:
            reason = str(error) if isinstance(error, UserError) else type(error).__name__
            distributed.report(process, f"failed: {reason}", timeout_s=job.process_timeout)
            raise
        distributed.report(process, "ok", timeout_s=job.process_timeout)
        if process == 0:
            _wait_and_merge(job, processes, recorded)
        return summary


def _writer(out: Path, job: Job, source: Source, arrays) -> ResultWriter:
    try:
        return ResultWriter(
            out,
            fmt=job.format,
            with_label=source.labels is not None,
            arrays=arrays,
            resume=job.resume,
            overwrite=job.overwrite,
            lock=False,  # this run holds the locks of the table and its arrays already (see _hold_locks)
        )
    except OSError as error:
        raise JobError(
            f"cannot write {error.filename or out} ({error.strerror}); choose a writable " + "{out}.", field="out"
        ) from error


def _run_part(
    job: Job,
    process: int,
    processes: int,
    progress_bar: bool | None,
    held: contextlib.ExitStack,
    recorded: dict[str, Any],
) -> Summary:
    """Scores this process's share of the job (see `run`); fills `recorded` with the settings it recorded."""
    from vitnt_jax import checkpoint

    if job.align is not None and job.align != "mtcnn":
        _detector(job, job.align)  # MTCNN-only flags without MTCNN: flags first (later, the source's default)
    for name, path in _outputs(job, process, processes):
        _check_writable(name, path)
    _refuse_links(job, process, processes)
    _hold_locks(job, process, processes, held)
    _refuse_existing(job, processes)
    model_dir, config, meta, blocks = _resolve_model(job)
    weights = checkpoint.describe(model_dir)
    settings = _method_settings(job, fingerprint.model_identity(model_dir, meta, weights), blocks)
    resuming = job.resume and _holds_rows(job, processes)
    if resuming:
        fingerprint.check(job.out, settings, fingerprint.BEFORE_SOURCE)

    source = job.source.open()
    for problem in source.problems:
        if job.on_error == "fail":
            raise JobError(f"{problem} (" + "{on_error} fail).", field="on_error")
        logger.warning("%s", problem)
    rendered = _rendered_ids(source)
    color = job.color or source.color or "rgb"
    align = job.align or source.align or "none"
    settings.update(_input_settings(job, color, align))
    if resuming:
        fingerprint.check(job.out, settings)
        if process == 0 and fingerprint.read(job.out) is None:
            logger.warning(
                "%s records no scoring settings (written by an older version): resuming it as if its rows were "
                "scored with this run's settings",
                job.out,
            )
    detector = _detector(job, align)
    embed = job.save_embeddings is not None
    scorer = _job_scorer(job, model_dir)
    config = scorer.config
    batch_size = scorer.padded_size(job.batch_size)

    # This process's contiguous share of the source; parts concatenate in source order.
    lo, hi = len(source) * process // processes, len(source) * (process + 1) // processes
    out = part_path(job.out, process, processes) if processes > 1 else job.out
    arrays: dict[str, tuple[Path, tuple[int, ...]]] = {}
    if embed:
        arrays["embedding"] = (job.save_embeddings, (config.embedding_dim,))
    if job.save_patch_quality is not None:
        arrays["patch_quality"] = (job.save_patch_quality, (config.grid_size, config.grid_size))
    if processes > 1:
        arrays = {k: (part_path(p, process, processes), s) for k, (p, s) in arrays.items()}
    writer = _writer(out, job, source, arrays)
    try:
        if process == 0:
            if processes > 1 and job.overwrite:
                # The merged files of the run being replaced go now: resuming this run must never count their rows.
                for path in (job.out, job.save_embeddings, job.save_patch_quality):
                    if path is not None:
                        path.unlink(missing_ok=True)
            fingerprint.write(job.out, settings)  # after the table is truncated or resumed, never before
        if processes > 1:
            # Beside the part, with what every process must read alike: process 0 merges only parts scored as its own.
            recorded.update(settings, inputs=_inputs_identity(rendered))
            fingerprint.write(out, recorded)
    except OSError as error:
        writer.close(False)
        raise JobError(
            f"cannot write {fingerprint.settings_path(out)} ({error.strerror or error}); choose a writable " + "{out}.",
            field="out",
        ) from error
    done = set(writer.done_ids)
    if processes > 1 and job.resume and job.out.exists():
        # A finished multi-process run: its merged rows count as written; new rows are appended.
        done |= set(read_ids(job.out, job.format, columns(source.labels is not None)))
    todo = [k for k in range(lo, hi) if rendered[k] not in done]

    dev = f"{scorer.num_devices} {scorer.devices[0].platform} device{'s' * (scorer.num_devices > 1)}"
    where = f" (process {process + 1}/{processes}: inputs {lo}..{hi - 1})" if processes > 1 else ""
    method = job.aggregation + ("/" + job.attention if job.aggregation == "attention" else "")
    skipping = f", skipping {len(done)} already written" if done else ""
    # The run's first line (every check has passed): the weights actually used, then what is scored with them.
    logger.info("model %s: %s", config.name, weights)
    logger.info(
        f"scoring {len(todo)} of {len(source)} inputs from {source.name}{where} with {config.name} on {dev}, "
        f"batch {batch_size}, blocks {_span(scorer.settings.blocks)}, alpha {job.alpha:g}, {method}, "
        f"{job.metric}, align {align}{skipping}"
    )
    progress = Progress(len(todo), progress_bar)
    finished = False
    try:
        try:
            summary = score_source(
                scorer,
                source,
                writer,
                indices=todo,
                batch_size=batch_size,
                size=config.img_size,
                color=color,
                align=align,
                detector=detector,
                workers=job.workers,
                on_error=job.on_error,
                crops=job.save_aligned,
                progress=progress,
            )
        except InputError as error:
            raise InputError(
                f"{error.id}: {error.reason} (" + "{on_error} fail); the rows before it are in " + f"{out}: "
                "rerun with {resume} once it is fixed.",
                id=error.id,
                reason=error.reason,
                field="on_error",
                also=("resume",),
            ) from error
        finished = True
    finally:
        progress.close()
        writer.close(finished)
    summary = Summary(summary.scored, summary.failed, len(done), summary.seconds, out)
    logger.info(f"scored {summary.scored}, failed {summary.failed}, {summary.rate:.1f} images/s -> {out}")
    return summary


# ------------------------------------------------------------------------------------------- chunked runs


def _run_chunked(job: Job, process: int, processes: int, progress_bar: bool | None) -> Summary:
    """Runs this process's share of a chunked job (see `vitnt_jax.chunked`); process 0 merges at the end."""
    from vitnt_jax import distributed

    with contextlib.ExitStack() as held:
        if process == 0:  # a local result is locked for the whole run, merge included (object storage has no locks)
            for name in URL_FIELDS:
                if getattr(job, name) is not None:
                    held.enter_context(chunked.local_lock(getattr(job, name), name))
        try:
            summary, plan = _chunked_part(job, process, processes, progress_bar)
        except BaseException as error:
            if processes > 1:
                reason = str(error) if isinstance(error, UserError) else type(error).__name__
                distributed.report(process, f"failed: {reason}", timeout_s=job.process_timeout)
            raise
        if processes > 1:
            distributed.report(process, "ok", timeout_s=job.process_timeout)
            if process != 0:
                return summary
            _wait_for_chunks(job, processes, plan)
        if process == 0 and plan is not None:
            _merge_chunks(job, plan)
        return summary


@dataclass
class _Plan:
    settings: dict[str, Any]
    pieces: int
    with_label: bool
    arrays: dict[str, tuple[Any, tuple[int, ...]]]
    sizes: list[int | None]


def _chunk_outputs(job: Job) -> list[tuple[str, Any]]:
    return [(n, getattr(job, n)) for n in URL_FIELDS if getattr(job, n) is not None]


def _prepare_chunks(job: Job, process: int, folder: str) -> dict[str, Any] | None:
    """Checks and clears what an earlier run left (as resume/overwrite ask); returns the recorded plan settings."""
    plan_path, merged_path = storage.join(folder, chunked.PLAN), storage.join(folder, chunked.MERGED)
    for name, path in _chunk_outputs(job):  # refused before any work, not when the merge comes to write them
        local = storage.local_path(path)
        if local is not None and os.path.islink(local):
            raise JobError(
                f"{path} is a symbolic link; refusing to write through it: pass the file itself as {{{name}}}.",
                field=name,
            )
        if storage.is_folder(path):
            raise JobError(f"{path} is a folder; pass a file name as {{{name}}}.", field=name)
    local = storage.local_path(folder)
    if local is not None and os.path.islink(local):
        raise JobError(
            f"{folder} (where the chunks of {job.out} go) is a symbolic link; refusing to write through it: remove "
            "it or choose another {out}.",
            field="out",
        )
    try:
        storage.makedirs(folder)
    except OSError as error:
        raise JobError(
            f"cannot create {folder} ({error.strerror or error}); choose a writable " + "{out}.", field="out"
        ) from error
    if job.overwrite:
        if process == 0:  # the finished result being replaced goes first: a resume must never count its rows
            for name, path in _chunk_outputs(job) + [("out", merged_path)]:
                try:
                    storage.remove(path)
                except OSError as error:
                    raise JobError(
                        f"cannot remove {path} to replace it ({getattr(error, 'strerror', None) or error}); make it "
                        "writable or choose another " + "{" + name + "}.",
                        field=name,
                    ) from error
        return None
    recorded = chunked.read_record(plan_path)
    if not job.resume:
        for name, path in _chunk_outputs(job) + [("out", merged_path)]:
            if storage.exists(path):  # every process: a late one must not score pieces of a finished result
                raise JobError(
                    f"{path} already exists; pass " + "{resume} to continue it, {overwrite} to replace it, or choose "
                    "another {out}.",
                    field=name if name != "out" or path != merged_path else "out",
                    also=("resume", "overwrite"),
                )
    return recorded


def _chunked_part(job: Job, process: int, processes: int, progress_bar: bool | None) -> tuple[Summary, _Plan | None]:
    """Scores this process's uncommitted pieces; returns its Summary and the plan (None: the run was complete)."""
    from vitnt_jax import checkpoint
    from vitnt_jax.output import OutputError

    if job.align is not None and job.align != "mtcnn":
        _detector(job, job.align)  # MTCNN-only flags without MTCNN: flags first
    out = job.out
    folder = chunked.chunks_dir(out)
    recorded = _prepare_chunks(job, process, folder)
    model_dir, config, meta, blocks = _resolve_model(job)
    weights = checkpoint.describe(model_dir)
    settings = _method_settings(job, fingerprint.model_identity(model_dir, meta, weights), blocks)
    if recorded is not None:
        chunked.refuse_other_settings(str(out), recorded, {**recorded, **settings})
    piece_rows = job.chunk_rows or (recorded or {}).get("piece_rows") or chunked.DEFAULT_PIECE_ROWS

    pieces = job.source.open_pieces(piece_rows)
    for problem in pieces.problems:
        if job.on_error == "fail":
            raise JobError(f"{problem} (" + "{on_error} fail).", field="on_error")
        logger.warning("%s", problem)
    color = job.color or pieces.color or "rgb"
    align = job.align or pieces.align or "none"
    settings.update(_input_settings(job, color, align))
    shapes: dict[str, tuple[int, ...]] = {}
    if job.save_embeddings is not None:
        shapes["embedding"] = (config.embedding_dim,)
    if job.save_patch_quality is not None:
        shapes["patch_quality"] = (config.grid_size, config.grid_size)
    settings.update(
        inputs=pieces.identity,
        piece_rows=piece_rows,
        format=job.format,
        with_label=pieces.with_label,
        arrays={k: list(v) for k, v in shapes.items()},
    )
    settings = json.loads(json.dumps(settings))  # as a record reads back (tuples are lists there)
    if recorded is not None:
        chunked.refuse_other_settings(str(out), recorded, settings)
    if job.resume and storage.exists(storage.join(folder, chunked.MERGED)) and storage.exists(out):
        logger.info("%s is complete already (every piece is merged); nothing to score", out)
        return Summary(0, 0, 0, 0.0, out), None
    n = len(pieces)
    lo, hi = n * process // processes, n * (process + 1) // processes
    if job.overwrite:  # this process's share is cleared before the listing: another run's chunks there are not counted
        try:
            if process == 0:  # the records of an earlier run's processes (another count): this run writes its own
                for path, count in chunked.process_records(folder):
                    if count != processes:
                        storage.remove(path)
            chunked.remove_pieces(folder, lo, hi)
        except OSError as error:
            raise JobError(
                f"cannot remove the old chunks in {folder} ({getattr(error, 'strerror', None) or error}); fix the "
                "storage and rerun with {overwrite}.",
                field="overwrite",
            ) from error
    done = chunked.committed(folder, job.format)
    if job.overwrite:
        done = {i: r for i, r in done.items() if not lo <= i < hi}
    elif not job.resume and any(lo <= i < hi for i in done):
        raise JobError(
            f"{folder} already holds committed pieces of this run's share; pass " + "{resume} to continue them, "
            "{overwrite} to replace them, or choose another {out}.",
            field="out",
            also=("resume", "overwrite"),
        )
    if not job.overwrite:  # a process of an earlier try scored with other flags: its pieces must not join these
        chunked.refuse_other_processes(folder, settings)
    try:
        if recorded is None:
            chunked.write_record(storage.join(folder, chunked.PLAN), settings, n)
        if processes > 1:
            chunked.write_record(chunked.process_record(folder, process, processes), settings, n)
    except OSError as error:
        raise JobError(
            f"cannot write the plan of {out} in {folder} ({getattr(error, 'strerror', None) or error}); choose a "
            "writable {out}.",
            field="out",
        ) from error
    todo = [pieces.pieces[i] for i in range(lo, hi) if i not in done]
    skipped = sum(r for i, r in done.items() if lo <= i < hi)
    arrays = {"embedding": job.save_embeddings, "patch_quality": job.save_patch_quality}
    plan = _Plan(
        settings, n, pieces.with_label, {k: (arrays[k], s) for k, s in shapes.items()}, [p.size for p in pieces.pieces]
    )

    detector = _detector(job, align)
    scorer = _job_scorer(job, model_dir)
    batch_size = scorer.padded_size(job.batch_size)
    dev = f"{scorer.num_devices} {scorer.devices[0].platform} device{'s' * (scorer.num_devices > 1)}"
    where = f" (process {process + 1}/{processes}: pieces {lo}..{hi - 1})" if processes > 1 else ""
    method = job.aggregation + ("/" + job.attention if job.aggregation == "attention" else "")
    sizes = [p.size for p in todo]
    counted = None if any(s is None for s in sizes) else sum(sizes)
    logger.info("model %s: %s", scorer.config.name, weights)
    logger.info(
        f"scoring {len(todo)} of {n} pieces ({'?' if counted is None else counted} inputs) from {pieces.name}{where} "
        f"with {scorer.config.name} on {dev}, batch {batch_size}, blocks {_span(scorer.settings.blocks)}, "
        f"alpha {job.alpha:g}, {method}, {job.metric}, align {align}, chunks in {folder}"
        + (f", skipping {skipped} rows already committed" if skipped else "")
    )

    def read(piece: sources.Piece) -> Source:
        try:
            source = piece.read()
        except OSError as error:  # the storage failed under the run (a dropped connection, a file gone)
            raise JobError(
                f"cannot read {piece.name} of {pieces.name} ({getattr(error, 'strerror', None) or error}); the "
                "pieces before it are committed: rerun with {resume} once it can be read.",
                field="resume",
            ) from error
        for problem in source.problems:  # inputs of the piece that could not even be listed (a link in a shard)
            logger.warning("%s: %s", piece.name, problem)
        if piece.size is not None and len(source.ids) != piece.size:  # a row lost or added: the plan is no more
            raise JobError(
                f"{piece.name} of {pieces.name} holds {len(source.ids)} inputs, not the {piece.size} planned: the "
                "source changed under the run; restore it, or score it again with {overwrite}.",
                field="overwrite",
            )
        _rendered_ids(source)  # two ids written alike are refused, as for any source
        if job.format != "parquet":
            try:
                check_ids(source.ids, job.format)
            except OutputError as error:  # known only once the piece is read: the pieces before it are committed
                raise JobError(
                    error.template.rstrip(".")
                    + f" (in {piece.name} of {pieces.name}, after the pieces before it were committed in "
                    "this format: rerun with {overwrite}).",
                    field=error.field,
                    also=(*error.fields[1:], "overwrite"),
                ) from error
        return source

    progress = Progress(counted, progress_bar)
    scored = failed = 0
    start = time.perf_counter()
    try:
        for piece, source in chunked.prefetched(todo, read):
            collector = chunked.Collector(shapes)
            try:
                part = score_source(
                    scorer,
                    source,
                    collector,
                    batch_size=batch_size,
                    size=scorer.config.img_size,
                    color=color,
                    align=align,
                    detector=detector,
                    workers=job.workers,
                    on_error=job.on_error,
                    progress=progress,
                )
            except InputError as error:
                raise InputError(
                    f"{error.id}: {error.reason} (" + "{on_error} fail); the pieces before it are committed in "
                    f"{folder}: rerun with " + "{resume} once it is fixed.",
                    id=error.id,
                    reason=error.reason,
                    field="on_error",
                    also=("resume",),
                ) from error
            try:
                chunked.commit(folder, piece.index, collector, job.format, pieces.with_label)
            except OSError as error:
                raise JobError(
                    f"cannot write piece {piece.index} to {folder} ({getattr(error, 'strerror', None) or error}); the "
                    "pieces before it are committed: fix the storage and rerun with {resume}.",
                    field="resume",
                ) from error
            scored, failed = scored + part.scored, failed + part.failed
    finally:
        progress.close()
    summary = Summary(scored, failed, skipped, time.perf_counter() - start, out)
    logger.info(f"scored {scored}, failed {failed}, {summary.rate:.1f} images/s -> {folder}")
    return summary, plan


def _wait_for_chunks(job: Job, processes: int, plan: _Plan | None) -> None:
    """Process 0: waits for every process's report, then refuses parts scored with other settings."""
    _wait_for_processes(job, processes, "its pieces", "every committed piece")
    if plan is None:
        return
    folder = chunked.chunks_dir(job.out)
    for i in range(1, processes):
        recorded = chunked.read_record(chunked.process_record(folder, i, processes))
        if recorded is None:
            raise JobError(
                f"process {i} recorded no settings in {folder}; nothing was merged: start every process with the "
                "same flags and rerun all of them with {resume}.",
                field="resume",
            )
        changed = fingerprint.differences(plan.settings, recorded, (*fingerprint.KEYS, *chunked.PLAN_KEYS))
        if changed:
            shown = ", ".join("{" + k + "}" if k in fingerprint.KEYS else k.replace("_", " ") for k in changed)
            raise JobError(
                f"process {i} scored its pieces with other settings than process 0 (differing: {shown}); nothing was "
                "merged: start every process with the same flags and rerun all of them with {overwrite}.",
                field="overwrite",
                also=tuple(k for k in changed if k in fingerprint.KEYS),
            )


def _merge_chunks(job: Job, plan: _Plan) -> None:
    folder = chunked.chunks_dir(job.out)
    start = time.perf_counter()
    # Another run started on the same output meanwhile (object storage has no locks) rewrote the plan: its chunks
    # may be among these, so nothing is merged.
    recorded = chunked.read_record(storage.join(folder, chunked.PLAN))
    if recorded is None:
        raise JobError(
            f"{storage.join(folder, chunked.PLAN)} vanished while {job.out} was scored (another run replaced it?); "
            "nothing was merged: rerun with {overwrite}.",
            field="overwrite",
        )
    chunked.refuse_other_settings(str(job.out), recorded, plan.settings)
    chunked.refuse_other_processes(folder, plan.settings)
    try:
        rows = chunked.merge(str(job.out), job.format, plan.with_label, plan.pieces, plan.arrays, sizes=plan.sizes)
    except OSError as error:
        raise JobError(
            f"cannot write {job.out} ({getattr(error, 'strerror', None) or error}); every committed piece is kept: "
            "fix the storage and rerun with {resume}.",
            field="resume",
        ) from error
    merged = storage.join(folder, chunked.MERGED)
    try:
        storage.write_bytes(merged, json.dumps({"rows": rows}).encode() + b"\n")
    except OSError as error:  # the result is whole, but only this record says so: a resume merges it again
        raise JobError(
            f"{job.out} is written but {merged} could not be ({getattr(error, 'strerror', None) or error}); every "
            "committed piece is kept: fix the storage and rerun with {resume} to merge them again.",
            field="resume",
        ) from error
    try:
        chunked.remove_chunks(folder)
    except OSError as error:  # the result is whole: what is left is only clutter
        logger.warning(
            "%s is complete, but its chunks in %s could not all be removed (%s); remove them yourself",
            job.out,
            folder,
            getattr(error, "strerror", None) or error,
        )
    logger.info("merged %d pieces (%d rows) into %s in %.1f s", plan.pieces, rows, job.out, time.perf_counter() - start)
