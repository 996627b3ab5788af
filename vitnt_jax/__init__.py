"""vitnt-jax: training-free face image quality (ViTNT-FIQA) in JAX/Flax.

The names below load on first use (PEP 562), so `import vitnt_jax` and every `--help` start
without importing JAX. Scoring runs: `vitnt_jax.pipeline` (load once, score many).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "checkpoint": ("vitnt_jax.checkpoint", None),
    "pipeline": ("vitnt_jax.pipeline", None),
    "PRESETS": ("vitnt_jax.config", "PRESETS"),
    "ViTConfig": ("vitnt_jax.config", "ViTConfig"),
    "get_preset": ("vitnt_jax.config", "get_preset"),
    "FaceViT": ("vitnt_jax.model", "FaceViT"),
    "init_variables": ("vitnt_jax.model", "init_variables"),
    "Scorer": ("vitnt_jax.scorer", "Scorer"),
    "compute_states": ("vitnt_jax.scorer", "compute_states"),
    "score_from_states": ("vitnt_jax.scorer", "score_from_states"),
    "score_streaming": ("vitnt_jax.scorer", "score_streaming"),
    "parse_blocks": ("vitnt_jax.selection", "parse_blocks"),
    "METRICS": ("vitnt_jax.stability", "METRICS"),
    "ScoreSettings": ("vitnt_jax.stability", "ScoreSettings"),
    "quality_from_states": ("vitnt_jax.stability", "quality_from_states"),
}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitnt_jax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
