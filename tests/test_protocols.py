"""Benchmark protocols: loaders on tiny hand-made files, id matching, comparisons checked by hand."""

import pickle

import numpy as np
import pytest

from experiments import protocols
from experiments.protocols import ProtocolError


def _unit(*v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def write_pack(path, n_pairs, issame, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(([b"jpeg-%d" % i for i in range(2 * n_pairs)], issame), f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_bin_of_every_pickle_protocol_reads_alike_in_both_readers(tmp_path, protocol):
    from vitnt_jax import sources

    path = write_pack(tmp_path / "p.bin", 2, [True, False], protocol)
    p = protocols.load_bin(path)
    assert p.ids == ("0", "1", "2", "3") and p.genuine.tolist() == [True, False]
    assert sources.insightface_bin(path).labels == ["1", "1", "0", "0"]


def test_bin_pairs_consecutive_images(tmp_path):
    p = protocols.load_bin(write_pack(tmp_path / "lfw.bin", 3, [True, False, True]))
    assert p.name == "lfw" and p.ids == ("0", "1", "2", "3", "4", "5")
    assert p.left.tolist() == [0, 2, 4] and p.right.tolist() == [1, 3, 5]
    assert p.genuine.tolist() == [True, False, True]
    assert p.num_pairs == 3


def test_bin_refuses_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(ProtocolError, match="refusing"):
        protocols.load_bin(evil)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ProtocolError, match="two images per issame flag"):
        protocols.load_bin(odd)
    with pytest.raises(ProtocolError, match="does not exist"):
        protocols.load_bin(tmp_path / "none.bin")


def test_pair_list_in_the_cr_fiqa_layout(tmp_path):
    images = tmp_path / "image_path_list.txt"
    images.write_text("".join(f"quality_data/lfw/images/{i:05d}.jpg\n" for i in range(4)))
    pairs = tmp_path / "pair_list.txt"
    pairs.write_text("00000 00001 1\n00002 00003 0\n00003 00000 0\n")
    p = protocols.load_pairs(images, pairs, "lfw")
    assert p.left.tolist() == [0, 2, 3] and p.right.tolist() == [1, 3, 0]
    assert p.genuine.tolist() == [True, False, False]
    # Names, file names and full ids resolve to the same images.
    pairs.write_text("quality_data/lfw/images/00001.jpg 00002.jpg 1\n")
    p = protocols.load_pairs(images, pairs)
    assert (p.left.tolist(), p.right.tolist()) == ([1], [2])


@pytest.mark.parametrize(
    "line, message",
    [("00000 00009 1", "matches no single image"), ("00000 00001 2", "must be 1"), ("00000 1", "must read")],
)
def test_pair_list_errors_name_the_line(tmp_path, line, message):
    images = tmp_path / "images.txt"
    images.write_text("a/00000.jpg\na/00001.jpg\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"00000 00001 1\n{line}\n")
    with pytest.raises(ProtocolError, match=message) as info:
        protocols.load_pairs(images, pairs)
    assert "line 2" in str(info.value)


def test_a_name_shared_by_two_images_matches_neither():
    lookup = protocols.IdLookup(["x/1.jpg", "y/1.jpg", "y/2.jpg"])
    assert lookup.find("1.jpg") is None and lookup.find("1") is None
    assert lookup.find("x/1.jpg") == 0 and lookup.find("2") == 2 and lookup.find("0002.jpg") == 2


def test_identities_all_vs_all_by_hand(tmp_path):
    listing = tmp_path / "adience.txt"
    listing.write_text("a.jpg p1\nb.jpg p1\nc.jpg p2\nd.jpg p2\n")
    p = protocols.load_identities(listing)
    assert p.num_pairs == 6
    e = np.stack([_unit(1, 0), _unit(1, 1), _unit(0, 1), _unit(-1, 0)])
    q = np.array([0.9, 0.2, 0.5, 0.7])
    got = protocols.compare(p, e * 3.0, q)  # scale must not matter: cosine
    order = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert got.genuine.tolist() == [True, False, False, False, False, True]
    np.testing.assert_allclose(got.similarity, [e[i] @ e[j] for i, j in order], atol=1e-12)
    np.testing.assert_allclose(got.pair_quality, [min(q[i], q[j]) for i, j in order])
    small = protocols.similarities(p, e, chunk=1)  # one row per block: the block bookkeeping must not matter
    np.testing.assert_allclose(small.similarity, got.similarity, atol=1e-15)
    np.testing.assert_array_equal(small.genuine, got.genuine)


def test_adience_identity_list_reads_the_face_id(tmp_path):
    for name in (
        "coarse_tilt_aligned_face.2.a.jpg",
        "coarse_tilt_aligned_face.7.b.jpg",
        "sub/x.2.c.jpg",
        "p_7_img_3.jpg",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert protocols.adience_identity_list(tmp_path) == [
        "coarse_tilt_aligned_face.2.a.jpg 2",
        "coarse_tilt_aligned_face.7.b.jpg 7",
        "p_7_img_3.jpg 7",
        "sub/x.2.c.jpg 2",
    ]


def test_ijbc_templates_pool_media_then_sum(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    # Template 10: images 1, 2 (media 5) and 3 (media 6). Template 20: image 4. Template 30: image 5.
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 10 5\n2.jpg 10 5\n3.jpg 10 6\n4.jpg 20 7\n5.jpg 30 8\n")
    (meta / "ijbc_template_pair_label.txt").write_text("10 20 1\n20 30 0\n")
    p = protocols.load_ijbc(meta)
    e = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 4.0], [1.0, 1.0, 1.0], [0, 0, 1.0]])
    q = np.array([0.8, 0.3, 0.9, 0.6, 0.1])
    got = protocols.compare(p, e, q)
    n = e / np.linalg.norm(e, axis=1, keepdims=True)
    t10 = (n[0] + n[1]) / 2 + n[2]
    t10 /= np.linalg.norm(t10)
    np.testing.assert_allclose(got.similarity, [t10 @ n[3], n[3] @ n[4]], atol=1e-12)
    np.testing.assert_allclose(got.pair_quality, [0.3, 0.1])
    assert got.genuine.tolist() == [True, False]
    # A failed image leaves its template, which pools the images it has; a template with none fails.
    e[1] = np.nan
    q[0] = np.nan
    got = protocols.compare(p, e, q)
    t10 = n[0] + n[2]
    t10 /= np.linalg.norm(t10)
    np.testing.assert_allclose(got.similarity, [t10 @ n[3], n[3] @ n[4]], atol=1e-12)
    np.testing.assert_allclose(got.pair_quality, [0.3, 0.1])  # min over the images that have a quality
    e[4] = np.nan
    assert protocols.compare(p, e, q).similarity[1] == protocols.FAILED_SIMILARITY
    # Chunked gathering gives the same similarities.
    np.testing.assert_allclose(protocols.similarities(p, e, chunk=1).similarity, protocols.compare(p, e, q).similarity)


def test_ijbc_media_ids_shared_across_templates_stay_apart(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    # Media 5 appears in both templates: pooling is per (template, media), never across templates.
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 10 5\n2.jpg 10 6\n3.jpg 20 5\n")
    (meta / "ijbc_template_pair_label.txt").write_text("10 20 0\n")
    p = protocols.load_ijbc(meta)
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = protocols.compare(p, e, np.ones(3))
    np.testing.assert_allclose(got.similarity, [np.sqrt(0.5)], atol=1e-12)


def test_ijbc_errors(tmp_path):
    with pytest.raises(ProtocolError, match="ijbc_face_tid_mid.txt"):
        protocols.load_ijbc(tmp_path)
    (tmp_path / "ijbc_face_tid_mid.txt").write_text("1.jpg 10 5\n")
    (tmp_path / "ijbc_template_pair_label.txt").write_text("10 99 1\n")
    with pytest.raises(ProtocolError, match="template 99 has no image"):
        protocols.load_ijbc(tmp_path)


def test_failures_lose_nothing_and_count(tmp_path):
    p = protocols.load_bin(write_pack(tmp_path / "x.bin", 2, [True, False]))
    e = np.array([[1.0, 0], [1.0, 0], [np.nan, np.nan], [0, 1.0]])
    q = np.array([0.5, np.nan, 0.4, 0.3])
    got = protocols.compare(p, e, q)
    assert len(got.similarity) == 2
    assert got.similarity.tolist() == [1.0, protocols.FAILED_SIMILARITY]
    assert got.pair_quality.tolist() == [-np.inf, 0.3]
    assert (got.missing_quality, got.missing_embedding) == (1, 1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lfw", "must read NAME=KIND:PATH"),
        ("lfw=zip:x", "unknown kind"),
        ("lfw=pairs:only_one.txt", "takes IMAGE_LIST,PAIR_LIST"),
    ],
)
def test_spec_errors_are_one_sentence(spec, message):
    with pytest.raises(ProtocolError, match=message):
        protocols.load(spec)


def test_shape_mismatch_is_named(tmp_path):
    p = protocols.load_bin(write_pack(tmp_path / "x.bin", 1, [True]))
    with pytest.raises(ProtocolError, match=r"embeddings have shape \(3, 2\)"):
        protocols.compare(p, np.ones((3, 2)), np.ones(2))


def test_lfw_format_pairs_become_a_pack_that_scores_and_evaluates(tmp_path):
    from vitnt_jax import sources

    for rel in ("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg"):
        (tmp_path / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "img" / rel).write_bytes(rel.encode())
    pairs = tmp_path / "xqlfw_pairs.txt"
    pairs.write_text("1 2\nAnn 1 2\nAnn 2 Bob 1\n")
    out = tmp_path / "xqlfw.bin"
    assert protocols.main(["--pairs", str(pairs), "--images", str(tmp_path / "img"), "--out", str(out)]) == 0
    p = protocols.load_bin(out)
    assert p.genuine.tolist() == [True, False] and p.ids == ("0", "1", "2", "3")
    source = sources.insightface_bin(out)  # the scorer reads the same pack, image by image
    assert len(source) == 4 and source.labels == ["1", "1", "0", "0"]
    pairs.write_text("Ann 1 Bob\n")
    assert protocols.main(["--pairs", str(pairs), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "b")]) == 1
