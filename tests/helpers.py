"""Small helpers shared by the tests (import them; conftest.py holds fixtures only)."""


def smooth_faces(n: int, size: int = 32, seed: int = 0):
    """Returns n smooth random uint8 RGB images (JPEG-friendly, and they score differently)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small]


def png_bytes(array, mode=None) -> bytes:
    """Returns `array` encoded as a PNG file's bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pack_with_a_bad_image(path, faces, bad: int = 3):
    """Writes an insightface-style .bin pack of `faces` as PNGs (image `bad` is not an image); returns path."""
    import pickle

    blobs = [png_bytes(f) for f in faces]
    blobs[bad] = b"not an image"
    with open(path, "wb") as f:
        pickle.dump((blobs, [True, False, True][: len(faces) // 2]), f)
    return path
