"""Face verification benchmarks as comparison protocols: which images are compared, which pairs are genuine.

Four kinds, each read from the files the benchmark is distributed as (numpy only, no images decoded):

- ``bin``: an insightface verification pack (``lfw.bin``, ``agedb_30.bin``, ``cfp_fp.bin``, ``calfw.bin``,
  ``cplfw.bin``; XQLFW once converted to the same form). Image 2k is compared with image 2k+1; the pack's
  issame flags say which pairs are genuine. Image ids are the positions "0", "1", ... exactly as
  ``python -m vitnt_jax.score --bin`` writes them.
- ``pairs``: an image list (one id per line, e.g. CR-FIQA's ``image_path_list.txt``) and a pair list
  (``a b label`` per line, label 1 = genuine, 0 = impostor; CR-FIQA's ``pair_list.txt``). ``a`` and ``b`` name
  images by id, by file name, by file stem, or by number (``00012`` is the image whose stem is 12).
- ``identities``: an identity list (``id identity`` per line). Every image is compared with every other one,
  genuine when the identities match: the Adience protocol.
- ``ijbc``: IJB-C 1:1 verification from its meta files ``ijbc_face_tid_mid.txt`` (image, template, media) and
  ``ijbc_template_pair_label.txt`` (template, template, label). A template's embedding is the mean of its
  images' embeddings within each media, summed over its media and L2-normalised; its quality is the minimum
  over its images.

`compare` turns a protocol, per-image embeddings and per-image qualities into the three arrays an EDC needs:
cosine similarity, the genuine mask and the pair quality (the minimum of the two sides).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitnt_jax import packs

KINDS = ("bin", "pairs", "identities", "ijbc")

# A pair whose embedding could not be computed is a non-match: it takes a similarity below every cosine.
FAILED_SIMILARITY = -2.0


class ProtocolError(ValueError):
    """A benchmark file is missing or malformed; the message is one sentence naming the file and the fix."""


@dataclass(frozen=True)
class Templates:
    """Images grouped into templates (IJB-C): `template[i]`, `media[i]` for image i; `names[t]` per template."""

    template: np.ndarray
    media: np.ndarray
    names: tuple[str, ...]


@dataclass(frozen=True)
class Protocol:
    """Returns nothing: a benchmark's images and comparisons.

    ids: the image ids quality and embedding files are matched against (see `match_ids`).
    left, right, genuine: the compared units (images, or templates when `templates` is set) and the truth;
      empty when `identities` is set, which means every image against every other (i < j).
    """

    name: str
    kind: str
    ids: tuple[str, ...]
    left: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    right: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    genuine: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    identities: np.ndarray | None = None
    templates: Templates | None = None

    @property
    def num_pairs(self) -> int:
        """Returns the number of comparisons."""
        if self.identities is not None:
            n = len(self.identities)
            return n * (n - 1) // 2
        return len(self.left)


# ----------------------------------------------------------------------------------------------------- loaders


def _read_text(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise ProtocolError(f"{what} {path} does not exist; check the path.") from error
    except IsADirectoryError as error:
        raise ProtocolError(f"{what} {path} is a folder; pass the file itself.") from error
    except UnicodeDecodeError as error:
        raise ProtocolError(f"{what} {path} is not UTF-8 text; pass the text file.") from error
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ProtocolError(f"{what} {path} is empty; it must list at least one entry.")
    return lines


def load_bin(path: str | Path, name: str | None = None) -> Protocol:
    """Returns the protocol of an insightface `.bin` pack: image 2k vs 2k+1, genuine where issame is true."""
    path = Path(path)
    try:
        pack = packs.read_bin(path)  # the same restricted reader as `python -m vitnt_jax.score --bin`
    except packs.PackError as error:
        raise ProtocolError(error.render({"bin": "pack"})) from error
    if pack.issame is None:
        raise ProtocolError(f"{path} does not hold two images per issame flag; it is not a verification pack.")
    flags = pack.issame
    n = len(flags)
    return Protocol(
        name=name or path.stem,
        kind="bin",
        ids=tuple(str(i) for i in range(2 * n)),
        left=np.arange(0, 2 * n, 2),
        right=np.arange(1, 2 * n, 2),
        genuine=np.asarray([bool(f) for f in flags]),
    )


def _label(token: str, path: Path, line: int) -> bool:
    if token not in ("0", "1"):
        raise ProtocolError(f"{path} line {line}: the label {token!r} must be 1 (genuine) or 0 (impostor).")
    return token == "1"


def load_pairs(image_list: str | Path, pair_list: str | Path, name: str | None = None) -> Protocol:
    """Returns the protocol of an image list plus a pair list (`a b label` per line, 1 = genuine)."""
    image_list, pair_list = Path(image_list), Path(pair_list)
    ids = tuple(_read_text(image_list, "image list"))
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"image list {image_list} names an image twice; each line must be unique.")
    lookup = IdLookup(ids)
    left, right, genuine = [], [], []
    for number, line in enumerate(_read_text(pair_list, "pair list"), 1):
        parts = line.replace(",", " ").split()
        if len(parts) != 3:
            raise ProtocolError(f"{pair_list} line {number} must read 'a b label', not {line!r}.")
        for token, out in ((parts[0], left), (parts[1], right)):
            index = lookup.find(token)
            if index is None:
                raise ProtocolError(
                    f"{pair_list} line {number}: {token!r} matches no single image of {image_list}; "
                    "name images by their id, file name or number."
                )
            out.append(index)
        genuine.append(_label(parts[2], pair_list, number))
    return Protocol(
        name=name or pair_list.parent.name or pair_list.stem,
        kind="pairs",
        ids=ids,
        left=np.asarray(left, np.int64),
        right=np.asarray(right, np.int64),
        genuine=np.asarray(genuine),
    )


def load_identities(identity_list: str | Path, name: str | None = None) -> Protocol:
    """Returns the all-vs-all protocol of an identity list (`id identity` per line): the Adience protocol."""
    identity_list = Path(identity_list)
    ids, who = [], []
    for number, line in enumerate(_read_text(identity_list, "identity list"), 1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ProtocolError(f"{identity_list} line {number} must read 'id identity', not {line!r}.")
        ids.append(parts[0])
        who.append(parts[1])
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"identity list {identity_list} names an image twice; each id must be unique.")
    if len(ids) < 2:
        raise ProtocolError(f"identity list {identity_list} has one image; all-vs-all needs at least two.")
    _, codes = np.unique(np.asarray(who), return_inverse=True)
    return Protocol(name=name or identity_list.stem, kind="identities", ids=tuple(ids), identities=codes)


def adience_identity_list(folder: str | Path) -> list[str]:
    """Returns `id identity` lines for Adience face crops under `folder` (identity = the face id in the name).

    Adience names crops ``<prefix>.<face_id>.<original>.jpg`` (e.g. ``coarse_tilt_aligned_face.2.x.jpg``);
    the face id (the second dot-separated field) identifies the person, as in CR-FIQA's Adience extraction,
    which renames its aligned crops ``p_<face_id>_img_<n>.jpg`` (also read here).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtocolError(f"Adience folder {folder} does not exist; pass the folder of face crops.")
    lines = []
    for path in sorted(folder.rglob("*.jpg")):
        renamed = re.fullmatch(r"p_([^_]+)_img_\d+\.jpg", path.name)
        parts = path.name.split(".")
        if renamed:
            person = renamed.group(1)
        elif len(parts) >= 3:
            person = parts[1]
        else:
            raise ProtocolError(
                f"{path.name} follows neither Adience's '<prefix>.<face_id>.<name>.jpg' nor CR-FIQA's "
                "'p_<face_id>_img_<n>.jpg' naming; write the identity list yourself."
            )
        lines.append(f"{path.relative_to(folder).as_posix()} {person}")
    if not lines:
        raise ProtocolError(f"Adience folder {folder} holds no .jpg files.")
    return lines


def load_ijbc(meta: str | Path, name: str | None = None) -> Protocol:
    """Returns the IJB-C 1:1 protocol from its meta folder (or the two meta files' common prefix folder)."""
    meta = Path(meta)
    faces = next(iter(sorted(meta.glob("*face_tid_mid.txt"))), None) if meta.is_dir() else None
    pairs = next(iter(sorted(meta.glob("*template_pair_label.txt"))), None) if meta.is_dir() else None
    if faces is None or pairs is None:
        raise ProtocolError(
            f"IJB-C meta folder {meta} must hold ijbc_face_tid_mid.txt and ijbc_template_pair_label.txt; "
            "pass the 'meta' folder of the IJB-C release."
        )
    ids, template_names, media = [], [], []
    for number, line in enumerate(_read_text(faces, "IJB-C face list"), 1):
        parts = line.split()
        if len(parts) < 3:
            raise ProtocolError(f"{faces} line {number} must read 'image template media', not {line!r}.")
        ids.append(parts[0])
        template_names.append(parts[1])
        media.append(parts[2])
    names, template = np.unique(np.asarray(template_names), return_inverse=True)
    _, media_codes = np.unique(np.asarray(media), return_inverse=True)
    index = {t: i for i, t in enumerate(names.tolist())}
    left, right, genuine = [], [], []
    for number, line in enumerate(_read_text(pairs, "IJB-C pair list"), 1):
        parts = line.split()
        if len(parts) < 3:
            raise ProtocolError(f"{pairs} line {number} must read 'template template label', not {line!r}.")
        for token, out in ((parts[0], left), (parts[1], right)):
            if token not in index:
                raise ProtocolError(f"{pairs} line {number}: template {token} has no image in {faces}.")
            out.append(index[token])
        genuine.append(_label(parts[2], pairs, number))
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{faces} names an image twice; each image must be listed once.")
    return Protocol(
        name=name or "ijbc",
        kind="ijbc",
        ids=tuple(ids),
        left=np.asarray(left, np.int64),
        right=np.asarray(right, np.int64),
        genuine=np.asarray(genuine),
        templates=Templates(template=template, media=media_codes, names=tuple(names.tolist())),
    )


def load(spec: str) -> Protocol:
    """Returns the protocol named by a `NAME=KIND:PATH[,PATH]` spec (see the module docstring for KIND)."""
    name, sep, rest = spec.partition("=")
    kind, colon, paths = rest.partition(":")
    if not (sep and colon and name and paths):
        raise ProtocolError(f"benchmark {spec!r} must read NAME=KIND:PATH, e.g. lfw=bin:data/lfw.bin.")
    parts = paths.split(",")
    expected = {"bin": 1, "pairs": 2, "identities": 1, "ijbc": 1}
    if kind not in expected:
        raise ProtocolError(f"benchmark {name}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if len(parts) != expected[kind]:
        what = "IMAGE_LIST,PAIR_LIST" if kind == "pairs" else "one PATH"
        raise ProtocolError(f"benchmark {name}: kind {kind} takes {what}, not {paths!r}.")
    if kind == "bin":
        return load_bin(parts[0], name)
    if kind == "pairs":
        return load_pairs(parts[0], parts[1], name)
    if kind == "identities":
        return load_identities(parts[0], name)
    return load_ijbc(parts[0], name)


# ------------------------------------------------------------------------------------------------ id matching


def _variants(key: str) -> Iterator[str]:
    """Yields the ways a file may name an image, most specific first: id, file name, stem, number."""
    yield "id:" + key
    base = re.split(r"[\\/]", key)[-1]
    yield "name:" + base
    stem = base.rsplit(".", 1)[0] if "." in base else base
    yield "stem:" + stem
    if stem.isdigit():
        yield "number:" + str(int(stem))


class IdLookup:
    """Finds a protocol image from how another file names it; a name shared by two images matches neither."""

    def __init__(self, ids: Sequence[str]):
        table: dict[str, int] = {}
        shared: set[str] = set()
        for i, key in enumerate(ids):
            for variant in _variants(key):
                if variant in table and table[variant] != i:
                    shared.add(variant)
                table.setdefault(variant, i)
        self._table = {k: v for k, v in table.items() if k not in shared}

    def find(self, key: str) -> int | None:
        """Returns the index of the image `key` names, or None."""
        for variant in _variants(key):
            if variant in self._table:
                return self._table[variant]
        return None


def match_ids(protocol: Protocol, keys: Sequence[str]) -> np.ndarray:
    """Returns, for every key of a file, the protocol image it names (-1 where it names none)."""
    lookup = IdLookup(protocol.ids)
    return np.asarray([(-1 if (i := lookup.find(k)) is None else i) for k in keys], np.int64)


# ------------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Similarities:
    """Returns nothing: per-comparison cosine similarity and truth, and how many images lacked an embedding."""

    similarity: np.ndarray
    genuine: np.ndarray
    missing_embedding: int


@dataclass(frozen=True)
class Comparisons:
    """Returns nothing: per-comparison arrays for an EDC, plus how many inputs were missing."""

    similarity: np.ndarray
    genuine: np.ndarray
    pair_quality: np.ndarray
    missing_quality: int
    missing_embedding: int


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norm


def _media_groups(templates: Templates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (template of each (template, media) group, group of each image, number of groups)."""
    stride = int(templates.media.max()) + 1
    key = templates.template.astype(np.int64) * stride + templates.media
    groups, group_of = np.unique(key, return_inverse=True)
    return groups // stride, group_of, len(groups)


def template_embeddings(templates: Templates, embeddings: np.ndarray) -> np.ndarray:
    """Returns (templates, E) embeddings: the mean within each media, summed over media, L2-normalised.

    Images without an embedding (NaN rows) are left out of their media and template; a template with no
    image left is NaN, so its comparisons become failed comparisons.
    """
    valid = np.isfinite(embeddings).all(axis=1)
    group_template, group_of, count = _media_groups(templates)
    sums = np.zeros((count, embeddings.shape[1]), np.float64)
    np.add.at(sums, group_of[valid], embeddings[valid])
    sizes = np.bincount(group_of[valid], minlength=count)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        media_mean = np.where(sizes > 0, sums / np.maximum(sizes, 1), 0.0)
    pooled = np.zeros((len(templates.names), embeddings.shape[1]), np.float64)
    np.add.at(pooled, group_template, media_mean)
    alive = np.bincount(templates.template[valid], minlength=len(templates.names)) > 0
    pooled[~alive] = np.nan
    return _normalize(pooled)


def template_quality(templates: Templates, quality: np.ndarray) -> np.ndarray:
    """Returns each template's quality: the minimum over its images that have one (-inf when none has)."""
    tq = np.full(len(templates.names), np.inf)
    valid = np.isfinite(quality)
    np.minimum.at(tq, templates.template[valid], quality[valid])
    tq[np.isinf(tq) & (tq > 0)] = -np.inf  # no quality at all: the lowest, discarded first
    return tq


def _check(protocol: Protocol, array: np.ndarray, ndim: int, what: str) -> np.ndarray:
    n = len(protocol.ids)
    array = np.asarray(array, np.float64)
    if array.ndim != ndim or array.shape[0] != n:
        want = f"({n}, E)" if ndim == 2 else f"({n},)"
        raise ProtocolError(f"{protocol.name}: {what} have shape {array.shape}, not {want}.")
    return array


def similarities(protocol: Protocol, embeddings: np.ndarray, *, chunk: int = 1 << 18) -> Similarities:
    """Returns the cosine similarity and truth of every comparison of a protocol (memory bounded by `chunk`).

    embeddings: (n_images, E), rows in `protocol.ids` order; a row with NaN (a failed image) makes every
    comparison it takes part in a non-match (similarity FAILED_SIMILARITY). IJB-C templates pool the images
    they have (see `template_embeddings`).
    """
    embeddings = _check(protocol, embeddings, 2, "embeddings")
    bad = ~np.isfinite(embeddings).all(axis=1)
    units = _normalize(np.where(bad[:, None], np.nan, embeddings))
    if protocol.templates is not None:
        units = template_embeddings(protocol.templates, units)
    if protocol.identities is None:
        sim = np.empty(len(protocol.left), np.float64)
        for c in range(0, len(sim), chunk):  # gathered rows cost pairs x E: chunk them (IJB-C has 1.5e7 pairs)
            a, b = units[protocol.left[c : c + chunk]], units[protocol.right[c : c + chunk]]
            sim[c : c + chunk] = np.einsum("pe,pe->p", a, b)
        genuine = np.asarray(protocol.genuine, bool)
    else:
        n, ident = len(units), protocol.identities
        sim = np.empty(n * (n - 1) // 2, np.float64)
        genuine = np.empty(len(sim), bool)
        offset = 0
        rows_per_block = max(1, chunk // max(n, 1))
        for first in range(0, n - 1, rows_per_block):
            last = min(first + rows_per_block, n - 1)
            rows = units[first:last] @ units[first:].T  # (r, n - first); keep j > i only
            for r, i in enumerate(range(first, last)):
                width = n - 1 - i
                sim[offset : offset + width] = rows[r, i - first + 1 :]
                genuine[offset : offset + width] = ident[i] == ident[i + 1 :]
                offset += width
    np.clip(sim, -1.0, 1.0, out=sim)
    sim[np.isnan(sim)] = FAILED_SIMILARITY
    return Similarities(similarity=sim, genuine=genuine, missing_embedding=int(bad.sum()))


def pair_qualities(protocol: Protocol, quality: np.ndarray) -> tuple[np.ndarray, int]:
    """Returns (the quality of every comparison: the minimum of its two sides, number of images without one).

    quality: (n_images,), higher = better; NaN (a failed image) counts as the lowest quality, so its
    comparisons are discarded first (ISO/IEC 29794-1 treats a failure to assess that way).
    """
    quality = _check(protocol, quality, 1, "qualities")
    bad = ~np.isfinite(quality)
    quality = np.where(bad, -np.inf, quality)
    if protocol.templates is not None:
        quality = template_quality(protocol.templates, np.where(bad, np.nan, quality))
    if protocol.identities is None:
        return np.minimum(quality[protocol.left], quality[protocol.right]), int(bad.sum())
    n = len(quality)
    out = np.empty(n * (n - 1) // 2, np.float64)
    offset = 0
    for i in range(n - 1):
        np.minimum(quality[i], quality[i + 1 :], out=out[offset : offset + n - 1 - i])
        offset += n - 1 - i
    return out, int(bad.sum())


def compare(protocol: Protocol, embeddings: np.ndarray, quality: np.ndarray) -> Comparisons:
    """Returns cosine similarities, the genuine mask and pair qualities (min of both sides) for a protocol.

    See `similarities` and `pair_qualities` for how failed images count. The evaluation driver computes the
    similarities once per benchmark and FR model and only the pair qualities per quality method.
    """
    sims = similarities(protocol, embeddings)
    pair_quality, missing_quality = pair_qualities(protocol, quality)
    return Comparisons(
        similarity=sims.similarity,
        genuine=sims.genuine,
        pair_quality=pair_quality,
        missing_quality=missing_quality,
        missing_embedding=sims.missing_embedding,
    )


# ------------------------------------------------------------------------------------ LFW-format pairs -> .bin


def read_lfw_pairs(pairs_txt: str | Path) -> list[tuple[str, str, bool]]:
    """Returns (relative image a, relative image b, genuine) from an LFW-format pairs file (LFW, XQLFW).

    Lines read ``name i j`` (genuine: images i and j of one person) or ``name1 i name2 j`` (impostor); the
    image of person ``name`` number ``i`` is ``name/name_000i.jpg``. A first line of one or two counts (LFW's
    ``10 300``) is skipped.
    """
    pairs_txt = Path(pairs_txt)
    out = []
    for number, line in enumerate(_read_text(pairs_txt, "pairs file"), 1):
        parts = line.split()
        if number == 1 and all(p.isdigit() for p in parts) and len(parts) <= 2:
            continue
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            a, b, genuine = (parts[0], int(parts[1])), (parts[0], int(parts[2])), True
        elif len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
            a, b, genuine = (parts[0], int(parts[1])), (parts[2], int(parts[3])), False
        else:
            raise ProtocolError(f"{pairs_txt} line {number} must read 'name i j' or 'name1 i name2 j', not {line!r}.")
        out.append(tuple(f"{n}/{n}_{i:04d}.jpg" for n, i in (a, b)) + (genuine,))
    if not out:
        raise ProtocolError(f"pairs file {pairs_txt} lists no pairs.")
    return out


def write_bin(pairs: list[tuple[str, str, bool]], image_root: str | Path, out: str | Path) -> int:
    """Returns the number of pairs written to an insightface-style `.bin` pack (image bytes kept as stored)."""
    image_root, out = Path(image_root), Path(out)
    blobs: list[bytes] = []
    for a, b, _ in pairs:
        for rel in (a, b):
            try:
                blobs.append((image_root / rel).read_bytes())
            except FileNotFoundError as error:
                missing = image_root / rel
                raise ProtocolError(f"image {missing} does not exist; pass the folder of the pairs' images.") from error
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        pickle.dump((blobs, [bool(g) for _, _, g in pairs]), f, protocol=4)
    tmp.replace(out)
    return len(pairs)


def main(argv: list[str] | None = None) -> int:
    """Converts an LFW-format benchmark (e.g. XQLFW) into a `.bin` pack; returns the exit status."""
    from vitnt_jax import cli

    p = cli.Parser(
        prog="python -m experiments.protocols",
        description="Pack an LFW-format benchmark (XQLFW's xqlfw_pairs.txt and its image folder) as a .bin.",
    )
    p.add_argument("--pairs", type=Path, required=True, help="LFW-format pairs file (e.g. xqlfw_pairs.txt)")
    p.add_argument("--images", type=Path, required=True, help="folder holding name/name_0001.jpg images")
    p.add_argument("--out", type=Path, required=True, help="the .bin pack to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)

    def body() -> int:
        if args.out.exists() and not args.overwrite:
            raise ProtocolError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out.")
        count = write_bin(read_lfw_pairs(args.pairs), args.images, args.out)
        print(f"wrote {count} pairs ({2 * count} images) to {args.out}")
        return 0

    return cli.run_command(body, debug=args.debug, errors=(ProtocolError,))


if __name__ == "__main__":
    raise SystemExit(main())
