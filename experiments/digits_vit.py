"""The digits demonstration's model: a small FaceViT with a 10-class head, and its training.

Kept apart from `experiments.demo_digits` (the command) so that its `--help` does not start JAX.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitnt_jax.config import ViTConfig
from vitnt_jax.model import FaceViT
from vitnt_jax.scorer import preprocess

# Face-ViT layout (ReLU6, no qkv bias, no class token) shrunk for 8x8 digits: 2x2-pixel patches
# give 16 tokens; MLP 2x (not the faces' 4-5x) keeps CPU training short.
CONFIG = ViTConfig(
    name="digits_vit",
    img_size=8,
    patch_size=2,
    embed_dim=32,
    depth=8,
    num_heads=4,
    mlp_ratio=2.0,
    activation="relu6",
    head="none",
    embedding_dim=None,
)


class FinalTokensTap:
    """Keeps the last block's final-normed tokens in the scan carry: the classifier's features."""

    attention = None

    def init(self, tokens):
        return jnp.zeros(tokens.shape, jnp.float32)

    def step(self, state, index, tokens, normed, attention):
        return normed, None


class DigitClassifier(nn.Module):
    """Our FaceViT ('vit') with a training head: mean of the final-normed patch tokens -> Dense(10)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Returns (B, 10) logits for (B, 8, 8, 3) preprocessed images."""
        tokens = FaceViT(self.config, name="vit")(images, tap=FinalTokensTap())["tap_state"]
        return nn.Dense(10, name="classifier")(tokens.mean(axis=1))


def train(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
) -> dict:
    """Returns the trained classifier variables {'params': {'vit': ..., 'classifier': ...}}.

    images_uint8: (B, 8, 8, 3) uint8 RGB. AdamW with a warm-up cosine schedule; each step draws
    `batch_size` images without replacement from a key split off `seed`.
    """
    import optax

    model = DigitClassifier(CONFIG)
    x = preprocess(jnp.asarray(images_uint8), CONFIG)
    y = jnp.asarray(labels)
    params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2))
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    def loss_fn(params, xb, yb):
        logits = model.apply({"params": params}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, opt_state, key):
        idx = jax.random.choice(key, x.shape[0], (batch_size,), replace=False)
        grads = jax.grad(loss_fn)(params, x[idx], y[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), steps)
    for key in keys:
        params, opt_state = step(params, opt_state, key)
    return jax.block_until_ready({"params": params})


def classifier(variables: dict):
    """Returns a function: (B, 8, 8, 3) uint8 RGB -> (B, 10) float32 numpy softmax probabilities."""
    model = DigitClassifier(CONFIG)
    logits = jax.jit(lambda v, u8: model.apply(v, preprocess(u8, CONFIG)))
    return lambda u8: np.asarray(jax.nn.softmax(logits(variables, u8)))
