"""The input side shared by the experiment commands: which images, which model, in one place."""

from __future__ import annotations

import argparse
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An argument parser whose flag errors are one line (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the image source (`--images | --list [--root] | --bin`), `--model` and `--color` flags."""
    one = parser.add_mutually_exclusive_group(required=True)
    one.add_argument("--images", type=Path, metavar="DIR", help="folder of aligned PNG/JPEG faces (recursive)")
    one.add_argument("--list", type=Path, metavar="FILE", help="text file of image paths, one per line")
    one.add_argument("--bin", type=Path, metavar="FILE", help="insightface verification pack (lfw.bin, ...)")
    parser.add_argument("--root", type=Path, help="with --list: folder the listed paths are relative to")
    parser.add_argument("--model", default=None, help="named model or converted checkpoint (default: the paper's)")
    parser.add_argument("--color", choices=["rgb", "bgr"], help="channel order of the stored images (default: rgb)")


def open_inputs(args: argparse.Namespace):
    """Returns (source, config, variables) for the flags of `add_input_flags`; raises ValueError (one sentence)."""
    from vitnt_jax import checkpoint, models, sources

    try:
        if args.images is not None:
            source = sources.image_folder(args.images)
        elif args.list is not None:
            source = sources.path_list(args.list, args.root)
        else:
            source = sources.insightface_bin(args.bin)
        config, variables = checkpoint.load(models.resolve(args.model or models.DEFAULT_MODEL))
    except (sources.SourceError, models.ModelError, checkpoint.CheckpointError) as error:
        raise ValueError(str(error)) from None
    return source, config, variables
