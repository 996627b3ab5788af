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


def returns_within(seconds, call):
    """Returns ('ok', value) or ('error', exception) of call(), or None when it is still running after `seconds`."""
    import threading

    outcome = []

    def run():
        try:
            outcome.append(("ok", call()))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else None


def tiny_clip_config():
    """Returns a tiny OpenAI-CLIP-layout config (32 px, 8 px patches, width 16, 3 blocks) for converter tests."""
    import dataclasses

    from vitnt_jax.config import PRESETS

    return dataclasses.replace(
        PRESETS["clip_vit_b16"],
        name="tiny_clip",
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=3,
        num_heads=2,
        embedding_dim=8,
    )
