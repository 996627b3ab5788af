"""The input side shared by the experiment commands: which images, which model, in one place.

The image sources are those of `python -m vitnt_jax.score` (`vitnt_jax.sources.SOURCES`, one flag
each: `--images DIR | --list FILE [--root DIR] | --bin FILE | --tfds NAME[:SPLIT] [...]`), with the
same flags, defaults and errors; `--model` and `--color` are the scorer's too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from vitnt_jax import cli, output, sources

# One parser style for every command: one-line flag errors, exit status 2 (see vitnt_jax.cli).
Parser = cli.Parser


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the source flags of `vitnt_jax.sources` (exactly one source), `--model` and `--color`."""
    sources.add_flags(parser)
    parser.add_argument("--model", default=None, help="named model or converted checkpoint (default: the paper's)")
    parser.add_argument(
        "--color", choices=["rgb", "bgr"], help="channel order of the stored images (default: the source's, rgb)"
    )


def open_inputs(args: argparse.Namespace):
    """Returns (source, config, variables) for the flags of `add_input_flags`; raises ValueError (one sentence).

    The ValueError's cause is the library error (SourceError, ModelError, CheckpointError).
    """
    from vitnt_jax import checkpoint, models

    try:
        source = sources.spec_from_args(args).open()
        config, variables = checkpoint.load(models.resolve(args.model or models.DEFAULT_MODEL))
    except sources.SourceError as error:
        raise ValueError(error.render(cli.flag)) from error
    except (models.ModelError, checkpoint.CheckpointError) as error:
        raise ValueError(str(error)) from error
    if source.align == "mtcnn":  # e.g. --tfds lfw: the experiments read aligned faces only
        raise ValueError(
            f"{source.name} holds unaligned photos; align them first with `python -m vitnt_jax.score ... "
            "--align mtcnn --save-aligned DIR` and pass --images DIR."
        )
    return source, config, variables


def write_scores(
    path: Path, source, quality: Sequence[float], errors: Sequence[str], *, overwrite: bool = False
) -> None:
    """Writes one row per source image to a score CSV, the scorer's own format (`vitnt_jax.output`).

    quality[i] and errors[i] belong to source image i; a row with an error (or a NaN quality) has no
    quality. The file is written whole and atomically; an existing one is refused unless `overwrite`
    (ValueError, one sentence naming --overwrite).
    """
    rows = []
    for i, (value, error) in enumerate(zip(quality, errors, strict=True)):
        label = source.labels[i] if source.labels is not None else None
        good = not error and not math.isnan(float(value))
        rows.append(output.Row(source.ids[i], float(value) if good else None, label, error))
    try:
        output.write_results(path, rows, with_label=source.labels is not None, overwrite=overwrite)
    except output.OutputError as error:
        raise ValueError(error.render(cli.flag)) from error
