"""Training-free FIQA baselines on the same face ViT and harness as ViTNT-FIQA.

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
  Ours: the face head's dropout sits on the flattened final-normed tokens before feature_0 (the
  same place). The backbone runs ONCE and only the head runs m times: dropout exists only in the
  head, so the head's input is the same in every pass and this equals m full passes exactly
  (tests/test_baselines.py checks it pass by pass, with the same keys).

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
  outputs of a ResNet have no single ViT counterpart and are not offered.

ATTN-FIQA (Ozgur et al., FG 2026; github.com/gurayozgur/ATTN-FIQA):
  backbones/vit/vit.py line 64: pre-softmax scores (q @ k^T) * head_dim^-0.5 of each block;
  lines 298-309: of the LAST block, the mean over heads, queries and keys. Higher = better.
  Class-token models: our attention tap keeps the patch-token keys only (see vitnt_jax.model).

Embedding norm (MagFace, Meng et al., CVPR 2021; github.com/IrvingMeng/MagFace,
  eval/eval_quality/eval_quality.py lines 33-36): the L2 norm of the un-normalised embedding.
  Meaningful as quality only for magnitude-aware training (MagFace); here a cheap reference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vitnt_jax.config import ViTConfig
from vitnt_jax.model import FaceViT, truncate_blocks
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
    model = FaceViT(config, precision=precision)
    tokens = model.apply(variables, model_input(images, config))["tokens"]  # every block, no head

    def head_pass(tok: Array, k: Array) -> Array:
        out = model.apply(variables, None, head_input=tok[None], head_dropout=rate, rngs={"dropout": k})
        return out["embedding"][0]

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
    _, state = FaceViT(config, precision=precision).apply(variables, image[None], embed=True, mutable=["intermediates"])
    stats = variables["batch_stats"]
    terms = []
    for name in _HEAD_BATCH_NORMS:
        (h,) = state["intermediates"][f"{name}_input"]  # (1, features): a batch of one image
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


class LogitsMeanTap:
    """Carries the (B,) mean pre-softmax attention score of the latest block (ATTN-FIQA's statistic)."""

    attention = "logits"

    def init(self, tokens: Array) -> Array:
        return jnp.zeros(tokens.shape[:1], jnp.float32)

    def step(self, state, index, tokens, normed, attention):
        # Overwritten every block: after the scan it holds the last run block's value, and no
        # (B, H, N, N) score tensor outlives its block.
        return attention.mean(axis=(1, 2, 3)), None


@functools.partial(jax.jit, static_argnames=("config", "block", "precision"))
def attn_fiqa(variables: PyTree, config: ViTConfig, images: Array, *, block: int = -1, precision: Any = None) -> Array:
    """Returns the (B,) mean pre-softmax attention score (heads x queries x keys) of `block` (default: last)."""
    if not -config.depth <= block < config.depth:
        raise ValueError(f"block {block} does not exist in a {config.depth}-block model.")
    run = (block % config.depth) + 1  # blocks after the read one never run
    out = FaceViT(config, precision=precision).apply(
        truncate_blocks(variables, run), model_input(images, config), tap=LogitsMeanTap(), num_blocks=run
    )
    return out["tap_state"]


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
    except KeyError:
        raise KeyError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.") from None
    if baseline.needs_key:
        key = jax.random.PRNGKey(0) if key is None else key
        return baseline.fn(variables, config, images, key, **options)
    return baseline.fn(variables, config, images, **options)


# ----------------------------------------------------------------------------------------------
# Command line: quality files for experiments.evaluate


def main(argv: list[str] | None = None) -> int:
    """Writes one baseline's qualities as a score CSV (id, quality, error); returns the exit status.

    python -m experiments.baselines serfiq --bin data/lfw.bin --out scores/serfiq_lfw.csv
    """
    import argparse
    import csv
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from experiments import harness

    parser = argparse.ArgumentParser(
        prog="python -m experiments.baselines",
        description="Score images with a training-free FIQA baseline on a converted face ViT.",
    )
    parser.add_argument("method", choices=sorted(BASELINES), help="the baseline")
    harness.add_input_flags(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--passes", type=int, default=SERFIQ_PASSES, help="serfiq: stochastic passes (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="serfiq: dropout seed; image i uses fold_in(seed, i)")
    parser.add_argument(
        "--precision",
        choices=["highest", "default"],
        default="highest",
        help="matmul precision: 'highest' = exact fp32, as the ViTNT-FIQA scorer (default: highest)",
    )
    parser.add_argument("--out", type=Path, required=True, help="score CSV to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from vitnt_jax.data import batches

    try:
        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out} exists; pass --overwrite or choose another --out.")
        if args.batch_size < 1 or args.passes < 2:
            raise ValueError("--batch-size must be at least 1 and --passes at least 2.")
        if args.out.is_dir():
            raise ValueError(f"--out {args.out} is a folder; pass a .csv file path.")
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the folder of --out {args.out} ({error.strerror}).") from None
        source, config, variables = harness.open_inputs(args)
        if config.head not in ("face", "transface") and args.method in ("serfiq", "grafiqs"):
            raise ValueError(f"{args.method} needs a face-recognition head; model {config.name} has {config.head!r}.")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    base_key = jax.random.PRNGKey(args.seed)
    options = {"passes": args.passes} if args.method == "serfiq" else {}
    options["precision"] = None if args.precision == "default" else args.precision
    quality = np.full(len(source), np.nan)
    errors = [""] * len(source)
    start, done = time.perf_counter(), 0
    stream = batches(source.load, range(len(source)), args.batch_size, config.img_size, color=args.color or "rgb")
    for batch in stream:
        rows = np.arange(len(batch.valid))
        index = np.asarray(batch.indices + [0] * (len(rows) - len(batch.indices)))
        key = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index) if BASELINES[args.method].needs_key else None
        got = np.asarray(score(args.method, variables, config, batch.images, key, **options))
        n = len(batch.indices)
        for row, i in enumerate(batch.indices):
            quality[i], errors[i] = (got[row], "") if batch.valid[row] else (np.nan, batch.errors[row])
        done += n
        print(
            f"{args.method}: {done}/{len(source)} images, {done / (time.perf_counter() - start):.1f} img/s",
            file=sys.stderr,
            flush=True,
        )
    tmp = args.out.with_name(args.out.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "quality", "error"])
        for key_id, q, e in zip(source.ids, quality, errors, strict=True):
            writer.writerow([key_id, "" if e else repr(float(q)), e])
    tmp.replace(args.out)
    print(f"wrote {len(source)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
