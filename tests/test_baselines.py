"""Training-free FIQA baselines: every one runs, and each matches an independent computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics.pairwise import euclidean_distances

from converters import cvlface
from experiments import baselines as bl
from experiments import hooks
from vitnt_jax.config import PRESETS
from vitnt_jax.model import Block, FaceViT, TraceTap, truncate_blocks
from vitnt_jax.scorer import preprocess

import torch_reference as tr
from helpers import smooth_faces

CFG = PRESETS["testing"]


@pytest.fixture(scope="module")
def torch_model():
    # Random BN running statistics too, so that the GraFIQs loss is far from trivial.
    return tr.randomize(tr.FaceViT(CFG), seed=3)


@pytest.fixture(scope="module")
def variables(torch_model):
    config, variables, _ = cvlface.convert_state_dict(dict(torch_model.state_dict()), "testing")
    assert config == CFG
    return variables


@pytest.fixture(scope="module")
def images():
    return np.stack(smooth_faces(3, CFG.img_size, seed=4))


def _torch_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(preprocess(jnp.asarray(images), CFG))).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", sorted(bl.BASELINES))
def test_every_baseline_gives_finite_distinct_values_per_image(name, variables, images):
    got = np.asarray(bl.score(name, variables, CFG, jnp.asarray(images)))
    assert got.shape == (len(images),) and got.dtype == np.float32
    assert np.all(np.isfinite(got))
    assert np.ptp(got) > 1e-6  # the images really score differently


def test_uint8_and_preprocessed_input_agree(variables, images):
    # Every baseline reads its input through the same `model_input`; one baseline proves the shared path.
    raw = bl.embedding_norm(variables, CFG, jnp.asarray(images))
    pre = bl.embedding_norm(variables, CFG, preprocess(jnp.asarray(images), CFG))
    np.testing.assert_allclose(raw, pre, rtol=1e-6, atol=0)


def test_registry_entries_are_described(variables, images):
    assert bl.METHODS == tuple(sorted(bl.BASELINES))  # the CLI's choices, known without importing JAX
    for name, baseline in bl.BASELINES.items():
        assert callable(baseline.fn) and baseline.forward and baseline.source, name
    assert bl.BASELINES["serfiq"].needs_key and bl.BASELINES["grafiqs"].backward == 1
    with pytest.raises(KeyError, match="unknown baseline"):
        bl.score("nope", variables, CFG, jnp.asarray(images))


# ---------------------------------------------------------------------------------------- SER-FIQ


def test_serfiq_without_dropout_is_exactly_one(variables, images):
    got = bl.serfiq(variables, CFG, jnp.asarray(images), jax.random.PRNGKey(0), passes=6, rate=0.0)
    np.testing.assert_array_equal(got, np.ones(len(images), np.float32))


def test_serfiq_with_dropout_is_below_one_and_fixed_by_the_key(variables, images):
    x = jnp.asarray(images)
    a = bl.serfiq(variables, CFG, x, jax.random.PRNGKey(1), passes=6)
    b = bl.serfiq(variables, CFG, x, jax.random.PRNGKey(1), passes=6)
    c = bl.serfiq(variables, CFG, x, jax.random.PRNGKey(2), passes=6)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.asarray(a) < 1.0)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_serfiq_image_score_does_not_depend_on_the_rest_of_the_batch(variables, images):
    keys = jax.random.split(jax.random.PRNGKey(3), len(images))
    whole = np.asarray(bl.serfiq(variables, CFG, jnp.asarray(images), keys, passes=6))
    # Same shape (no recompilation): replace the neighbours of image 1, keep its key.
    others = images.copy()
    others[[0, 2]] = images[[2, 0]][:, ::-1]
    moved = np.asarray(bl.serfiq(variables, CFG, jnp.asarray(others), keys, passes=6))
    np.testing.assert_allclose(whole[1], moved[1], rtol=1e-6, atol=0)
    assert not np.allclose(whole[[0, 2]], moved[[0, 2]])
    with pytest.raises(ValueError, match="PRNG keys for"):
        bl.serfiq(variables, CFG, jnp.asarray(images), keys[:2], passes=6)


def test_serfiq_head_only_passes_equal_full_stochastic_forward_passes(variables, images):
    """One backbone pass + m head passes == m full passes, pass by pass, with the same keys."""
    passes, rate = 6, 0.5
    keys = jax.random.split(jax.random.PRNGKey(5), len(images))
    x = preprocess(jnp.asarray(images), CFG)
    got = bl.serfiq_embeddings(variables, CFG, x, keys, passes=passes, rate=rate)
    assert got.shape == (len(images), passes, CFG.embedding_dim)

    def full(image, k):
        with hooks.dropout_before("feature_0", rate, k):
            return FaceViT(CFG).apply(variables, image[None], embed=True)["embedding"][0]

    full_pass = jax.jit(full)
    for i in range(len(images)):
        for j, k in enumerate(jax.random.split(keys[i], passes)):
            np.testing.assert_allclose(got[i, j], full_pass(x[i], k), rtol=1e-5, atol=1e-5)
    # Dropout really acts: the stochastic embeddings differ from each other.
    assert float(jnp.abs(got[:, 0] - got[:, 1]).max()) > 1e-3


def test_serfiq_score_matches_the_published_formula(variables, images):
    emb = np.asarray(bl.serfiq_embeddings(variables, CFG, jnp.asarray(images), jax.random.PRNGKey(7), passes=6))
    expected = []
    for e in emb:  # face_image_quality.py get_score, in numpy and scikit-learn as published
        norm = e / np.linalg.norm(e, axis=1, keepdims=True)
        dist = euclidean_distances(norm, norm)[np.triu_indices(len(e), k=1)]
        expected.append(2 * (1 / (1 + np.exp(np.mean(dist)))))
    np.testing.assert_allclose(bl.serfiq_from_embeddings(jnp.asarray(emb)), expected, rtol=1e-5, atol=0)
    q = jnp.asarray(expected, jnp.float32)
    np.testing.assert_allclose(bl.serfiq_rescale(q), 1 / (1 + np.exp(-(130.0 * (np.asarray(q) - 0.88)))), rtol=1e-5)


# ---------------------------------------------------------------------------------------- GraFIQs


def _torch_grafiqs(model: tr.FaceViT, image: torch.Tensor) -> tuple[float, torch.Tensor]:
    """GraFIQs as the published bn.py / extract_grafiqs.py compute it, with hooks on the BatchNorm1d layers."""
    records = []

    def hook(module, inputs, output):
        x = inputs[0]
        records.append((x.mean(0), x.var(0, unbiased=False), module.running_mean, module.running_var))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    try:
        x = image[None].clone().requires_grad_(True)
        h = model.patch_embed(x) + model.pos_embed
        for block in model.blocks:
            h, _ = block(h)
        model.feature(model.norm(h).reshape(1, -1))
        loss = sum(F.mse_loss(m, rm) + F.mse_loss(v, rv) for m, v, rm, rv in records) / len(records)
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(records) == 2
    return float(loss.detach()), grad[0]


_loss = jax.jit(bl.grafiqs_loss, static_argnums=1)  # eager calls cost about 1 s each


def test_grafiqs_matches_torch_autograd_of_the_published_loss(torch_model, variables, images):
    x = _torch_input(images)
    pre = preprocess(jnp.asarray(images), CFG)
    grads = np.asarray(bl.grafiqs_gradients(variables, CFG, pre))
    scores = np.asarray(bl.grafiqs(variables, CFG, pre))
    for i in range(len(images)):
        loss, grad = _torch_grafiqs(torch_model, x[i])
        np.testing.assert_allclose(_loss(variables, CFG, pre[i]), loss, rtol=1e-5)
        expected = grad.permute(1, 2, 0).numpy()
        np.testing.assert_allclose(grads[i], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        np.testing.assert_allclose(scores[i], -np.abs(expected).sum(), rtol=1e-4)


def test_grafiqs_gradient_matches_finite_differences(variables, images):
    """Central differences of the loss along a random direction in image space."""
    batch = preprocess(jnp.asarray(images), CFG).astype(jnp.float32)
    grad = np.asarray(bl.grafiqs_gradients(variables, CFG, batch))[0]  # the batch shape other tests compile
    pre = batch[0]
    direction = np.asarray(jax.random.normal(jax.random.PRNGKey(0), pre.shape))
    eps = 1e-3
    up = float(_loss(variables, CFG, pre + eps * direction))
    down = float(_loss(variables, CFG, pre - eps * direction))
    np.testing.assert_allclose((up - down) / (2 * eps), np.sum(grad * direction), rtol=2e-3)


# -------------------------------------------------------------------------------------- ATTN-FIQA


@pytest.mark.parametrize("block", [-1, 0, 1])
def test_attn_fiqa_equals_torch_logits_of_the_read_block(torch_model, variables, images, block):
    x = _torch_input(images)
    with torch.no_grad():
        h = torch_model.patch_embed(x) + torch_model.pos_embed
        for t, blk in enumerate(torch_model.blocks):
            if t == block % CFG.depth:
                y = blk.norm1(h)
                qkv = blk.attn.qkv(y).view(len(x), -1, 3, CFG.num_heads, CFG.head_dim).permute(2, 0, 3, 1, 4)
                expected = (qkv[0] @ qkv[1].transpose(-1, -2) * CFG.head_dim**-0.5).mean(dim=(1, 2, 3))
            h, _ = blk(h)
    got = bl.attn_fiqa(variables, CFG, jnp.asarray(images), block=block)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not exist"):
        bl.attn_fiqa(variables, CFG, jnp.asarray(images), block=CFG.depth)


def test_block_attention_logits_softmax_to_the_attention_weights(variables, images):
    x = preprocess(jnp.asarray(images), CFG)
    trace = jax.jit(lambda v, x: FaceViT(CFG).apply(v, x, tap=TraceTap()))(variables, x)
    enter = FaceViT(CFG).apply(truncate_blocks(variables, 0), x, num_blocks=0)["tokens"]
    inputs = jnp.concatenate([enter[None], trace["per_block"]["tokens"][:-1]])  # what enters each block
    logits = jnp.stack(
        [
            Block(CFG).apply(
                {"params": jax.tree.map(lambda a, i=i: a[i], variables["params"]["blocks"])},
                inputs[i],
                method=Block.attention_logits,
            )
            for i in range(CFG.depth)
        ]
    )
    weights = trace["per_block"]["attention"]
    assert logits.shape == weights.shape == (CFG.depth, len(images), CFG.num_heads, CFG.num_patches, CFG.num_patches)
    np.testing.assert_allclose(jax.nn.softmax(logits, axis=-1), weights, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------- embedding norm


def test_embedding_norm_equals_the_norm_of_the_models_and_pytorchs_embedding(torch_model, variables, images):
    got = bl.embedding_norm(variables, CFG, jnp.asarray(images))
    ours = FaceViT(CFG).apply(variables, preprocess(jnp.asarray(images), CFG), embed=True)["embedding"]
    np.testing.assert_allclose(got, np.linalg.norm(np.asarray(ours), axis=-1), rtol=1e-6)
    _, _, embedding = torch_model.trace(_torch_input(images))
    np.testing.assert_allclose(got, embedding.norm(dim=-1).numpy(), rtol=1e-5)


def test_head_only_path_equals_the_embedding_of_the_full_model(variables, images):
    x = preprocess(jnp.asarray(images), CFG)
    full = FaceViT(CFG).apply(variables, x, embed=True)
    head = FaceViT(CFG).apply(variables, full["tokens"], method=FaceViT.embedding)
    np.testing.assert_array_equal(head, full["embedding"])
