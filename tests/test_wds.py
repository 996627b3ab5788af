"""WebDataset shards (`--wds`): patterns, samples, labels, and every damaged shard an error row, never a crash."""

from __future__ import annotations

import gzip
import io
import re
import tarfile

import numpy as np
import pytest
import webdataset
from PIL import Image

from vitnt_jax import storage, wds
from vitnt_jax.data import ImageError, read_image
from vitnt_jax.errors import UserError
from vitnt_jax.sources import SourceError

pytest_plugins = ["storage_fixtures"]  # the S3 server on 127.0.0.1: storage_env, s3_bucket


def encoded(seed: int, fmt: str = "JPEG") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def write_shard(path, samples) -> None:
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def write_tar(path, members, format=tarfile.PAX_FORMAT) -> None:
    """members: (name, bytes) for regular files, or a ready TarInfo (links, folders) with None."""
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rows(source) -> list[tuple[str, str, str | tuple]]:
    """Returns (id, label, decoded shape or the error reason) of every row of a piece."""
    out = []
    for j in range(len(source)):
        try:
            what: str | tuple = source.load(j).shape
        except ImageError as error:
            what = str(error)
        out.append((source.ids[j], source.labels[j], what))
    return out


def test_brace_patterns_expand_in_order():
    assert wds.expand("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert wds.expand("{x,y}/s{1..3..2}.tar") == ["x/s1.tar", "x/s3.tar", "y/s1.tar", "y/s3.tar"]
    assert wds.expand("s{a..c}{,.gz}") == ["sa", "sa.gz", "sb", "sb.gz", "sc", "sc.gz"]
    assert wds.expand("gs://b/t-{9..11}.tar") == ["gs://b/t-9.tar", "gs://b/t-10.tar", "gs://b/t-11.tar"]
    assert wds.expand("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize(
    "pattern",
    [
        "a{b}c",
        "{a,{b,c}}d",
        "{,}",
        "{1..1}",
        "{Z..a}",
        "{a..Z}",
        "{z..a..3}",
        "{5..1..2}",
        "{-2..2}",
        "x{}y",
        r"\{a,b\}",
        r"{a\,b,c}",
        "{a,b}{0..9..4}{x,{y,z}{1..2}}",
        "{{a,b}}",
        "{0..3}{a}",
    ],
)
def test_the_shard_count_is_known_before_expanding_and_equals_the_expansion(pattern):
    from braceexpand import braceexpand

    assert wds._count(pattern, 10**9) == len(list(braceexpand(pattern)))


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("a{b.tar", "unbalanced braces"),
        ("a}b.tar", "unbalanced braces"),
        ("a}{b.tar", "unbalanced braces"),
        ("{0..99999999999}.tar", "more than 1,000,000 shards"),  # counted, never made (would fill memory)
        ("{0..999}{0..999}{0..9}", "more than 1,000,000 shards"),
        ("x" + "{a," * 300 + "}" * 300, "nests braces more than 100 deep"),
        ("", "is empty"),
        ("{a,b,a}.tar", "names the shard 'a.tar' twice"),
    ],
)
def test_bad_patterns_are_refused_in_one_sentence(pattern, words):
    with pytest.raises(SourceError) as caught:
        wds.expand(pattern)
    assert words in str(caught.value)
    assert caught.value.field == "wds"
    assert str(caught.value).count(". ") == 0 and "\n" not in str(caught.value)


def test_opening_reads_no_shard_and_lists_each_folder_once(tmp_path, monkeypatch):
    for k in range(4):
        write_shard(tmp_path / f"s-{k}.tar", [{"__key__": f"k{k}", "jpg": encoded(k)}])
    listed = []
    real_listdir = storage.listdir
    monkeypatch.setattr(storage, "listdir", lambda folder: listed.append(folder) or real_listdir(folder))
    monkeypatch.setattr(storage, "open_read", lambda path: pytest.fail(f"opening read {path}"))
    pieces = wds.open_wds(str(tmp_path / "s-{0..3}.tar"), piece_rows=7)
    assert listed == [str(tmp_path)]
    assert [p.name for p in pieces.pieces] == [f"shard {tmp_path}/s-{k}.tar" for k in range(4)]
    assert [p.index for p in pieces.pieces] == [0, 1, 2, 3]
    assert all(p.size is None for p in pieces.pieces)
    assert pieces.with_label is True
    assert pieces.identity.startswith("4 WebDataset shards, sha256 ")
    again = wds.open_wds(str(tmp_path / "s-{0..3}.tar"), piece_rows=100)  # piece_rows changes nothing
    assert again.identity == pieces.identity
    assert wds.open_wds(str(tmp_path / "s-{0..2}.tar"), piece_rows=7).identity != pieces.identity


def test_missing_shards_are_refused_at_open_naming_them(tmp_path):
    for k in (0, 1, 3):
        write_shard(tmp_path / f"s-{k}.tar", [{"__key__": "a", "jpg": encoded(k)}])
    with pytest.raises(SourceError) as caught:
        wds.open_wds(str(tmp_path / "s-{0..5}.tar"), piece_rows=10)
    message = str(caught.value)
    assert "names 3 of 6 shards that do not exist" in message
    assert f"{tmp_path}/s-2.tar" in message and f"{tmp_path}/s-5.tar" in message
    assert f"{tmp_path}/s-1.tar" not in message
    with pytest.raises(SourceError, match="globs such as"):
        wds.open_wds(str(tmp_path / "s-*.tar"), piece_rows=10)


def test_ids_labels_and_order_follow_the_shards(tmp_path):
    jpg = [encoded(k) for k in range(5)]
    write_shard(
        tmp_path / "s-0.tar",
        [
            {"__key__": "id7/0001", "jpg": jpg[0], "cls": " 7\n"},
            {"__key__": "id7/0002", "jpg": jpg[1], "cls": "7", "json": b"{}"},
            {"__key__": "id9/0001", "png": encoded(2, "PNG")},  # no cls: label ''
        ],
    )
    write_shard(tmp_path / "s-1.tar", [{"__key__": "z", "jpeg": jpg[3], "cls": "3"}, {"__key__": "a", "jpg": jpg[4]}])
    pieces = wds.open_wds(str(tmp_path / "s-{0..1}.tar"), piece_rows=1)
    first, second = (p.read() for p in pieces.pieces)
    assert first.ids == ["id7/0001", "id7/0002", "id9/0001"]
    assert first.labels == ["7", "7", ""]
    assert second.ids == ["z", "a"]  # shard order, never sorted
    assert second.labels == ["3", ""]
    # The same JPEG bytes decode to the same array as read_image gives them.
    np.testing.assert_array_equal(first.load(0), read_image(jpg[0]))
    np.testing.assert_array_equal(second.load(1), read_image(jpg[4]))
    assert first.load(2).shape == (112, 112, 3)


def test_the_first_image_member_in_member_order_is_the_image(tmp_path):
    png, jpg = encoded(1, "PNG"), encoded(2)
    write_tar(tmp_path / "s.tar", [("a.txt", b"x"), ("a.PNG", png), ("a.jpg", jpg), ("b.Jpg", jpg), ("b.cls", b"5")])
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    assert piece.ids == ["a", "b"] and piece.labels == ["", "5"]
    np.testing.assert_array_equal(piece.load(0), read_image(png))
    np.testing.assert_array_equal(piece.load(1), read_image(jpg))


def test_a_sample_without_image_or_with_a_bad_one_is_an_error_row(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            {"__key__": "a", "jpg": encoded(0), "cls": "1"},
            {"__key__": "b", "json": b"{}", "cls": "2"},
            {"__key__": "c", "jpg": b"\xff\xd8 not a jpeg at all", "cls": "3"},
            {"__key__": "d", "jpg": encoded(3), "cls": b"\xff\xfe"},
            {"__key__": "e", "jpg": encoded(4), "cls": "4"},
        ],
    )
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert [r[0] for r in got] == ["a", "b", "c", "d", "e"]
    assert got[0] == ("a", "1", (112, 112, 3))
    assert got[1] == ("b", "2", "no jpg/jpeg/png/webp member; it holds: .cls, .json")
    assert got[2][:2] == ("c", "3") and got[2][2].startswith(("unreadable image", "not a readable image"))
    assert got[3] == ("d", "", "its .cls member is not UTF-8 text")
    assert got[4] == ("e", "4", (112, 112, 3))


def test_a_repeated_key_keeps_its_row_under_an_id_no_key_can_have(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            {"__key__": "a", "jpg": encoded(0)},
            {"__key__": "b", "jpg": encoded(1)},
            {"__key__": "a", "jpg": encoded(2)},
            {"__key__": "c", "jpg": encoded(3)},
            {"__key__": "a", "jpg": encoded(4)},
        ],
    )
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert [r[0] for r in got] == ["a", "b", "a.repeat-2", "c", "a.repeat-3"]
    assert got[2][2] == "key 'a' is repeated in this shard (first at its sample 1)"
    assert got[4][2] == "key 'a' is repeated in this shard (first at its sample 1)"
    assert got[3] == ("c", "", (112, 112, 3))
    assert wds.split_key("a.repeat-2") == ("a", "repeat-2")  # such an id is never a key: its base name has a dot


def test_a_field_twice_in_one_sample_is_an_error_row(tmp_path):
    write_tar(tmp_path / "s.tar", [("a.jpg", encoded(0)), ("a.JPG", encoded(1)), ("b.jpg", encoded(2))])
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert got == [("a", "", "it holds .jpg twice"), ("b", "", (112, 112, 3))]


def full_shard(tmp_path) -> tuple[bytes, list[str]]:
    keys = [f"k{i}" for i in range(4)]
    write_shard(tmp_path / "whole.tar", [{"__key__": k, "jpg": encoded(i), "cls": str(i)} for i, k in enumerate(keys)])
    return (tmp_path / "whole.tar").read_bytes(), keys


def check_broken(piece, shard: str, keys: list[str]) -> list:
    """A broken shard: complete samples keep their rows, then maybe the sample in progress, then one broken row."""
    got = rows(piece)
    assert len(set(piece.ids)) == len(piece.ids)
    assert piece.ids[-1] == f"{shard}.broken"
    assert got[-1][2].startswith("the shard breaks at ") and got[-1][2].endswith("; the rest of it is not read")
    kept = piece.ids[:-1]
    assert kept == keys[: len(kept)]
    for image_id, _, what in got[:-1]:
        if what != (112, 112, 3):
            assert image_id == kept[-1] and what.startswith("the shard breaks inside this sample, at byte ")
    return got


def test_a_truncated_tar_keeps_the_rows_read_before_and_one_broken_row(tmp_path):
    data, keys = full_shard(tmp_path)
    end = data.rstrip(b"\0")
    cuts = sorted({*range(0, len(end), 512), *range(100, len(end), 1999), len(end)})
    seen_reasons = set()
    for cut in cuts:
        shard = str(tmp_path / f"cut-{cut}.tar")
        (tmp_path / f"cut-{cut}.tar").write_bytes(data[:cut])
        got = check_broken(wds.read_shard(shard), shard, keys)
        seen_reasons.add(got[-1][2])
    assert any("cut short inside a member)" in r for r in seen_reasons)
    assert any("without the tar end marker" in r for r in seen_reasons)
    # Cut just before the end marker: every sample was read, only the last one is in doubt.
    (tmp_path / "cut.tar").write_bytes(end + b"\0" * (-len(end) % 512))
    got = check_broken(wds.read_shard(str(tmp_path / "cut.tar")), str(tmp_path / "cut.tar"), keys)
    assert [r[0] for r in got] == [*keys, f"{tmp_path}/cut.tar.broken"]


def test_a_damaged_header_keeps_the_rows_before_it(tmp_path):
    data, keys = full_shard(tmp_path)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("k2.")][0]
    damaged = bytearray(data)
    damaged[third.offset + 3] ^= 0x55  # a byte of its (pax) header's name: the checksum no longer matches
    (tmp_path / "d.tar").write_bytes(bytes(damaged))
    got = check_broken(wds.read_shard(str(tmp_path / "d.tar")), str(tmp_path / "d.tar"), keys)
    # k1 was the sample in progress: whether its next member was its own cannot be known.
    assert got[:2] == [
        ("k0", "0", (112, 112, 3)),
        ("k1", "1", f"the shard breaks inside this sample, at byte {third.offset}"),
    ]
    assert "a damaged member header (bad checksum)" in got[-1][2]
    zeroed = bytearray(data)
    zeroed[third.offset : third.offset + 512] = bytes(512)  # tarfile alone takes this for the end of the archive
    (tmp_path / "z.tar").write_bytes(bytes(zeroed))
    got = check_broken(wds.read_shard(str(tmp_path / "z.tar")), str(tmp_path / "z.tar"), keys)
    assert [r[0] for r in got] == ["k0", "k1", f"{tmp_path}/z.tar.broken"]
    assert "a zero block where a member header should be, with more data after it" in got[-1][2]
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    got = rows(wds.read_shard(str(tmp_path / "junk.tar")))
    assert [r[0] for r in got] == [f"{tmp_path}/junk.tar.broken"]


def test_links_folders_and_meta_members_are_skipped_never_followed(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(encoded(9))
    link = tarfile.TarInfo("b.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, str(secret)
    hard = tarfile.TarInfo("c.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.jpg"
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    write_tar(
        tmp_path / "s.tar",
        [
            ("__meta__", b"{}"),
            ("a.jpg", encoded(0)),
            (link, None),
            (hard, None),
            (folder, None),
            ("README", b"hello"),
            ("b.cls", b"2"),
            ("../../e.jpg", encoded(1)),  # only a name: nothing is written anywhere
        ],
    )
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    got = rows(piece)
    assert got == [
        ("a", "", (112, 112, 3)),
        ("b", "2", "no jpg/jpeg/png/webp member; it holds: .cls"),
        ("../../e", "", (112, 112, 3)),
    ]
    assert len(piece.problems) == 3
    assert "'b.jpg' is not a regular file" in piece.problems[0] and "'c.jpg'" in piece.problems[1]
    assert "'README' has no key" in piece.problems[2]
    assert not (tmp_path.parent / "e.jpg").exists()


def test_oversized_members_and_headers_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 20_000)
    monkeypatch.setattr(wds, "MAX_LABEL_BYTES", 8)
    big = encoded(0, "PNG")  # 112x112 noise: about 38 KB
    assert len(big) > 20_000
    write_shard(
        tmp_path / "s.tar",
        [
            {"__key__": "a", "png": big},
            {"__key__": "b", "jpg": encoded(1), "cls": "x" * 9},
            {"__key__": "c", "jpg": encoded(2)},
        ],
    )
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert got == [
        ("a", "", f"its .png member is {len(big)} bytes, above the 20000 limit"),
        ("b", "", "its .cls member is 9 bytes, above the 8 limit"),
        ("c", "", (112, 112, 3)),
    ]
    monkeypatch.setattr(wds, "MAX_HEADER_BYTES", 1000)
    write_tar(tmp_path / "long.tar", [("a.jpg", encoded(0)), ("n" * 3000 + ".jpg", encoded(1))])
    got = rows(wds.read_shard(str(tmp_path / "long.tar")))
    assert [r[0] for r in got] == ["a", f"{tmp_path}/long.tar.broken"]
    assert "an extended header of" in got[1][2] and "(at most 1000)" in got[1][2]


def test_compressed_shards_and_file_urls_read_alike(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": encoded(i), "cls": str(i)} for i in range(3)]
    write_shard(tmp_path / "s-0.tar", samples)
    (tmp_path / "s-1.tar").write_bytes(gzip.compress((tmp_path / "s-0.tar").read_bytes()))
    local = [p.read() for p in wds.open_wds(str(tmp_path / "s-{0..1}.tar"), piece_rows=1).pieces]
    remote = [p.read() for p in wds.open_wds(f"file://{tmp_path}/s-{{0..1}}.tar", piece_rows=1).pieces]
    for piece in (*local, *remote):
        assert piece.ids == ["k0", "k1", "k2"] and piece.labels == ["0", "1", "2"]
        for j in range(3):
            np.testing.assert_array_equal(piece.load(j), read_image(samples[j]["jpg"]))
    with pytest.raises(SourceError, match="do not exist"):
        wds.open_wds(f"file://{tmp_path}/s-{{0..2}}.tar", piece_rows=1)


def test_a_failing_storage_read_stops_the_run_in_one_sentence(tmp_path, monkeypatch):
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "jpg": encoded(i)} for i in range(3)])

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 5000:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(n, 4096) if n and n > 0 else 4096)

    monkeypatch.setattr(storage, "open_read", lambda path: Flaky((tmp_path / "s.tar").read_bytes()))
    with pytest.raises(SourceError) as caught:
        wds.read_shard(str(tmp_path / "s.tar"))
    assert "reading the shard" in str(caught.value) and "rerun with --resume" in str(caught.value)
    (tmp_path / "gone.tar").write_bytes(b"")
    monkeypatch.undo()
    (tmp_path / "gone.tar").unlink()
    with pytest.raises(UserError) as caught:  # deleted after the run was planned: one line, then --resume
        wds.read_shard(str(tmp_path / "gone.tar"))
    assert str(tmp_path / "gone.tar") in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "folder.tar").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        wds.read_shard(str(tmp_path / "folder.tar"))


def test_a_webp_member_is_the_image_and_reads_as_read_image_reads_it(tmp_path):
    webp = encoded(5, "WEBP")
    write_tar(tmp_path / "s.tar", [("a.webp", webp), ("a.jpg", encoded(6))])
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    assert piece.ids == ["a"]
    try:
        expected = read_image(webp)
    except ImageError as error:  # until vitnt_jax.data decodes WEBP: the same error row, never the jpg instead
        with pytest.raises(ImageError, match=re.escape(str(error))):
            piece.load(0)
    else:
        np.testing.assert_array_equal(piece.load(0), expected)


def test_a_shard_past_the_memory_and_member_limits_keeps_a_row_for_each_sample_it_read(tmp_path, monkeypatch):
    jpg = encoded(0)
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "jpg": jpg, "cls": str(i)} for i in range(5)])
    monkeypatch.setattr(wds, "MAX_SHARD_HELD", 2 * len(jpg))
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert [r[0] for r in got] == ["k0", "k1", "k2", "k3", "k4"]
    assert [r[2] for r in got[:2]] == [(112, 112, 3)] * 2
    assert all(r[2] == f"not read: the shard's images pass {2 * len(jpg)} bytes; split it" for r in got[2:])
    monkeypatch.setattr(wds, "MAX_SHARD_MEMBERS", 5)  # 2 members a sample
    got = rows(wds.read_shard(str(tmp_path / "s.tar")))
    assert [r[0] for r in got] == ["k0", "k1", "k2", f"{tmp_path}/s.tar.broken"]
    assert got[2][2].startswith("the shard breaks inside this sample")
    assert "it holds more than 5 members; split it into smaller shards" in got[3][2]


def test_samples_are_the_ones_the_webdataset_package_reads(tmp_path):
    keys = ["x/0001", "x/0002", "y/0001", "0003"]
    samples = [{"__key__": k, "jpg": encoded(i), "cls": str(i), "json": b"{}"} for i, k in enumerate(keys)]
    samples[2] = {"__key__": "y/0001", "png": encoded(2, "PNG")}
    write_shard(tmp_path / "s.tar", samples)
    theirs = list(webdataset.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    ours = wds.read_shard(str(tmp_path / "s.tar"))
    assert ours.ids == [s["__key__"] for s in theirs] == keys
    assert ours.labels == [s["cls"].decode() if "cls" in s else "" for s in theirs]
    for j, sample in enumerate(theirs):
        np.testing.assert_array_equal(ours.load(j), read_image(sample.get("jpg") or sample["png"]))


def test_shards_on_s3_on_a_loopback_server_read_as_local_ones(tmp_path, s3_bucket):
    # The S3 server of tests/storage_fixtures.py on 127.0.0.1 (dummy credentials, network guard on).
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    for k in range(3):
        write_shard(
            tmp_path / f"s-{k}.tar", [{"__key__": f"{k}/{i}", "jpg": encoded(i), "cls": str(k)} for i in range(3)]
        )
        fs.put(str(tmp_path / f"s-{k}.tar"), f"{s3_bucket}/wds/s-{k}.tar")
    remote = wds.open_wds(s3_bucket + "/wds/s-{0..2}.tar", piece_rows=1)
    local = wds.open_wds(str(tmp_path / "s-{0..2}.tar"), piece_rows=1)
    assert len(remote) == 3
    for a, b in zip(remote.pieces, local.pieces, strict=True):
        sa, sb = a.read(), b.read()
        assert rows(sa) == rows(sb) and len(sa) == 3
        for j in range(3):
            np.testing.assert_array_equal(sa.load(j), sb.load(j))
    with pytest.raises(SourceError, match=rf"names 2 of 5 shards that do not exist: '{s3_bucket}/wds/s-3.tar'"):
        wds.open_wds(s3_bucket + "/wds/s-{0..4}.tar", piece_rows=1)


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_ustar_gnu_and_pax_tars_with_folders_and_long_names_read_alike(tmp_path, format):
    folder = tarfile.TarInfo("people")
    folder.type = tarfile.DIRTYPE
    deep = "people/" + "d" * 90 + "/0001"  # past ustar's 100-character name: its prefix field, a GNU or a pax header
    jpg = encoded(0)
    write_tar(
        tmp_path / "s.tar", [(folder, None), (f"{deep}.jpg", jpg), (f"{deep}.cls", b"12"), ("b.png", jpg)], format
    )
    piece = wds.read_shard(str(tmp_path / "s.tar"))
    assert rows(piece) == [(deep, "12", (112, 112, 3)), ("b", "", (112, 112, 3))]
    assert piece.problems == []
