"""ViTNT-FIQA scoring maths: pure jax.numpy, no Flax, no I/O.

Shapes: B images, N patch tokens, D width, H heads, K selected blocks.
The method (Ozgur et al., arXiv 2601.05741), as the authors' published code computes it:
  z_p^t = FinalLN(x_p^t) / ||FinalLN(x_p^t)||         for every selected block t
  d_p   = 1/(K-1) * sum_i metric(z_p^{t_i}, z_p^{t_(i+1)})   (metric: Euclidean)
  q_p   = 2 / (1 + exp(alpha * d_p))                  in (0, 1]
  Q     = mean_p q_p   or   sum_p w_p q_p,  w = attention each patch receives, summing to 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Aggregation = Literal["mean", "attention"]
AttentionSource = Literal["last", "all"]

# Smallest norm we divide by: a zero vector stays zero instead of becoming NaN.
_TINY = 1e-12


def l2_normalize(x: Array) -> Array:
    """Returns x / ||x|| over the last axis, float32; zero vectors stay zero."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _TINY)


def euclidean(a: Array, b: Array) -> Array:
    """Returns ||a - b||_2 over the last axis (the method's metric)."""
    diff = a - b
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1))


def cosine(a: Array, b: Array) -> Array:
    """Returns 1 - <a, b> over the last axis: cosine distance of unit vectors, in [0, 2]."""
    return 1.0 - jnp.sum(a * b, axis=-1)


def angular(a: Array, b: Array) -> Array:
    """Returns arccos(<a, b>) / pi over the last axis: angle between unit vectors, in [0, 1]."""
    return jnp.arccos(jnp.clip(jnp.sum(a * b, axis=-1), -1.0, 1.0)) / jnp.pi


def l1(a: Array, b: Array) -> Array:
    """Returns sum |a - b| over the last axis (Manhattan distance)."""
    return jnp.sum(jnp.abs(a - b), axis=-1)


METRICS: dict[str, Callable[[Array, Array], Array]] = {
    "euclidean": euclidean,
    "cosine": cosine,
    "angular": angular,
    "l1": l1,
}


def patch_quality(distance: Array, alpha: float) -> Array:
    """Returns q = 2 / (1 + exp(alpha * d)) = 2 * sigmoid(-alpha * d), same shape as distance."""
    return 2.0 * jax.nn.sigmoid(-alpha * distance)


def attention_received(attention: Array) -> Array:
    """Returns the attention each key patch receives: (B, H, Nq, Nk) -> mean over H, sum over Nq -> (B, Nk).

    The one definition: the model applies it to each read block's softmax weights (a tap's `attention`).
    """
    return attention.astype(jnp.float32).mean(axis=1).sum(axis=1)


def normalize_weights(received: Array) -> Array:
    """Returns (B, N) weights that sum to 1 over N."""
    return received / jnp.sum(received, axis=-1, keepdims=True)


def aggregate(quality: Array, weights: Array | None) -> Array:
    """Returns the (B,) image quality: mean of (B, N) patch qualities, or their weighted sum."""
    if weights is None:
        return quality.mean(axis=-1)
    return jnp.sum(quality * weights, axis=-1)


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """How to score: which blocks, alpha, metric and aggregation. Hashable (a jit static)."""

    blocks: tuple[int, ...]
    alpha: float = 8.0
    metric: str = "euclidean"
    aggregation: Aggregation = "attention"
    attention: AttentionSource = "last"

    def __post_init__(self):
        if len(self.blocks) < 2:
            raise ValueError(f"select at least two blocks to measure token movement (got {list(self.blocks)}).")
        if list(self.blocks) != sorted(set(self.blocks)) or self.blocks[0] < 0:
            raise ValueError(f"blocks must be distinct, sorted and non-negative (got {list(self.blocks)}).")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number (got {self.alpha}).")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}.")
        if self.aggregation not in ("mean", "attention"):
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose mean or attention.")
        if self.attention not in ("last", "all"):
            raise ValueError(f"unknown attention source {self.attention!r}; choose last or all.")

    @property
    def uses_attention(self) -> bool:
        return self.aggregation == "attention"

    @property
    def num_blocks_to_run(self) -> int:
        """Blocks after the last selected one never need to run."""
        return self.blocks[-1] + 1


def _finish(dist_sum: Array, received: Array | None, settings: ScoreSettings) -> dict[str, Array]:
    distance = dist_sum / (len(settings.blocks) - 1)
    q = patch_quality(distance, settings.alpha)
    weights = None if received is None else normalize_weights(received)
    out = {"quality": aggregate(q, weights), "patch_quality": q, "patch_distance": distance}
    if weights is not None:
        out["patch_weight"] = weights
    return out


def quality_from_states(states: Array, received: Array | None, settings: ScoreSettings) -> dict[str, Array]:
    """Returns {'quality' (B,), 'patch_quality' (B, N), 'patch_distance' (B, N)[, 'patch_weight']}.

    states: (K, B, N, D) L2-normalised final-norm tokens of the K selected blocks, in order.
    received: (K, B, N) attention received per selected block (`attention_received`), or None
      when the aggregation is 'mean'.
    """
    metric = METRICS[settings.metric]
    dist_sum = jnp.sum(metric(states[:-1], states[1:]), axis=0)
    if settings.uses_attention:
        if received is None:
            raise ValueError("attention aggregation needs the attention received per block.")
        received = received[-1] if settings.attention == "last" else received.mean(axis=0)
    else:
        received = None
    return _finish(dist_sum, received, settings)


class StatesTap:
    """Emits every run block's L2-normalised final-norm tokens (and attention received)."""

    def __init__(self, with_attention: bool):
        self.attention = attention_received if with_attention else None

    def __hash__(self):
        return hash((StatesTap, self.attention))

    def __eq__(self, other):
        return isinstance(other, StatesTap) and other.attention == self.attention

    def init(self, tokens: Array):
        return ()

    def step(self, state, index, tokens, normed, attention):
        # attention: the (B, N) attention each patch receives (`attention_received`).
        out = {"states": l2_normalize(normed)}
        if self.attention:
            out["received"] = attention
        return state, out


@dataclasses.dataclass(frozen=True)
class StreamingTap:
    """Folds the score into the scan carry: memory does not grow with the number of blocks.

    Carry: previous selected state (B, N, D), running distance sums (B, N) and attention
    received (B, N): the last selected block's, or the sum over selected blocks.
    """

    settings: ScoreSettings

    @property
    def attention(self) -> Callable[[Array], Array] | None:
        """Returns `attention_received` when the score reads attention (the model applies it per block)."""
        return attention_received if self.settings.uses_attention else None

    @property
    def attention_blocks(self) -> tuple[int, ...] | None:
        """The blocks whose attention the score reads: the last selected one, or every selected one."""
        if not self.settings.uses_attention:
            return None
        return self.settings.blocks[-1:] if self.settings.attention == "last" else self.settings.blocks

    def init(self, tokens: Array):
        b, n, d = tokens.shape
        return {
            "previous": jnp.zeros((b, n, d), jnp.float32),
            "dist_sum": jnp.zeros((b, n), jnp.float32),
            "received": jnp.zeros((b, n), jnp.float32),
        }

    def step(self, state, index, tokens, normed, attention):
        blocks = self.settings.blocks
        # Membership test, not a lookup table: blocks past the last selected one may still run
        # (when the embedding is wanted) and must not be counted.
        selected = jnp.any(index == jnp.asarray(blocks))
        z = l2_normalize(normed)
        d = METRICS[self.settings.metric](state["previous"], z)
        counts = selected & (index != blocks[0])  # the first selected block has no predecessor
        new = {
            "previous": jnp.where(selected, z, state["previous"]),
            "dist_sum": state["dist_sum"] + jnp.where(counts, d, 0.0),
            "received": state["received"],
        }
        # attention is None in the blocks outside attention_blocks (the model fuses theirs).
        if attention is not None:
            if self.settings.attention == "last":
                new["received"] = jnp.where(selected, attention, state["received"])
            else:
                new["received"] = state["received"] + jnp.where(selected, attention, 0.0)
        return new, None

    def finish(self, state) -> dict[str, Array]:
        """Returns the same dict as `quality_from_states` from the final carry."""
        received = None
        if self.attention:
            received = state["received"]
            if self.settings.attention == "all":
                received = received / len(self.settings.blocks)
        return _finish(state["dist_sum"], received, self.settings)
