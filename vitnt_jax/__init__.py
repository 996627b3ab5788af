"""vitnt-jax: training-free face image quality (ViTNT-FIQA) in JAX/Flax."""

from vitnt_jax import checkpoint
from vitnt_jax.config import PRESETS, ViTConfig, get_preset
from vitnt_jax.model import FaceViT, init_variables
from vitnt_jax.scorer import Scorer, compute_states, score_from_states, score_streaming
from vitnt_jax.selection import parse_blocks
from vitnt_jax.stability import METRICS, ScoreSettings, quality_from_states

__all__ = [
    "METRICS",
    "PRESETS",
    "FaceViT",
    "ScoreSettings",
    "Scorer",
    "ViTConfig",
    "checkpoint",
    "compute_states",
    "get_preset",
    "init_variables",
    "parse_blocks",
    "quality_from_states",
    "score_from_states",
    "score_streaming",
]

__version__ = "0.1.0"
