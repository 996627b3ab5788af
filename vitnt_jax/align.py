"""5-point face alignment: a similarity transform onto the ArcFace template, and a bilinear warp.

Coordinates are pixels with pixel centres at integers (OpenCV's convention, which both MTCNN's
landmarks and the ArcFace template use); a matrix M (2, 3) maps image (x, y, 1) to crop (u, v).
The warp reads the image at M^-1 (u, v) bilinearly, with zeros outside the image, as
cv2.warpAffine(..., borderValue=0) does.
"""

from __future__ import annotations

import numpy as np

# Left eye, right eye, nose tip, left and right mouth corner (as seen in the image) of an aligned
# 112x112 face: insightface's arcface_dst, the template the face ViTs were trained on.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float64,
)
TEMPLATE_SIZE = 112


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Returns the (3, 3) similarity (scale, rotation, translation; no reflection) that best maps src onto dst.

    Least squares over the point pairs (Umeyama 1991). src, dst: (n, 2), n >= 2.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"expected two (n, 2) point sets with n >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)
    # A negative determinant would need a reflection; flip the weakest axis instead.
    sign = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(sign) @ vt
    variance = (s**2).sum() / len(src)
    scale = (sv * sign).sum() / variance if variance > 0 else 1.0
    out = np.eye(3)
    out[:2, :2] = scale * rotation
    out[:2, 2] = mu_d - scale * rotation @ mu_s
    return out


def template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Returns the (5, 2) ArcFace template for a size x size crop (scaled from 112)."""
    return ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)


def estimate(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Returns the (2, 3) matrix that maps the (5, 2) landmarks onto the template of a size x size crop."""
    return umeyama(landmarks, template(size))[:2]


def warp(images: np.ndarray, matrices: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Returns the size x size crops of uint8 images under (2, 3) image->crop matrices.

    images: (H, W, C) with matrices (2, 3), or a batch (B, H, W, C) with (B, 2, 3).
    Bilinear interpolation; what falls outside the image is black (0).
    """
    images, matrices = np.asarray(images), np.asarray(matrices, np.float64)
    if images.ndim == 3:
        return warp(images[None], matrices[None], size)[0]
    b, h, w, c = images.shape
    full = np.concatenate([matrices, np.broadcast_to([0.0, 0.0, 1.0], (b, 1, 3))], 1)
    inverse = np.linalg.inv(full)[:, :2]  # crop (u, v, 1) -> image (x, y)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    grid = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    xy = np.einsum("bij,nj->bni", inverse, grid)  # (B, size*size, 2)
    x0, y0 = np.floor(xy[..., 0]), np.floor(xy[..., 1])
    fx, fy = (xy[..., 0] - x0)[..., None], (xy[..., 1] - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    batch = np.arange(b)[:, None]
    flat = images.astype(np.float64)

    def pixel(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))[..., None]
        return np.where(inside, flat[batch, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    out = (
        pixel(y0, x0) * (1 - fx) * (1 - fy)
        + pixel(y0, x0 + 1) * fx * (1 - fy)
        + pixel(y0 + 1, x0) * (1 - fx) * fy
        + pixel(y0 + 1, x0 + 1) * fx * fy
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(b, size, size, c)


def align(image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Returns the size x size uint8 face aligned by its (5, 2) landmarks onto the ArcFace template."""
    return warp(image, estimate(landmarks, size), size)
