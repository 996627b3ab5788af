"""Training-free FIQA baselines on the same face ViT as ViTNT-FIQA (`python -m experiments.baselines` runs them).

Every baseline is a jitted pure function `(variables, config, images, ...) -> (B,) float32`
quality, HIGHER = BETTER, on the model of `vitnt_jax.model` (no second copy of the network).
`images` is (B, H, W, C) uint8 RGB (preprocessed here with `vitnt_jax.scorer.preprocess`) or
float32 already preprocessed. `BASELINES` lists them with their cost in passes per image.

What each computes, with the published code it follows (read for facts, not copied):

SER-FIQ (Terhoerst et al., CVPR 2020; github.com/pterhoer/FaceImageQuality):
  m = 100 stochastic embeddings with dropout p = 0.5 on the input of the embedding Linear
  (face_image_quality.py at commit 9987e77, lines 183-187: Dropout(0.5) on the flattened
  512x7x7 `dropout0` output, then Dense(512), BatchNorm, L2-normalise; HEAD's get_score, lines
  123-165, runs T = 100 passes of the whole network with its dropout always on). Quality
  q = 2 / (1 + exp(mean_{i<j} ||e_i - e_j||_2)) = 2 sigmoid(-mean pairwise distance) of the
  L2-normalised embeddings (HEAD lines 157-163), in (0, 1]. HEAD then rescales with
  1 / (1 + exp(-130 (q - 0.88))), a monotone map (`serfiq_rescale`) that changes no ranking.
  Ours: dropout on the flattened final-normed tokens that enter the face head's feature_0 (the
  same place), put there by `experiments.hooks.dropout_before`. The backbone runs ONCE and only
  the head (`FaceViT.embedding`) runs m times: dropout exists only in the head, so the head's input
  is the same in every pass and this equals m full passes exactly (tests/test_baselines.py checks
  it pass by pass, with the same keys).

GraFIQs (Kolf et al., CVPRW 2024; github.com/jankolf/GraFIQs):
  backbones/bn.py lines 18-44: forward hooks on every BatchNorm2d record the mean and the biased
  variance of its INPUT over (batch, H, W); the loss is the mean over BN layers of
  MSE(mean, running_mean) + MSE(var, running_var). extract_grafiqs.py lines 93-107: one image at
  a time, the gradient of that loss with respect to the normalised input image (and, in other
  output files, to the outputs of the four ResNet stages), score = sum of |gradient|. The raw
  score is lower = better (smaller required change; the author did not contradict that reading in
  jankolf/GraFIQs issue #4), so we return its negative.
  Mapping to a face ViT: its only BatchNorms are the head's two BatchNorm1d (feature_1,
  feature_3); their inputs are (batch, features) with no spatial axis, so with one image the
  "batch mean" is the activation itself and the biased variance is 0. The variance terms are then
  constant (zero gradient) and the loss is 1/2 [MSE(h1, mu1) + MSE(h2, mu2) + const]. We take the
  gradient with respect to the preprocessed image (their `GraFIQs_image` output); the stage
  outputs of a ResNet have no single ViT counterpart and are not offered. The BatchNorm inputs
  are read with `experiments.hooks.record_inputs`, as their hooks read them.

ATTN-FIQA (Ozgur et al., FG 2026; github.com/gurayozgur/ATTN-FIQA):
  backbones/vit/vit.py line 64: pre-softmax scores (q @ k^T) * head_dim^-0.5 of each block;
  lines 298-309: of the LAST block, the mean over heads, queries and keys. Higher = better.
  Ours: the blocks before the read one run as usual, then `Block.attention_logits` of that block.
  Class-token models: the mean runs over the patch-token keys only, as ViTNT-FIQA's weights do.

Embedding norm (MagFace, Meng et al., CVPR 2021; github.com/IrvingMeng/MagFace,
  eval/eval_quality/eval_quality.py lines 33-36): the L2 norm of the un-normalised embedding.
  Meaningful as quality only for magnitude-aware training (MagFace); here a cheap reference.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.hooks import dropout_before, record_inputs
from vitnt_jax.config import ViTConfig
from vitnt_jax.model import Block, FaceViT, truncate_blocks
from vitnt_jax.scorer import preprocess

Array = jax.Array
PyTree = Any

SERFIQ_PASSES = 100
SERFIQ_DROPOUT = 0.5


def model_input(images: Array, config: ViTConfig) -> Array:
    """Returns float32 model input: uint8 images are preprocessed, float images are taken as they are."""
    if images.dtype == jnp.uint8:
        return preprocess(images, config)
    return images.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# SER-FIQ


def serfiq_from_embeddings(embeddings: Array) -> Array:
    """Returns 2 sigmoid(-mean pairwise distance) of (..., m, E) stochastic embeddings: (...,).

    Embeddings are L2-normalised first; the mean runs over the m(m-1)/2 pairs i < j. Distances
    come from explicit differences, not a Gram matrix, so identical embeddings give exactly 1.
    """
    e = embeddings.astype(jnp.float32)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    m = e.shape[-2]
    diff = e[..., :, None, :] - e[..., None, :, :]
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # (..., m, m), symmetric, zero diagonal
    mean = jnp.sum(jnp.triu(dist, k=1), axis=(-2, -1)) / (m * (m - 1) / 2)
    return 2.0 * jax.nn.sigmoid(-mean)


def serfiq_rescale(quality: Array, alpha: float = 130.0, r: float = 0.88) -> Array:
    """Returns 1 / (1 + exp(-alpha (q - r))): the published code's monotone rescaling of q."""
    return jax.nn.sigmoid(alpha * (quality - r))


def image_keys(key: Array, batch: int) -> Array:
    """Returns one PRNG key per image: `key` split `batch` ways, or `key` itself if it already holds `batch` keys."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    if single:
        return jax.random.split(key, batch)
    if key.shape[0] != batch:
        raise ValueError(f"got {key.shape[0]} PRNG keys for {batch} images; pass one key or one per image.")
    return key


def serfiq_head_pass(
    variables: PyTree, config: ViTConfig, tokens: Array, key: Array, *, rate: float, precision: Any = None
) -> Array:
    """Returns the (B, E) embeddings of (B, T, D) final tokens, dropout `rate` on feature_0's input (mask: `key`)."""
    with dropout_before("feature_0", rate, key):
        return FaceViT(config, precision=precision).apply(variables, tokens, method=FaceViT.embedding)


@functools.partial(jax.jit, static_argnames=("config", "passes", "rate", "chunk", "precision"))
def serfiq_embeddings(
    variables: PyTree,
    config: ViTConfig,
    images: Array,
    key: Array,
    *,
    passes: int = SERFIQ_PASSES,
    rate: float = SERFIQ_DROPOUT,
    chunk: int | None = 8,
    precision: Any = None,
) -> Array:
    """Returns the (B, passes, E) stochastic embeddings: one backbone pass, `passes` dropout head passes.

    key: one PRNG key (split into one per image) or B keys; image i's passes use
      split(key_i, passes), so an image's embeddings do not depend on the rest of the batch.
    chunk: images whose head passes run at once (bounds the (chunk, passes, N*D) buffer).
    """
    if config.head not in ("face", "transface"):
        raise ValueError(f"SER-FIQ needs a face embedding head; config {config.name!r} has head {config.head!r}.")
    model = FaceViT(config, precision=precision)
    tokens = model.apply(variables, model_input(images, config))["tokens"]  # every block, no head

    def head_pass(tok: Array, k: Array) -> Array:
        return serfiq_head_pass(variables, config, tok[None], k, rate=rate, precision=precision)[0]

    def per_image(args):
        tok, k = args
        return jax.vmap(head_pass, in_axes=(None, 0))(tok, jax.random.split(k, passes))

    return jax.lax.map(per_image, (tokens, image_keys(key, tokens.shape[0])), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("config", "passes", "rate", "chunk", "precision"))
def serfiq(
    variables: PyTree,
    config: ViTConfig,
    images: Array,
    key: Array,
    *,
    passes: int = SERFIQ_PASSES,
    rate: float = SERFIQ_DROPOUT,
    chunk: int | None = 8,
    precision: Any = None,
) -> Array:
    """Returns the (B,) SER-FIQ quality 2 sigmoid(-mean pairwise distance), in (0, 1]; see `serfiq_embeddings`."""
    embeddings = serfiq_embeddings(
        variables, config, images, key, passes=passes, rate=rate, chunk=chunk, precision=precision
    )
    return serfiq_from_embeddings(embeddings)


# ----------------------------------------------------------------------------------------------
# GraFIQs

_HEAD_BATCH_NORMS = ("feature_1", "feature_3")


def grafiqs_loss(variables: PyTree, config: ViTConfig, image: Array, *, precision: Any = None) -> Array:
    """Returns the scalar BN-statistics loss of ONE preprocessed (H, W, C) image (GraFIQs' bn.py, head BNs).

    Per BatchNorm: MSE(batch mean of its input, running mean) + MSE(biased batch variance,
    running variance), MSE = mean over features; the loss is the mean over the BatchNorms.
    """
    if config.head not in ("face", "transface"):
        raise ValueError(f"GraFIQs needs a face head's BatchNorms; config {config.name!r} has head {config.head!r}.")
    with record_inputs(_HEAD_BATCH_NORMS) as inputs:
        FaceViT(config, precision=precision).apply(variables, image[None], embed=True)
    stats = variables["batch_stats"]
    terms = []
    for name in _HEAD_BATCH_NORMS:
        h = inputs[name]  # (1, features): a batch of one image
        # Statistics over the batch axis, as the hook computes them over (batch, H, W).
        mean, var = h.mean(axis=0), h.var(axis=0)
        terms.append(jnp.mean((mean - stats[name]["mean"]) ** 2) + jnp.mean((var - stats[name]["var"]) ** 2))
    return sum(terms) / len(terms)


@functools.partial(jax.jit, static_argnames=("config", "precision"))
def grafiqs_gradients(variables: PyTree, config: ViTConfig, images: Array, *, precision: Any = None) -> Array:
    """Returns (B, H, W, C) d loss / d image, each image's loss on its own (one backward pass per image)."""
    grad = jax.grad(lambda x: grafiqs_loss(variables, config, x, precision=precision))
    return jax.vmap(grad)(model_input(images, config))


@functools.partial(jax.jit, static_argnames=("config", "precision"))
def grafiqs(variables: PyTree, config: ViTConfig, images: Array, *, precision: Any = None) -> Array:
    """Returns the (B,) GraFIQs quality -sum |d loss / d image| (the published raw score, negated)."""
    return -jnp.sum(jnp.abs(grafiqs_gradients(variables, config, images, precision=precision)), axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# ATTN-FIQA


@functools.partial(jax.jit, static_argnames=("config", "block", "precision"))
def attn_fiqa(variables: PyTree, config: ViTConfig, images: Array, *, block: int = -1, precision: Any = None) -> Array:
    """Returns the (B,) mean pre-softmax attention score (heads x queries x patch keys) of `block` (default: last)."""
    if not -config.depth <= block < config.depth:
        raise ValueError(f"block {block} does not exist in a {config.depth}-block model.")
    before = block % config.depth  # the blocks that run first; those after the read one never run
    x = FaceViT(config, precision=precision).apply(
        truncate_blocks(variables, before), model_input(images, config), num_blocks=before
    )["tokens"]
    params = jax.tree.map(lambda a: a[before], variables["params"]["blocks"])
    logits = Block(config, precision=precision).apply({"params": params}, x, method=Block.attention_logits)
    return logits[..., config.num_prefix_tokens :].astype(jnp.float32).mean(axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Embedding norm


@functools.partial(jax.jit, static_argnames=("config", "precision"))
def embedding_norm(variables: PyTree, config: ViTConfig, images: Array, *, precision: Any = None) -> Array:
    """Returns the (B,) L2 norm of the un-normalised face embedding (MagFace's quality)."""
    e = FaceViT(config, precision=precision).apply(variables, model_input(images, config), embed=True)["embedding"]
    return jnp.linalg.norm(e.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------------------------
# Registry


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline, its cost per image and where its definition comes from."""

    fn: Callable[..., Array]
    needs_key: bool  # takes a PRNG key after `images`
    forward: str  # forward passes per image
    backward: int  # backward passes per image
    source: str


BASELINES: dict[str, Baseline] = {
    "serfiq": Baseline(
        serfiq,
        True,
        f"1 backbone + {SERFIQ_PASSES} head",
        0,
        "pterhoer/FaceImageQuality face_image_quality.py (9987e77 l.183-187; HEAD l.123-165)",
    ),
    "grafiqs": Baseline(grafiqs, False, "1", 1, "jankolf/GraFIQs backbones/bn.py l.18-44, extract_grafiqs.py l.93-107"),
    "attn_fiqa": Baseline(attn_fiqa, False, "1", 0, "gurayozgur/ATTN-FIQA backbones/vit/vit.py l.64, l.298-309"),
    "embedding_norm": Baseline(
        embedding_norm, False, "1", 0, "IrvingMeng/MagFace eval/eval_quality/eval_quality.py l.33-36"
    ),
}


def score(
    name: str, variables: PyTree, config: ViTConfig, images: Array, key: Array | None = None, **options: Any
) -> Array:
    """Returns the (B,) quality of baseline `name` (higher = better); `key` defaults to PRNGKey(0)."""
    try:
        baseline = BASELINES[name]
    except KeyError as error:
        raise KeyError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.") from error
    if baseline.needs_key:
        key = jax.random.PRNGKey(0) if key is None else key
        return baseline.fn(variables, config, images, key, **options)
    return baseline.fn(variables, config, images, **options)


# ----------------------------------------------------------------------------------------------
# As a scorer of the pipeline


def image_seeds(images: np.ndarray) -> np.ndarray:
    """Returns one int32 per (H, W, C) uint8 image: the CRC-32 of its pixels (a key that only the image decides)."""
    return np.array([zlib.crc32(np.ascontiguousarray(image).tobytes()) for image in images], np.uint32).view(np.int32)


class BaselineScorer:
    """A baseline as a `vitnt_jax.pipeline.BatchScorer`: (B, H, W, C) uint8 in, {'quality': (B,)} out.

    Stochastic baselines (SER-FIQ) draw image i's key as fold_in(PRNGKey(seed), `image_seeds`), so an
    image scores the same wherever it sits in a batch, in a run or in a resumed one. One compilation
    per batch size; `dispatch` returns without waiting.
    """

    def __init__(self, name: str, config: ViTConfig, variables: PyTree, *, seed: int = 0, **options: Any):
        if name not in BASELINES:
            raise KeyError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.")
        if name in ("serfiq", "grafiqs") and config.head not in ("face", "transface"):
            raise ValueError(f"{name} needs a face-recognition head; model {config.name} has {config.head!r}.")
        self.name, self.config = name, config
        self.variables = jax.device_put(variables)
        baseline, base = BASELINES[name], jax.random.PRNGKey(seed)

        def run(v, images, seeds):
            if baseline.needs_key:
                keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(seeds)
                return baseline.fn(v, config, images, keys, **options)
            return baseline.fn(v, config, images, **options)

        self._fn = jax.jit(run)

    def padded_size(self, n: int) -> int:
        """Returns n: the baseline runs on one device, at any batch size."""
        return n

    def dispatch(self, images: np.ndarray) -> tuple[int, Array]:
        """Starts scoring uint8 images; returns (B, device result) without waiting."""
        images = np.asarray(images)
        return len(images), self._fn(self.variables, images, image_seeds(images))

    def fetch(self, pending: tuple[int, Array]) -> dict[str, np.ndarray]:
        """Waits for a `dispatch` result; returns {'quality': (B,) float32}."""
        b, quality = pending
        return {"quality": np.asarray(quality, np.float32)[:b]}
