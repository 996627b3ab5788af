"""5-point alignment: Umeyama estimate, template mapping, bilinear warp."""

import numpy as np
import pytest

from vitnt_jax import align


def _similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


def _apply(matrix, points):
    return points @ matrix[:2, :2].T + matrix[:2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_recovers_a_known_similarity(seed):
    rng = np.random.default_rng(seed)
    want = _similarity(rng.uniform(0.2, 5), rng.uniform(-np.pi, np.pi), *rng.uniform(-300, 300, 2))
    src = rng.uniform(0, 500, (7, 2))
    got = align.umeyama(src, _apply(want, src))
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_umeyama_is_least_squares_and_never_reflects():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for _ in range(5):
        src = rng.uniform(0, 200, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))  # no exact similarity exists
        reference = skimage_transform.SimilarityTransform.from_estimate(src, dst).params
        np.testing.assert_allclose(align.umeyama(src, dst), reference, atol=1e-9)
    mirrored = align.ARCFACE_TEMPLATE * [-1, 1]  # only a reflection maps it onto the template exactly
    m = align.umeyama(mirrored, align.ARCFACE_TEMPLATE)
    assert np.linalg.det(m[:2, :2]) > 0
    assert np.abs(_apply(m, mirrored) - align.ARCFACE_TEMPLATE).max() > 5


@pytest.mark.parametrize("seed", range(4))
def test_landmarks_land_on_the_template(seed):
    rng = np.random.default_rng(seed)
    # A face somewhere in a photo: the template under a random similarity, plus detector noise.
    photo = _similarity(rng.uniform(0.5, 3), rng.uniform(-0.6, 0.6), *rng.uniform(50, 300, 2))
    marks = _apply(photo, align.ARCFACE_TEMPLATE)
    matrix = align.estimate(marks)
    np.testing.assert_allclose(_apply(np.vstack([matrix, [0, 0, 1]]), marks), align.ARCFACE_TEMPLATE, atol=1e-6)
    # Through pixels: bright dots at the landmarks come out at the template, within half a pixel.
    yy, xx = np.mgrid[0:600, 0:600]
    image = np.zeros((600, 600, 3))
    for x, y in marks:
        image[..., 0] += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (2.0 * photo[0, 0]) ** 2))
    crop = align.align(np.clip(image, 0, 255).astype(np.uint8), marks)[..., 0].astype(np.float64)
    v, u = np.mgrid[0:112, 0:112]
    for tx, ty in align.ARCFACE_TEMPLATE:
        near = ((u - tx) ** 2 + (v - ty) ** 2 < 5**2) * crop
        centroid = np.array([(near * u).sum(), (near * v).sum()]) / near.sum()
        assert np.abs(centroid - [tx, ty]).max() <= 0.5


def test_warp_translation_rotation_and_linear_ramps_are_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    shift = _similarity(1, 0, -5, -7)[:2]  # crop (u, v) reads image (u + 5, v + 7)
    np.testing.assert_array_equal(align.warp(image, shift, 20), image[7:27, 5:25])
    # 90 degrees about the centre of a square image is np.rot90.
    square = image[:40, :40]
    turn = np.array([[0.0, 1, 0], [-1, 0, 39]])  # (x, y) -> (y, 39 - x)
    np.testing.assert_array_equal(align.warp(square, turn, 40), np.rot90(square))
    # Bilinear interpolation reproduces a linear ramp exactly at any sub-pixel position.
    yy, xx = np.mgrid[0:64, 0:64]
    ramp = np.repeat((2 * xx + yy)[..., None], 3, axis=2).astype(np.uint8)
    m = _similarity(1.7, 0.3, 4.25, 2.5)
    out = align.warp(ramp, m[:2], 24).astype(np.float64)
    v, u = np.mgrid[0:24, 0:24]
    src = _apply(np.linalg.inv(m), np.stack([u, v], -1).reshape(-1, 2)).reshape(24, 24, 2)
    want = 2 * src[..., 0] + src[..., 1]
    inside = (src.min(-1) >= 0) & (src[..., 0] <= 63) & (src[..., 1] <= 63)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[..., 0][inside], np.rint(want[inside]), atol=1)


def test_warp_outside_is_black_and_batches_match_single_images():
    rng = np.random.default_rng(2)
    images = rng.integers(1, 256, (3, 30, 30, 3), dtype=np.uint8)
    far = _similarity(1, 0, 500, 500)[:2]
    assert not align.warp(images[0], far, 16).any()
    matrices = np.stack([_similarity(rng.uniform(0.8, 1.5), rng.uniform(-1, 1), 3, -2)[:2] for _ in range(3)])
    batch = align.warp(images, matrices, 16)
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    for k in range(3):
        np.testing.assert_array_equal(batch[k], align.warp(images[k], matrices[k], 16))


def test_template_scales_with_the_crop():
    np.testing.assert_allclose(align.template(224), 2 * align.ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="point sets"):
        align.umeyama(np.zeros((1, 2)), np.zeros((1, 2)))
