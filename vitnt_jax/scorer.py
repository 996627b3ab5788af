"""Jitted ViTNT-FIQA scoring: the model plus a tap, in one compiled function per batch shape."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitnt_jax.config import ViTConfig
from vitnt_jax.model import FaceViT, truncate_blocks
from vitnt_jax.stability import ScoreSettings, StatesTap, StreamingTap, quality_from_states

Array = jax.Array
PyTree = Any


def preprocess(images: Array, config: ViTConfig) -> Array:
    """Returns float32 model input from (B, H, W, C) uint8 RGB: channel order and mean/std of `config`.

    Face ViTs: (x / 255 - 0.5) / 0.5, i.e. [-1, 1].
    """
    x = images.astype(jnp.float32)
    if config.color == "bgr":
        x = x[..., ::-1]
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)
    return (x / 255.0 - mean) / std


def compute_states(
    config: ViTConfig,
    variables: PyTree,
    images: Array,
    settings: ScoreSettings,
    *,
    precision: Any = None,
) -> dict[str, Array]:
    """Returns {'states' (K, B, N, D), 'received' (K, B, N) or absent} for the selected blocks.

    The research/export path: every run block's normalised tokens are stacked by the scan, then
    the K selected ones are gathered. images: (B, H, W, C) float, already preprocessed.
    """
    run = settings.num_blocks_to_run
    tap = StatesTap(with_attention=settings.uses_attention)
    out = FaceViT(config, precision=precision).apply(truncate_blocks(variables, run), images, tap=tap, num_blocks=run)[
        "per_block"
    ]
    idx = jnp.asarray(settings.blocks)
    return {key: value[idx] for key, value in out.items()}


def score_from_states(
    config: ViTConfig,
    variables: PyTree,
    images: Array,
    settings: ScoreSettings,
    *,
    precision: Any = None,
) -> dict[str, Array]:
    """Returns the score dict (see `quality_from_states`) computed through the states path."""
    got = compute_states(config, variables, images, settings, precision=precision)
    return quality_from_states(got["states"], got.get("received"), settings)


def score_streaming(
    config: ViTConfig,
    variables: PyTree,
    images: Array,
    settings: ScoreSettings,
    *,
    embed: bool = False,
    precision: Any = None,
    dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Returns the score dict with the score folded into the scan carry (flat memory in depth).

    `variables` must hold exactly `settings.num_blocks_to_run` blocks, or all of them when
    embed=True (the embedding needs the full depth); see `truncate_blocks`.
    images: (B, H, W, C) float, already preprocessed.
    """
    tap = StreamingTap(settings)
    run = config.depth if embed else settings.num_blocks_to_run
    out = FaceViT(config, dtype=dtype, precision=precision).apply(
        variables, images, tap=tap, num_blocks=run, embed=embed
    )
    result = tap.finish(out["tap_state"])
    if embed:
        result["embedding"] = out["embedding"].astype(jnp.float32)
    return result


class Scorer:
    """A compiled scorer for uint8 batches of one fixed shape: `scorer(images_uint8) -> dict`.

    Holds the parameters already truncated to the blocks that must run, so nothing after the
    last selected block is ever computed (unless the embedding is asked for).
    """

    def __init__(
        self,
        config: ViTConfig,
        variables: PyTree,
        settings: ScoreSettings,
        *,
        embed: bool = False,
        precision: Any = "highest",
        dtype: Any = jnp.float32,
    ):
        if settings.blocks[-1] >= config.depth:
            raise ValueError(f"block {settings.blocks[-1]} does not exist in a {config.depth}-block model.")
        self.config = config
        self.settings = settings
        self.embed = embed
        run = config.depth if embed else settings.num_blocks_to_run
        self.variables = jax.device_put(truncate_blocks(variables, run))
        self._fn: Callable = jax.jit(
            functools.partial(
                _score_uint8,
                config=config,
                settings=settings,
                embed=embed,
                precision=precision,
                dtype=dtype,
            )
        )

    def __call__(self, images: np.ndarray | Array) -> dict[str, Array]:
        """Returns the score dict for (B, H, W, C) uint8 RGB images at the model's input size."""
        return self._fn(self.variables, images)


def _score_uint8(variables, images, *, config, settings, embed, precision, dtype):
    return score_streaming(
        config,
        variables,
        preprocess(images, config),
        settings,
        embed=embed,
        precision=precision,
        dtype=dtype,
    )
