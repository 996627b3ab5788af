"""Small helpers shared by the tests (import them; conftest.py holds fixtures only)."""


def smooth_faces(n: int, size: int = 32, seed: int = 0):
    """Returns n smooth random uint8 RGB images (JPEG-friendly, and they score differently)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small]
