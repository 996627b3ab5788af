"""MTCNN in JAX: network parity with PyTorch on facenet-pytorch's weights, tiled P-Net, strict conversion
and damaged weights, detection and landmarks on real photos against the reference procedure, grouping
and bounded compilation, face selection, host maths."""

import importlib.metadata

import chex
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from converters import mtcnn as converter
from converters.state_dict import ConversionError
from experiments import torch_mtcnn as tm
from vitnt_jax import models, mtcnn

DATA = tm.facenet_data()
needs_facenet = pytest.mark.skipif(DATA is None, reason="facenet-pytorch (data only) is not installed")


def _photo(package: str, path: str) -> np.ndarray:
    try:
        file = importlib.metadata.distribution(package).locate_file(path)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed")
    return np.asarray(Image.open(file).convert("RGB"))


PHOTOS = {
    "astronaut": ("scikit-image", "skimage/data/astronaut.png"),
    "group": ("insightface", "insightface/data/images/t1.jpg"),
    "aligned": ("insightface", "insightface/data/images/Tom_Hanks_54745.png"),
}


def assert_same_pixels(a, b, size: int, ulps: int = 4) -> None:
    """Pixel coordinates of an image of side `size`, equal to `ulps` float32 ulps at that magnitude.

    Boxes and landmarks are computed at magnitudes up to the image size (box + regression * width),
    so an ulp of the image size is their resolution, whatever the coordinate's own value.
    """
    np.testing.assert_allclose(a, b, rtol=0, atol=ulps * float(np.spacing(np.float32(size))))


def assert_same_probabilities(a, b, ulps: int = 8) -> None:
    """Probabilities (at most 1), equal to `ulps` float32 ulps of 1."""
    np.testing.assert_allclose(a, b, rtol=0, atol=ulps * float(np.finfo(np.float32).eps))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    if DATA is None:
        pytest.skip("facenet-pytorch (data only) is not installed")
    return converter.convert(DATA, tmp_path_factory.mktemp("mtcnn") / "mtcnn.npz")


@pytest.fixture(scope="module")
def detector(weights):
    return mtcnn.Detector.load(weights)


@pytest.fixture(scope="module")
def torch_nets():
    if DATA is None:
        pytest.skip("facenet-pytorch (data only) is not installed")
    return tm.load_nets(DATA)


# ------------------------------------------------------------------------------------------ networks


def _nchw(x):
    return torch.as_tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())


@needs_facenet
def test_networks_match_pytorch_on_the_real_weights(detector, torch_nets):
    pnet, rnet, onet = torch_nets
    rng = np.random.default_rng(0)
    v = detector.variables
    worst = {}
    with torch.no_grad():
        x = rng.uniform(-1, 1, (2, 37, 46, 3)).astype(np.float32)  # odd sides: the ceil-mode pool's last window
        got, want = detector.pnet(v["pnet"], x), pnet(_nchw(x))
        for g, w in zip(got, want, strict=True):
            worst[f"pnet{tuple(w.shape)}"] = np.abs(np.asarray(g) - w.numpy().transpose(0, 2, 3, 1)).max()
        for name, net, apply, size in (("rnet", rnet, detector.rnet, 24), ("onet", onet, detector.onet, 48)):
            x = rng.uniform(-1, 1, (5, size, size, 3)).astype(np.float32)
            got, want = apply(v[name], x), net(_nchw(x))
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                worst[f"{name}{tuple(w.shape)}"] = np.abs(np.asarray(g) - w.numpy()).max()
    assert len(worst) == 7 and max(worst.values()) <= 1e-5, worst


@needs_facenet
def test_padded_pnet_inputs_give_the_unpadded_outputs(detector):
    rng = np.random.default_rng(1)
    v = detector.variables["pnet"]
    a = rng.uniform(-1, 1, (1, 29, 35, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, (1, 20, 17, 3)).astype(np.float32)
    # Both in one zero-padded canvas, b at an even offset beside a, as the pyramid mosaic does.
    canvas = np.zeros((1, 40, 64, 3), np.float32)
    valid = np.zeros((1, 40, 64), bool)
    canvas[0, :29, :35], valid[0, :27, :33] = a[0], True
    canvas[0, 10:30, 36:53], valid[0, 10:28, 36:51] = b[0], True
    reg, prob = detector.pnet(v, canvas, valid)  # the detector's jitted PNet().apply
    for img, (oy, ox) in ((a, (0, 0)), (b, (10, 36))):
        want_reg, want_prob = detector.pnet(v, img)
        h, w = want_prob.shape[1:3]
        np.testing.assert_allclose(reg[0, oy // 2 : oy // 2 + h, ox // 2 : ox // 2 + w], want_reg[0], atol=1e-6)
        np.testing.assert_allclose(prob[0, oy // 2 : oy // 2 + h, ox // 2 : ox // 2 + w], want_prob[0], atol=1e-6)


@needs_facenet
def test_tiled_pnet_equals_untiled_on_odd_sizes(detector):
    rng = np.random.default_rng(2)
    v = detector.variables["pnet"]
    # The smallest level; a level just over 1 and 2 tiles (last pieces 11 pixels: one partial cell);
    # odd sides throughout (the ceil-mode pool's last window); a thin strip.
    sizes = [(12, 12), (mtcnn.TILE + 1, 2 * mtcnn.TILE_STEP + 11), (333, 47), (2 * mtcnn.TILE + 9, 13)]
    levels = [rng.uniform(-1, 1, (*size, 3)).astype(np.float32) for size in sizes]
    assert [len(mtcnn.split_level(*size)) for size in sizes] == [1, 6, 2, 3]
    for level, (reg, prob) in zip(levels, detector.pnet_maps(levels), strict=True):
        want_reg, want_prob = detector.pnet(v, level[None])  # the whole level in one call
        assert reg.shape == want_reg.shape[1:] and prob.shape == want_prob.shape[1:3]
        np.testing.assert_allclose(reg, want_reg[0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(prob, want_prob[0, ..., 1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ conversion


def _states():
    return {n: torch.load(DATA / f"{n}.pt", weights_only=True) for n in mtcnn.NETS}


@needs_facenet
def test_converter_names_missing_unexpected_and_misshaped_keys(tmp_path):
    states = _states()
    del states["rnet"]["dense4.bias"]
    states["onet"]["conv9.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as missing:
        converter.convert_state_dicts({**_states(), "rnet": states["rnet"]})
    assert "rnet.pt" in str(missing.value) and "missing keys [dense4.bias]" in str(missing.value)
    with pytest.raises(ConversionError, match=r"onet.pt .*unexpected keys \[conv9.weight\]"):
        converter.convert_state_dicts({**_states(), "onet": states["onet"]})
    bad = _states()
    bad["pnet"]["prelu2.weight"] = torch.zeros(17)
    with pytest.raises(ConversionError, match=r"prelu2.weight has shape \(17,\), expected \(16,\)"):
        converter.convert_state_dicts(bad)
    with pytest.raises(ConversionError, match="no state_dict for onet"):
        converter.convert_state_dicts({"pnet": states["pnet"], "rnet": _states()["rnet"]})
    # Through files: a folder without onet.pt, and an existing destination.
    for n in ("pnet", "rnet"):
        torch.save(_states()[n], tmp_path / f"{n}.pt")
    with pytest.raises(ConversionError, match="onet.pt does not exist"):
        converter.convert(tmp_path, tmp_path / "out.npz")
    (tmp_path / "taken.npz").write_bytes(b"x")
    with pytest.raises(ConversionError, match="already exists"):
        converter.convert(DATA, tmp_path / "taken.npz")
    nan = _states()["onet"]
    nan["dense6_1.weight"][1, 7] = float("nan")
    torch.save(nan, tmp_path / "onet.pt")
    with pytest.raises(ConversionError, match=r"onet.pt .*\[dense6_1.weight\] hold NaN or infinite values; the"):
        converter.convert(tmp_path, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


@needs_facenet
def test_converted_file_round_trips_and_is_loaded_strictly(weights, tmp_path):
    variables = mtcnn.load_variables(weights)
    want = converter.convert_state_dicts(_states())
    for net in mtcnn.NETS:
        got, expected = (jax.tree_util.tree_leaves_with_path(v[net]) for v in (variables, want))
        assert len(got) == len(expected) > 0
        for (path, a), (_, b) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(path))
    with np.load(weights) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.pop("onet/params/dense6_3/bias")
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(mtcnn.MTCNNError, match=r"missing \['onet/params/dense6_3/bias'\]"):
        mtcnn.load_variables(tmp_path / "short.npz")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(mtcnn.MTCNNError, match="not an MTCNN weights file"):
        mtcnn.load_variables(tmp_path / "foreign.npz")
    with pytest.raises(mtcnn.MTCNNError, match="do not exist"):
        mtcnn.load_variables(tmp_path / "absent.npz")
    with pytest.raises(mtcnn.MTCNNError, match=r"no MTCNN weights file given; vitnt_jax.models.mtcnn_weights\(\)"):
        mtcnn.Detector.load(None)
    assert converter.main([str(DATA), str(tmp_path / "cli.npz")]) == 0 and (tmp_path / "cli.npz").is_file()


def _damaged(weights, path, kind):
    raw = weights.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        return path
    if kind == "flipped byte":  # the middle of the file is array data: the zip CRC catches it
        damaged = bytearray(raw)
        damaged[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        return path
    with np.load(weights) as data:
        arrays = {k: data[k] for k in data.files}
    if kind == "meta not an object":
        arrays["__meta__"] = np.array(f'["{mtcnn.WEIGHTS_FORMAT}"]')
    elif kind == "strings":
        arrays["pnet/params/conv1/bias"] = np.full(10, "x")
    elif kind == "NaN":
        arrays["onet/params/dense6_1/kernel"][3, 1] = np.nan
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


DAMAGE = {
    "truncated": r"are damaged or unreadable \(BadZipFile\)",
    "flipped byte": r"are damaged or unreadable \(BadZipFile\)",
    "meta not an object": "is not an MTCNN weights file",
    "strings": r"pnet/params/conv1/bias holds <U1 values, not floats",
    "NaN": "onet/params/dense6_1/kernel holds NaN or infinite values",
}


@needs_facenet
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_weights_are_one_sentence_naming_the_file_and_the_fix(weights, tmp_path, monkeypatch, kind):
    path = _damaged(weights, tmp_path / "mtcnn.npz", kind)
    with pytest.raises(mtcnn.MTCNNError, match=DAMAGE[kind]) as error:
        mtcnn.load_variables(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert message.endswith("; convert them again with `python -m converters.mtcnn`.")
    # The cached conversion: deleting it is the fix (it is converted again on the next run).
    monkeypatch.setenv("VITNT_JAX_CACHE", str(tmp_path))
    cached = _damaged(weights, tmp_path / mtcnn.WEIGHTS_NAME, kind)
    with pytest.raises(mtcnn.MTCNNError, match=DAMAGE[kind]) as error:
        mtcnn.Detector.load(models.mtcnn_weights())
    assert str(error.value).endswith(f"; delete {cached} so that it is converted again on the next run.")


# ------------------------------------------------------------------------------------------ detection


@needs_facenet
@pytest.mark.parametrize("name, faces", [("astronaut", 1), ("group", 8), ("aligned", 1)])
def test_detection_matches_the_reference_procedure(detector, torch_nets, name, faces):
    image = _photo(*PHOTOS[name])
    boxes, scores, landmarks = tm.detect(image, torch_nets)
    got = detector.detect(image)
    assert len(scores) == faces and len(got) == faces
    np.testing.assert_allclose(got.landmarks, landmarks, atol=0.05)  # pixels
    np.testing.assert_allclose(got.boxes, boxes, atol=0.05)
    np.testing.assert_allclose(got.scores, scores, atol=1e-4)
    # Anatomy: eyes above the nose above the mouth; the left eye (as seen) left of the right eye.
    for (le, re, nose, lm, rm), box in zip(got.landmarks, got.boxes, strict=True):
        assert le[0] < re[0] and lm[0] < rm[0]
        assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
        assert box[0] <= nose[0] <= box[2] and box[1] <= nose[1] <= box[3]


@needs_facenet
def test_landmarks_of_an_aligned_face_are_near_the_template(detector):
    from vitnt_jax.align import estimate

    got = detector.detect(_photo(*PHOTOS["aligned"]))
    # A face aligned already (by another detector, in a slight 3/4 pose) needs almost no transform.
    m = estimate(got.landmarks[0])
    scale, angle = np.hypot(*m[:, 0]), np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    assert 0.85 < scale < 1.15 and abs(angle) < 5 and np.abs(m[:, 2]).max() < 12


@needs_facenet
def test_grey_and_noise_have_no_face(detector):
    rng = np.random.default_rng(0)
    grey = np.full((160, 200, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    tiny = np.full((8, 8, 3), 200, np.uint8)  # below the smallest pyramid level
    assert [len(f) for f in detector.detect_batch([grey, noise, tiny])] == [0, 0, 0]
    assert mtcnn.select_face(detector.detect(grey), 160, 200) is None


@needs_facenet
def test_batches_and_groups_of_mixed_sizes_equal_one_image_at_a_time(detector, weights):
    astronaut = _photo(*PHOTOS["astronaut"])
    face = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.BILINEAR))
    small = np.asarray(Image.fromarray(astronaut).resize((300, 260), Image.BILINEAR))
    grey = np.full((120, 90, 3), 90, np.uint8)
    images = [small, grey, face, small[:, ::-1].copy()]  # the mirror has the face too
    together = detector.detect_batch(images)
    # A small pixel budget splits the batch (tables, tiles, R-/O-Net batches): the same results.
    split = mtcnn.Detector.load(weights, group_pixels=100_000)
    assert split.groups([i.shape for i in images]) == [[0, 1], [2], [3]]
    grouped = split.detect_batch(images)
    for image, got, other in zip(images, together, grouped, strict=True):
        alone = detector.detect(image)
        for faces in (got, other):
            assert len(faces) == len(alone)  # exact: the same faces
            # Other batch rows and tile packings: the nets' outputs may differ by float32 ulps (AVX2 vs AVX-512).
            assert_same_pixels(faces.landmarks, alone.landmarks, max(image.shape))
            assert_same_pixels(faces.boxes, alone.boxes, max(image.shape))
            assert_same_probabilities(faces.scores, alone.scores)
    assert [len(f) for f in together] == [1, 0, 1, 1]


@needs_facenet
def test_pnet_compilations_are_bounded_whatever_the_photo_sizes(weights):
    detector = mtcnn.Detector.load(weights)
    shapes = []

    def apply(variables, x, valid):
        shapes.append(x.shape)  # runs once per trace, i.e. once per compilation
        return mtcnn.PNet().apply(variables, x, valid)

    bound = mtcnn.MAX_TILES.bit_length()  # calls of 1, 2, 4, ..., MAX_TILES tiles
    detector.pnet_tiles = jax.jit(chex.assert_max_traces(apply, n=bound))
    rng = np.random.default_rng(3)
    sizes = [tuple(hw) for hw in rng.integers(16, 480, (24, 2))]
    assert len(set(sizes)) == 24
    for lo, n in ((0, 1), (1, 2), (3, 3), (6, 4), (10, 6), (16, 8)):
        detector.detect_batch([rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes[lo : lo + n]])
    assert len(shapes) == len(set(shapes)) <= bound
    assert {s[1:] for s in shapes} == {(mtcnn.TILE, mtcnn.TILE, 3)} and all(s[0] & (s[0] - 1) == 0 for s in shapes)
    assert len(shapes) >= 3  # these sizes needed several tile counts, so the bound was tested


@needs_facenet
def test_bad_inputs_and_settings_are_refused(weights):
    variables = mtcnn.load_variables(weights)
    with pytest.raises(ValueError, match="min_face_size must be at least 12 pixels"):
        mtcnn.Detector(variables, min_face_size=11.5)
    with pytest.raises(ValueError, match="group_pixels"):
        mtcnn.Detector(variables, group_pixels=0)
    with pytest.raises(ValueError, match="thresholds"):
        mtcnn.Detector(variables, thresholds=(0.6, 0.7))
    with pytest.raises(mtcnn.MTCNNError, match="missing"):
        mtcnn.Detector({"pnet": variables["pnet"]})
    with pytest.raises(ValueError, match="uint8 RGB"):
        mtcnn.Detector(variables).detect(np.zeros((20, 20), np.uint8))


# ------------------------------------------------------------------------------------------ selection


def _faces(boxes):
    boxes = np.asarray(boxes, np.float32)
    return mtcnn.Faces(boxes, np.ones(len(boxes), np.float32), np.zeros((len(boxes), 5, 2), np.float32))


def test_select_face_prefers_the_largest_face_on_the_centre():
    # 200x100 image, centre (99.5, 49.5): a big bystander at the edge, a smaller face on the centre.
    faces = _faces([[0, 0, 60, 90], [80, 30, 120, 70], [90, 40, 110, 60]])
    assert mtcnn.select_face(faces, 100, 200) == 1
    assert mtcnn.select_face(_faces([[0, 0, 60, 90], [140, 0, 160, 20]]), 100, 200) == 0  # none central
    assert mtcnn.select_face(_faces(np.zeros((0, 4))), 100, 200) is None


# ------------------------------------------------------------------------------------------ host maths


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.9], np.float32)
    assert list(mtcnn.nms(boxes, scores, 0.5)) == [1, 2]  # 3 ties with 1 but overlaps it (IoU 0.68)
    assert list(mtcnn.nms(boxes, scores, 0.7)) == [1, 3, 2]
    # 'Min': a box inside a bigger one overlaps it fully, whatever the IoU.
    nested = np.array([[0, 0, 99, 99], [10, 10, 29, 29]], np.float32)
    assert list(mtcnn.nms(nested, np.array([0.5, 0.9], np.float32), 0.7, min_area=True)) == [1]
    assert list(mtcnn.nms(nested, np.array([0.5, 0.9], np.float32), 0.7)) == [1, 0]


@pytest.mark.parametrize("size", [(7, 5), (24, 24), (31, 60), (100, 3)])
def test_area_resize_matches_torch_interpolate_area(size):
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (45, 38, 3), dtype=np.uint8)
    sat = mtcnn.integral_image(image)
    got = mtcnn.area_resize(sat, [3, 0], [40, 45], [5, 0], [20, 38], *size)
    for k, (y0, y1, x0, x1) in enumerate([(3, 40, 5, 20), (0, 45, 0, 38)]):
        crop = torch.as_tensor(image[y0:y1, x0:x1].transpose(2, 0, 1)[None].astype(np.float32))
        want = F.interpolate(crop, size=size, mode="area")[0].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(got[k], want, atol=1e-4)


def test_level_pieces_partition_the_cells_and_tiles_never_overlap():
    rng = np.random.default_rng(0)
    shapes = (
        [(250, 250)] * 8 + [(112, 112), (886, 1280), (61, 700)] + [tuple(s) for s in rng.integers(12, 1500, (12, 2))]
    )
    sizes = [s for h, w in shapes for s in mtcnn.pyramid_sizes(h, w, 20, 0.709)]
    pieces = []
    for h, w in sizes:
        cells = np.zeros((mtcnn._pnet_out(h), mtcnn._pnet_out(w)), int)
        for y, x, ph, pw in mtcnn.split_level(h, w):
            assert y % 2 == 0 and x % 2 == 0 and ph <= mtcnn.TILE and pw <= mtcnn.TILE
            assert y + ph <= h and x + pw <= w
            cells[y // 2 : y // 2 + mtcnn._pnet_out(ph), x // 2 : x // 2 + mtcnn._pnet_out(pw)] += 1
            pieces.append((ph, pw))
        assert (cells == 1).all(), (h, w)  # every cell computed exactly once
    spots, count = mtcnn.pack_tiles(pieces)
    used = np.zeros((count, mtcnn.TILE, mtcnn.TILE), int)
    for (h, w), (tile, y, x) in zip(pieces, spots, strict=True):
        assert y % 2 == 0 and x % 2 == 0  # P-Net's stride-2 grid
        used[tile, y : y + h + h % 2, x : x + w + w % 2] += 1  # with the masked row/column of odd sides
    assert used.max() == 1 and used.sum() == sum((h + h % 2) * (w + w % 2) for h, w in pieces)
    assert used.shape[1:] == (mtcnn.TILE, mtcnn.TILE) and used.mean() > 0.8  # tiles are not mostly padding
    lfw = [p for s in mtcnn.pyramid_sizes(250, 250, 20, 0.709) for p in mtcnn.split_level(*s)] * 64
    assert mtcnn.pack_tiles([p[2:] for p in lfw])[1] <= 34  # LFW pyramids: 87% of the tile pixels
    for n in (0, 1, 5, mtcnn.MAX_TILES, 3 * mtcnn.MAX_TILES + 7):
        calls = mtcnn.tile_calls(n)
        assert sum(calls) == n and all(c & (c - 1) == 0 and c <= mtcnn.MAX_TILES for c in calls)
    assert mtcnn.pyramid_scales(250, 250, 20, 0.709)[:2] == pytest.approx([0.6, 0.6 * 0.709])
    assert mtcnn.pyramid_scales(11, 11, 20, 0.709) == []


def test_integral_image_and_level_parts_are_exact():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (300, 530, 3), dtype=np.uint8)  # wider and taller than one band
    sat = mtcnn.integral_image(image)
    want = np.zeros((301, 531, 3), np.int64)
    want[1:, 1:] = image.astype(np.int64).cumsum(0).cumsum(1)
    np.testing.assert_array_equal(sat, want)
    whole = mtcnn.area_resize(sat, 0, 300, 0, 530, 181, 319)[0]
    np.testing.assert_array_equal(mtcnn.area_level(sat, 181, 319, (17, 180), (3, 250)), whole[17:180, 3:250])


def test_weights_files_claiming_more_than_they_hold_are_refused_before_any_array_is_read(tmp_path):
    # An array header claiming 2**40 values over 16 bytes, and a deflated member of 1 GiB of zeros:
    # np.load would allocate (or inflate) all of it; each is one sentence, from the claims alone.
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    with zipfile.ZipFile(tmp_path / "claim.npz", "w") as out:
        out.writestr("x.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(16))
    deflated = zipfile.ZipInfo("x.npy")
    deflated.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as out, out.open(deflated, "w", force_zip64=True) as member:
        member.write(b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
        for _ in range(64):
            member.write(bytes(1 << 24))
    for name in ("claim.npz", "bomb.npz"):
        with pytest.raises(mtcnn.MTCNNError) as caught:
            mtcnn.load_variables(tmp_path / name)
        assert str(caught.value).startswith(f"MTCNN weights {tmp_path / name} are damaged or unreadable (ValueError)")
