"""Parsing of block selections: `0-19`, `0,2,4`, `-4:`, `all`, and mixtures of them."""

from __future__ import annotations

from collections.abc import Sequence


def parse_blocks(spec: str | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Returns the sorted 0-based block indices that `spec` selects out of `depth` blocks.

    Accepted forms, comma-separated and mixable: `all` (or None/empty), an index `7`, a negative
    index `-1` (counting from the end), an inclusive range `0-19`, a Python slice `-4:`, `:20`,
    `0:24:2` (end exclusive). A list of ints is taken as indices. Duplicates are an error.
    """
    if spec is None:
        return tuple(range(depth))
    if isinstance(spec, str):
        items: list[int] = []
        text = spec.strip()
        if text in ("", "all"):
            return tuple(range(depth))
        for part in text.split(","):
            items.extend(_parse_part(part.strip(), depth, spec))
    else:
        items = [_resolve(int(i), depth, str(list(spec))) for i in spec]
    if not items:
        raise ValueError(f"block selection {spec!r} selects no block.")
    seen: set[int] = set()
    for i in items:
        if i in seen:
            raise ValueError(f"block selection {spec!r} lists block {i} twice; list each block once.")
        seen.add(i)
    return tuple(sorted(items))


class _Unreadable(ValueError):
    """Raised inside the parser for text that is not a block selection at all."""


def _resolve(index: int, depth: int, spec: str) -> int:
    if not -depth <= index < depth:
        raise ValueError(
            f"block selection {spec!r} names block {index}, but the model has {depth} blocks "
            f"(valid: 0..{depth - 1} or -{depth}..-1)."
        )
    return index % depth


def _parse_part(part: str, depth: int, spec: str) -> list[int]:
    try:
        if ":" in part:
            fields = [_int(f) if f.strip() else None for f in part.split(":")]
            if len(fields) > 3 or (len(fields) == 3 and fields[2] == 0):
                raise _Unreadable
            return list(range(depth))[slice(*fields)]
        # A range 'a-b' has a '-' after its first character; '-3' alone is a negative index.
        dash = part.find("-", 1)
        if dash > 0:
            lo = _resolve(_int(part[:dash]), depth, spec)
            hi = _resolve(_int(part[dash + 1 :]), depth, spec)
            if hi < lo:
                raise ValueError(f"block range {part!r} in {spec!r} runs backwards; write it low-high.")
            return list(range(lo, hi + 1))
        return [_resolve(_int(part), depth, spec)]
    except _Unreadable as error:
        raise ValueError(f"cannot read block selection {spec!r}; use e.g. '0-19', '0,2,4', '-4:' or 'all'.") from error


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as error:
        raise _Unreadable(text) from error
