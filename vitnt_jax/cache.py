"""Where converted models and weights are cached: $VITNT_JAX_CACHE, else ~/.cache/vitnt_jax."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VITNT_JAX_CACHE"


def cache_dir() -> Path:
    """Returns the folder converted named models and MTCNN weights are cached in (read at each call)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vitnt_jax")
