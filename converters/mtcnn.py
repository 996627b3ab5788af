"""facenet-pytorch's MTCNN (pnet.pt, rnet.pt, onet.pt) -> one vitnt-jax weights file (.npz).

    python -m converters.mtcnn [SRC] DST.npz [--overwrite]

SRC: the folder holding pnet.pt, rnet.pt and onet.pt (facenet_pytorch/data); default: the
installed facenet-pytorch package (`pip install --no-deps facenet-pytorch==2.6.0`; its weights are
read as data, its code is never imported). The files are plain state_dicts read with
`torch.load(weights_only=True)`. Mapping is strict: every missing or unexpected key is named.
The weights are facenet-pytorch's (MIT licence), ported from the original MTCNN Caffe models.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.state_dict import ConversionError, Row, apply_table, conv, identity, linear, read_checkpoint, sha256

# (module name, kind) in each net, in the order of the published modules.
LAYERS = {
    "pnet": [("conv1", "conv"), ("prelu1", "prelu"), ("conv2", "conv"), ("prelu2", "prelu"), ("conv3", "conv"),
             ("prelu3", "prelu"), ("conv4_1", "conv"), ("conv4_2", "conv")],
    "rnet": [("conv1", "conv"), ("prelu1", "prelu"), ("conv2", "conv"), ("prelu2", "prelu"), ("conv3", "conv"),
             ("prelu3", "prelu"), ("dense4", "dense"), ("prelu4", "prelu"), ("dense5_1", "dense"),
             ("dense5_2", "dense")],
    "onet": [("conv1", "conv"), ("prelu1", "prelu"), ("conv2", "conv"), ("prelu2", "prelu"), ("conv3", "conv"),
             ("prelu3", "prelu"), ("conv4", "conv"), ("prelu4", "prelu"), ("dense5", "dense"), ("prelu5", "prelu"),
             ("dense6_1", "dense"), ("dense6_2", "dense"), ("dense6_3", "dense")],
}  # fmt: skip


def table(net: str) -> list[Row]:
    """Returns the (torch key, flax path, transform) rows of one net."""
    rows = []
    for name, kind in LAYERS[net]:
        if kind == "prelu":
            rows.append(Row(f"{name}.weight", f"params/{name}/negative_slope", identity))
        else:
            rows.append(Row(f"{name}.weight", f"params/{name}/kernel", conv if kind == "conv" else linear))
            rows.append(Row(f"{name}.bias", f"params/{name}/bias", identity))
    return rows


def installed_facenet_weights() -> Path | None:
    """Returns the folder of facenet-pytorch's pnet.pt/rnet.pt/onet.pt when the package is installed."""
    import importlib.metadata

    try:
        folder = Path(importlib.metadata.distribution("facenet-pytorch").locate_file("facenet_pytorch/data"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder if all((folder / f"{n}.pt").is_file() for n in LAYERS) else None


def _shapes(net: str) -> dict[str, tuple[int, ...]]:
    from vitnt_jax.mtcnn import flat_variables, variable_shapes

    return {k: tuple(v.shape) for k, v in flat_variables(variable_shapes()[net]).items()}


def convert_state_dicts(states: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Returns {'pnet'|'rnet'|'onet': {'params': ...}} from the three state_dicts, checked strictly."""
    missing = [n for n in LAYERS if n not in states]
    if missing:
        raise ConversionError(f"no state_dict for {', '.join(missing)}; pass all of pnet, rnet and onet.")
    return {
        net: apply_table(states[net], table(net), {}, _shapes(net), f"{net}.pt does not match MTCNN's {net}")
        for net in LAYERS
    }


def convert(src: str | Path | None, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Converts the folder `src` (pnet.pt, rnet.pt, onet.pt; None = installed facenet-pytorch) into `dst`."""
    from vitnt_jax.mtcnn import MTCNNError, check_variables, save_variables

    if src is None:
        src = installed_facenet_weights()
        if src is None:
            raise ConversionError(
                "facenet-pytorch is not installed; `pip install --no-deps facenet-pytorch==2.6.0`, or pass the "
                "folder holding pnet.pt, rnet.pt and onet.pt."
            )
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder; pass the folder holding pnet.pt, rnet.pt and onet.pt.")
    if dst.is_dir():
        raise ConversionError(f"{dst} is a folder; give the path of the .npz file to write.")
    if dst.exists() and not overwrite:
        raise ConversionError(
            f"{dst} already exists; choose another path, or replace it with " + "{overwrite}.", field="overwrite"
        )
    files = {net: src / f"{net}.pt" for net in LAYERS}
    states = {}
    for net, path in files.items():
        state = read_checkpoint(path)
        if not isinstance(state, Mapping):
            raise ConversionError(f"{path} holds a {type(state).__name__}, not a state_dict.")
        states[net] = state
    variables = convert_state_dicts(states)
    try:  # non-float or NaN weights would convert, then find no face anywhere
        check_variables(variables, f"the weights in {src}", "install facenet-pytorch's files again")
    except MTCNNError as error:
        raise ConversionError(str(error)) from error
    origin = ", ".join(f"{p.name} sha256 {sha256(p)[:16]}" for p in files.values())
    try:
        return save_variables(dst, variables, source=f"facenet-pytorch MTCNN ({origin})")
    except OSError as error:
        raise ConversionError(f"cannot write {dst} ({error.strerror or error}); choose another path.") from error


def main(argv: list[str] | None = None) -> int:
    """Converts from the command line; returns 0 written, 1 a conversion error (one line), 2 bad flags."""
    from vitnt_jax import cli

    parser = cli.Parser(
        prog="python -m converters.mtcnn",
        usage="%(prog)s [SRC] DST [--overwrite] [--debug]",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="[SRC] DST",
        help="SRC: folder with pnet.pt, rnet.pt, onet.pt (default: installed facenet-pytorch); DST: .npz to write",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        parser.error("pass at most SRC and DST")
    src, dst = (None, args.paths[0]) if len(args.paths) == 1 else args.paths

    def body() -> int:
        print(f"wrote {convert(src, dst, overwrite=args.overwrite)}")
        return 0

    return cli.run_command(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
