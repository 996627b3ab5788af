"""Reading PyTorch checkpoints safely and mapping them strictly onto our Flax variables.

Every converter is a table of (torch key, flax path, transform) rows applied by `apply_table`,
never shape guessing; anything left over or missing is named in the error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitnt_jax.errors import UserError

# What torch.load(weights_only=True) raises for damaged or foreign files (truncated zip: RuntimeError;
# a flipped byte: UnicodeDecodeError; a file needing Python objects: UnpicklingError).
_TORCH_UNREADABLE = (RuntimeError, ValueError, OSError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message names the problem and the fix.

    A message may name a setting of `convert` as `{overwrite}` or `{variant}`: a command line shows
    its flag there (see `vitnt_jax.errors.UserError`).
    """


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Returns the raw object stored in a `.safetensors` file or a PyTorch file (tensors only).

    PyTorch files are read with `torch.load(weights_only=True)`: a file that needs arbitrary
    Python objects is refused rather than unpickled.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"checkpoint {path} is a folder; pass the .pt or .safetensors file inside it.")
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist; check the path.")
    if not path.is_file():  # a FIFO would be waited on, a device read forever
        raise ConversionError(
            f"checkpoint {path} is a named pipe or a device, not a file; pass the .pt or .safetensors file itself."
        )
    if not os.access(path, os.R_OK):
        raise ConversionError(f"checkpoint {path} is not readable (permission denied); fix its permissions.")
    if path.stat().st_size == 0:
        raise ConversionError(f"checkpoint {path} is empty; download it again.")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ConversionError(
                "reading .safetensors needs safetensors: pip install 'vitnt-jax[convert]'."
            ) from error
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(
                f"could not read {path} as safetensors ({error}); the file is truncated or damaged, download it again."
            ) from error
    try:
        import torch
    except ImportError as error:
        raise ConversionError("reading PyTorch checkpoints needs torch: pip install torch==2.13.0.") from error
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive ("PK..."); very old files are a bare pickle (protocol byte 0x80).
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):
        raise ConversionError(
            f"could not read {path}: it is neither safetensors (by its name) nor a PyTorch checkpoint; "
            "pass the model.pt or model.safetensors file."
        )
    if magic.startswith(b"PK"):
        _check_expansion(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_UNREADABLE as error:
        refused = refusal(error)
        if refused is not None:
            raise ConversionError(f"{path} {refused}") from error
        raise ConversionError(
            f"could not read {path} ({type(error).__name__}): the file is truncated or not a "
            "PyTorch checkpoint; download it again."
        ) from error


MAX_EXPANSION = 16  # torch.save stores its members uncompressed: contents are at most the file's size


def _check_expansion(path: Path) -> None:
    """Raises ConversionError when the zip at `path` declares contents far larger than itself (a zip bomb).

    torch.load allocates what a member declares and inflates it: a deflated stream of zeros would
    cost gigabytes of memory for a file of a megabyte. A zip the zipfile module cannot read is left
    to torch.load, which names the damage.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    size = path.stat().st_size
    if declared > MAX_EXPANSION * size + (64 << 20):
        raise ConversionError(
            f"{path} declares {declared} bytes of contents in a file of {size} bytes (compressed members); "
            "refusing it, since torch.load would allocate all of them: torch.save compresses nothing, so the file "
            "is crafted or damaged, get a sound copy."
        )


# What torch's tensor-only unpickler says when it refuses a pickle (torch 2.13 words; older torch
# said "Unsupported global" / "Unsupported class"). Each names what the file asked for.
_ASKED_FOR = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.MULTILINE),
    re.compile(r"Can only (?:build|create new object for) .*?but got (.+?)$", re.MULTILINE),
    re.compile(r"Unsupported class (\S+)"),
    re.compile(r"persistent_load (?:id must be tuple or int, but got|of storage is allowed, but got) (.+?)$", re.M),
)
_OPCODE = re.compile(r"Unsupported operand (\d+)")


def refusal(error: BaseException) -> str | None:
    """Returns why torch.load(weights_only=True) refused a file, as the rest of a sentence; None when it did not.

    The sentence starts after the file's name: "<file> holds Python objects other than tensors (...)".
    """
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or not (
        text.startswith("Weights only load failed") or "Unsupported global" in text or "Unsupported class" in text
    ):
        return None
    fix = (
        "refusing it, since loading it could run code: export a plain state_dict (torch.save(model.state_dict(), ...))"
    )
    for pattern in _ASKED_FOR:
        found = pattern.search(text)
        if found:
            return f"holds Python objects other than tensors ({found.group(1).strip()}); {fix}."
    found = _OPCODE.search(text)
    if found:
        code = int(found.group(1))
        op = pickletools.code2op.get(chr(code)) if code < 256 else None
        name = f"opcode {op.name}, 0x{code:02x}" if op else f"opcode 0x{code:02x}"
        return (
            f"holds a pickle instruction that no plain state_dict uses ({name}); {fix}, "
            "or download it again if it should be one."
        )
    return f"holds Python objects other than tensors; {fix}."


def to_numpy(value: Any) -> np.ndarray:
    """Returns a float32 numpy copy of a torch tensor or array (fp16/bf16 weights widen)."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def unwrap(obj: Any, wrappers: tuple[str, ...], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Returns the flat state_dict inside `obj`: wrapper dicts opened, known key prefixes removed."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        inner = next((obj[w] for w in wrappers if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, Mapping):
        raise ConversionError(f"the checkpoint holds a {type(obj).__name__}, not a state_dict.")
    out: dict[str, Any] = {}
    original: dict[str, str] = {}
    for key, value in obj.items():
        name, stripped = str(key), True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        if name in out:
            raise ConversionError(
                f"keys {original[name]!r} and {key!r} both name {name!r} once prefixes are removed; "
                "the checkpoint holds two models, extract the one you want."
            )
        out[name], original[name] = value, str(key)
    return out


@dataclasses.dataclass(frozen=True)
class Row:
    """One mapping: torch key -> flax path ('params/blocks/attn/qkv/kernel'), transform, block index."""

    torch_key: str
    flax_path: str
    transform: Callable[[np.ndarray], np.ndarray]
    block: int | None = None  # scanned block index: stacked on axis 0


def identity(a: np.ndarray) -> np.ndarray:
    return a


def linear(a: np.ndarray) -> np.ndarray:
    # torch Linear weight is (out, in); a Flax Dense kernel is (in, out).
    return a.T


def conv(a: np.ndarray) -> np.ndarray:
    # torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out).
    return a.transpose(2, 3, 1, 0)


def apply_table(
    state: Mapping[str, Any],
    rows: list[Row],
    ignored: Mapping[str, str],
    want_shapes: Mapping[str, tuple[int, ...]],
    what: str,
) -> dict:
    """Returns the nested Flax variables built from `state` by `rows`, checked strictly.

    ignored: torch key suffix -> why it is dropped (e.g. 'mask_token': training only).
    want_shapes: flax path -> shape of the full (stacked) variable.
    Raises ConversionError naming every missing / unexpected key and every shape mismatch.
    """
    used = {r.torch_key for r in rows}
    missing = [r.torch_key for r in rows if r.torch_key not in state]
    unexpected = sorted(k for k in state if k not in used and not any(k == s or k.endswith("." + s) for s in ignored))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        raise ConversionError(f"{what}: {'; '.join(parts)}.")
    stacks: dict[str, dict[int, np.ndarray]] = {}
    flat: dict[str, np.ndarray] = {}
    mismatched, broken = [], []
    for row in rows:
        full = want_shapes[row.flax_path]
        want = full[1:] if row.block is not None else full
        # Sizes first, before a value is converted: a crafted tensor may claim any number of values
        # (a stride-0 view of a tiny storage), and every transform keeps the count.
        shape = tuple(getattr(state[row.torch_key], "shape", np.shape(state[row.torch_key])))
        value = row.transform(to_numpy(state[row.torch_key])) if math.prod(shape) == math.prod(want) else None
        if value is None or tuple(value.shape) != tuple(want):
            mismatched.append(f"{row.torch_key} has shape {shape}, expected {_torch_shape(row.transform, want)}")
            continue
        if not np.isfinite(value).all():
            broken.append(row.torch_key)
        if row.block is None:
            flat[row.flax_path] = value
        else:
            stacks.setdefault(row.flax_path, {})[row.block] = value
    if mismatched:
        raise ConversionError(f"{what}: {'; '.join(mismatched)}.")
    if broken:  # a NaN or infinite weight makes every score NaN: refuse the file rather than convert it
        raise ConversionError(
            f"{what}: {_clip(broken)} hold NaN or infinite values; the file is damaged or was saved from a diverged "
            "training run, get a sound copy."
        )
    for path, blocks in stacks.items():
        flat[path] = np.stack([blocks[i] for i in range(len(blocks))])
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _torch_shape(transform, flax_shape):
    if transform is linear:
        return tuple(reversed(flax_shape))
    if transform is conv:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(flax_shape)


def _clip(keys: list[str], limit: int = 12) -> str:
    # Keys come from the file: control characters are escaped, so none reaches the terminal as is.
    shown = ", ".join("".join(c if c.isprintable() else ascii(c)[1:-1] for c in k[:200]) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def save_converted(src: Path, dst: str | Path, config, variables, source: dict, overwrite: bool) -> Path:
    """Writes the converted checkpoint `dst` (refusing a destination that holds the source)."""
    from vitnt_jax import checkpoint

    if Path(dst).resolve() in Path(src).resolve().parents:
        raise ConversionError(f"{dst} contains the source {src}; write the checkpoint somewhere else.")
    source = {**source, "file": Path(src).name, "sha256": sha256(Path(src))}
    try:
        return checkpoint.save(dst, config, variables, source, overwrite=overwrite)
    except checkpoint.CheckpointError as error:  # keeps the message's settings, e.g. {overwrite}
        raise ConversionError(error.template, field=error.field, also=error.fields[1:]) from error


def run_cli(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    src_help: str,
    variants: list[str],
    convert: Callable[..., Path],
    add_arguments: Callable[[Any], None] | None = None,
) -> int:
    """The shared command line of the converters: SRC DST [--variant V] [--overwrite] [--debug] [extra flags].

    Returns the exit status: 0 written, 1 a conversion error (one line `error: <sentence>`), 2 bad
    flags (one line). Nothing here imports JAX, so `--help` answers at once.
    """
    from vitnt_jax import cli

    parser = cli.Parser(prog=prog, description=description)
    parser.add_argument("src", metavar="SRC", help=src_help)
    parser.add_argument("dst", metavar="DST", help="output checkpoint folder (give it to the scorer's --model)")
    if variants:
        parser.add_argument("--variant", choices=variants, help="default: inferred from the shapes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DST if it is a vitnt-jax checkpoint (never anything else)"
    )
    cli.add_debug_flag(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def body() -> int:
        out = convert(args.pop("src"), args.pop("dst"), **args)
        print(f"wrote {out}")
        return 0

    return cli.run_command(body, debug=debug)
