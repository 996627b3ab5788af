"""The tensors of a TorchScript archive, read without running any of it.

A TorchScript archive (`torch.jit.save`, e.g. OpenAI's CLIP `.pt` files) is a zip holding
`<name>/data.pkl`, a pickle of the module tree whose tensors are persistent ids pointing at the
raw storages `<name>/data/<key>`, and `<name>/code/`, the modules' TorchScript source.
`torch.jit.load` compiles that code and runs it, `__setstate__` methods included: a crafted
archive can write files as it loads. This reader never does. A restricted unpickler rebuilds
tensors from their storages (bounds-checked views, nothing copied twice) and turns every
`__torch__.*` module into a plain record of its attribute dict, calling no method of it; the
class declarations in `code/` are read as text only, for their `__parameters__` and
`__buffers__` lists. The result is what `torch.jit.load(path).state_dict()` returns, key for key
and bit for bit, or one ConversionError sentence: an archive whose modules keep a state of their
own making (custom `__getstate__` / `__setstate__`), or that asks for any other Python object,
is refused, since only its code could say what its weights are.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import reprlib
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from converters.state_dict import ConversionError

MAX_DEPTH = 64  # nested modules; CLIP nests 6 deep
MAX_MODULES = 100_000  # module visits; CLIP ViT-B/16 has ~200 modules (a shared one counts at every path)
MAX_EXPANDED = 1 << 28  # bytes all compressed members together may expand to (CLIP's code: ~1 MB)
# Storage classes by name (torch.<Name>Storage) -> torch dtype name.
_STORAGES = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# Opcodes that build objects by name or from outside data: only the ones handled below may run.
_REFUSED_OPCODES = ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "NEWOBJ_EX", "BYTEARRAY8", "NEXT_BUFFER")
_REFUSED_OPCODES += ("READONLY_BUFFER",)


class _Refused(Exception):
    """The archive asks for something this reader does not rebuild; the message says what."""


class _Damaged(Exception):
    """The archive's bytes contradict themselves (sizes, bounds, missing members)."""


class _StorageType:
    """A torch.<X>Storage named in the pickle: only ever a tag inside a persistent id."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGES[name]


class ScriptModuleRecord:
    """A `__torch__.*` module of the archive: its class name and attribute dict, nothing run."""

    __slots__ = ("qualified_name", "state")

    def __init__(self, qualified_name: str):
        self.qualified_name, self.state = qualified_name, None


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 for a storage this reader loaded: a bounds-checked view, no hooks."""
    import torch

    if not isinstance(storage, torch.Tensor):
        raise _Refused(f"a tensor is built on {type(storage).__name__}, not on a storage of the archive")
    if not (_ints(size) and _ints(stride) and len(size) == len(stride) and _ints((offset,))):
        raise _Damaged(f"a tensor has size {size!r}, stride {stride!r} and offset {offset!r}")
    if hooks or metadata:
        raise _Refused("a tensor carries backward hooks or metadata")
    if any(n < 0 for n in size):
        raise _Damaged(f"a tensor has the negative size {_show(size)}")
    if any(s == 0 for s in size):
        return storage.new_empty(tuple(size))
    # A view repeating its storage's values (stride 0) would cost memory and time far beyond the file
    # once converted; no saved state_dict holds one.
    if math.prod(size) > storage.numel():
        raise _Damaged(f"a tensor of size {_show(size)} holds more values than its storage ({storage.numel()})")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or any(s < 0 for s in stride) or extent >= storage.numel():
        raise _Damaged(f"a tensor of size {tuple(size)} reaches past the end of its storage")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _show(value: Any, limit: int = 120) -> str:
    """Returns a short one-line rendering of something a crafted pickle made (tensors by their shape only)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = value if isinstance(value, str) else _REPR.repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _ints(values) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _ordered_dict(*args):
    if args:  # torch writes OrderedDict() for a tensor's (empty) backward hooks
        raise _Refused("collections.OrderedDict is called with arguments")
    return OrderedDict()


_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): _ordered_dict,
}


def _refuse_opcode(name: str):
    def refuse(self):
        raise _Refused(f"its pickle uses the {name} instruction")

    return refuse


class _ArchiveUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (each opcode is ours to allow), rebuilding tensors and module records only."""

    dispatch = dict(pickle._Unpickler.dispatch)
    for _op in pickletools.opcodes:
        if _op.name in _REFUSED_OPCODES:
            dispatch[_op.code.encode("latin-1")[0]] = _refuse_opcode(_op.name)

    def __init__(self, data: bytes, storage):
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module: str, name: str):
        if (module, name) in _CALLABLES:
            return _CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            return _record_class(f"{module}.{name}")
        raise _Refused(f"it asks for {_show(f'{module}.{name}')}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"it holds a persistent id {_show(pid)} that is no tensor storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise _Refused(f"it holds a storage id {_show(pid)} of another form")
        return self._storage(key, kind, numel)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not (any(func is f for f in _CALLABLES.values()) and isinstance(args, tuple)):
            raise _Refused(f"it calls {type(func).__name__} {_show(func)}")
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _RecordClass) and args == ()):
            raise _Refused(f"it creates a {_show(cls)}")
        self.append(cls.make())

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, ScriptModuleRecord) or inst.state is not None:
            raise _Refused(f"it sets the state of a {type(inst).__name__}")
        inst.state = state

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build


class _RecordClass:
    """Base of the stand-ins find_class gives for `__torch__.*` names: creating one makes a record."""

    qualified_name = ""

    @classmethod
    def make(cls) -> ScriptModuleRecord:
        return ScriptModuleRecord(cls.qualified_name)


def _record_class(qualified_name: str) -> type:
    return type("ScriptClass", (_RecordClass,), {"qualified_name": qualified_name})


_CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)
_NAMES = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _declarations(archive: zipfile.ZipFile, prefix: str) -> dict[str, dict[str, Any]]:
    """Returns {qualified class name: {'parameters', 'buffers', 'setstate'}} from the archive's code, read as text."""
    found: dict[str, dict[str, Any]] = {}
    root = f"{prefix}/code/"
    for info in archive.infolist():
        if not (info.filename.startswith(root) and info.filename.endswith(".py")):
            continue
        module = info.filename[len(root) : -len(".py")].replace("/", ".")
        text = _member(archive, info).decode("utf-8", "replace")
        starts = [m for m in _CLASS.finditer(text)]
        for i, match in enumerate(starts):
            body = text[match.end() : starts[i + 1].start() if i + 1 < len(starts) else len(text)]
            lists = {}
            for kind in ("parameters", "buffers"):
                line = re.search(rf"^  __{kind}__ = \[(.*)\]$", body, re.MULTILINE)
                lists[kind] = _NAMES.findall(line.group(1)) if line else None
            found[f"{module}.{match.group(1)}"] = {
                **lists,
                "setstate": re.search(r"^  def __setstate__\(", body, re.MULTILINE) is not None,
            }
    return found


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # A stored member costs what the file holds; a compressed one (torch deflates the code) could
    # expand far past it, so its declared size (capped in `_read`) is never exceeded while reading.
    with archive.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise _Damaged(f"its member {info.filename} is not the size its header says")
    return data


def read_state_dict(path: str | Path) -> OrderedDict:
    """Returns the state_dict `torch.jit.load(path).state_dict()` would give, without running the archive.

    Raises ConversionError (one sentence) for a damaged archive or one that needs its own code to
    say what its weights are.
    """
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return _read(archive, torch)
    except _Refused as error:
        raise ConversionError(
            f"the TorchScript archive {path} is refused: {_show(str(error), 300)}, and only running its code could say "
            "what its weights are; export a plain state_dict (torch.save(model.state_dict(), ...))."
        ) from error
    except (_Damaged, zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError, IndexError) as error:
        raise ConversionError(
            f"could not read the TorchScript archive {path} ({_show(str(error), 300) or type(error).__name__}); "
            "the file is truncated or damaged, download it again."
        ) from error
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError, struct.error) as error:
        raise ConversionError(
            f"could not read the TorchScript archive {path} ({type(error).__name__}: {_show(str(error))}); the file "
            "is damaged or no TorchScript archive, download it again."
        ) from error


def _read(archive: zipfile.ZipFile, torch) -> OrderedDict:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Damaged(f"it holds {len(pickles)} top-level data.pkl members, not one")
    # A compressed member costs what it expands to: all of them together are capped before any is read.
    expanded = sum(i.file_size for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED)
    if expanded > MAX_EXPANDED:
        raise _Refused(f"its compressed members expand to {expanded} bytes, more than a module's code holds")
    prefix = pickles[0].split("/")[0]
    names = set(archive.namelist())
    if f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder").strip() != b"little":
        raise _Refused("its tensors are stored big-endian")
    storages: dict[str, Any] = {}

    def storage(key: str, kind: _StorageType, numel: int):
        if key in storages:
            if storages[key].dtype != getattr(torch, kind.dtype):
                raise _Damaged(f"storage {key} is named with two types")
            return storages[key]
        member = f"{prefix}/data/{key}"
        if not re.fullmatch(r"\w+", key) or member not in names:
            raise _Damaged(f"storage {key!r} is not in the archive")
        data = _member(archive, archive.getinfo(member))
        dtype = getattr(torch, kind.dtype)
        size = torch.empty((), dtype=dtype).element_size()
        if numel < 0 or len(data) != numel * size:
            raise _Damaged(f"storage {key} holds {len(data)} bytes, not {numel} {kind.dtype} values")
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        storages[key] = flat
        return flat

    root = _ArchiveUnpickler(_member(archive, archive.getinfo(pickles[0])), storage).load()
    if not isinstance(root, ScriptModuleRecord):
        raise _Refused(f"its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    declared = _declarations(archive, prefix)
    out: OrderedDict = OrderedDict()
    _collect(root, "", declared, out, 0, [MAX_MODULES])
    return out


def _collect(
    record: ScriptModuleRecord, prefix: str, declared: dict, out: OrderedDict, depth: int, budget: list[int]
) -> None:
    """Adds the record's parameters, then its buffers, then its submodules' (torch's state_dict order).

    `budget` counts module visits down: a module shared by two parents is visited at each path (as
    torch's state_dict does), so a chain of shared modules would otherwise double the work per level.
    """
    import torch

    name = record.qualified_name
    if depth > MAX_DEPTH:
        raise _Refused(f"its modules nest more than {MAX_DEPTH} deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise _Refused(f"it holds more than {MAX_MODULES} modules, counted along every path")
    if name not in declared or declared[name]["parameters"] is None or declared[name]["buffers"] is None:
        raise _Damaged(f"its code declares no parameters and buffers for {name}")
    if declared[name]["setstate"]:
        raise _Refused(f"its module {name} runs a __setstate__ method of its own when loaded")
    state = record.state
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _Refused(f"its module {name} keeps a state of its own making, not its attributes")
    for kind in ("parameters", "buffers"):
        for attribute in declared[name][kind]:
            value = state.get(attribute)
            if value is None:  # an optional parameter left unset (a Linear without bias): not in state_dict
                continue
            if not isinstance(value, torch.Tensor):
                raise _Damaged(f"{prefix}{attribute} of {name} is a {type(value).__name__}, not a tensor")
            out[prefix + attribute] = value
    for attribute, value in state.items():
        if isinstance(value, ScriptModuleRecord):
            _collect(value, f"{prefix}{attribute}.", declared, out, depth + 1, budget)
