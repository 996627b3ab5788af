"""The Flax model: pinned sizes, scan == loop, streaming == states, no retracing."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnt_jax.config import PRESETS, ViTConfig, get_preset
from vitnt_jax.model import (
    Block,
    FaceViT,
    TraceTap,
    attention_segments,
    attention_weights,
    count_params,
    init_variables,
    layer_norm,
    truncate_blocks,
    variable_shapes,
)
from vitnt_jax.scorer import Scorer, compute_states, score_from_states, score_streaming
from vitnt_jax.stability import METRICS, ScoreSettings, attention_received

# Trainable parameters (BatchNorm running statistics excluded), as the PyTorch modules count them.
# insightface / TransFace numbers were counted on the published arcface_torch and TransFace
# modules (mask_token excluded); CLIP ViT-B/16 visual: 86.19M; timm ViT-B/16 without its
# 1000-class head (769,000 parameters): 86,567,656 - 769,000.
PINNED = {
    "cvlface_vit_small": 95_952_384,
    "cvlface_vit_base": 114_869_760,
    "insightface_vit_t": 19_137_536,
    "insightface_vit_s": 76_022_784,
    "insightface_vit_b": 113_832_960,
    "insightface_vit_l": 255_683_584,
    "transface_vit_t": 24_466_688,
    "transface_vit_s": 86_660_352,
    "transface_vit_b": 124_470_528,
    "transface_vit_l": 271_629_568,
    "clip_vit_b16": 86_192_640,
    "timm_vit_base_patch16_224": 85_798_656,
    "testing": 14_176,
}


def test_every_preset_is_pinned():
    assert set(PRESETS) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_count(name):
    assert count_params(variable_shapes(PRESETS[name])) == PINNED[name]


def test_presets_carry_published_block_selection():
    assert get_preset("cvlface_vit_base").default_blocks == "0-19"
    assert get_preset("cvlface_vit_small").default_blocks == "all"
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("vit_huge")


def test_config_json_round_trip():
    cfg = PRESETS["cvlface_vit_base"]
    assert ViTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        ViTConfig.from_dict({"name": "x", "wings": 2})


@pytest.fixture(scope="module")
def model_and_images(testing_config):
    variables = init_variables(testing_config, seed=1)
    images = jax.random.uniform(jax.random.PRNGKey(7), (3, 32, 32, 3), minval=-1, maxval=1)
    return testing_config, variables, images


def test_scan_equals_python_loop(model_and_images):
    cfg, variables, images = model_and_images
    scanned = FaceViT(cfg).apply(variables, images, tap=TraceTap(), embed=True)
    # The same block class, run one block at a time with that block's slice of the parameters
    # (compiled, as the scan is: op-by-op execution rounds differently on some CPUs).
    params = variables["params"]
    x = FaceViT(cfg).apply(truncate_blocks(variables, 0), images, num_blocks=0, method=_embed_only)
    block = jax.jit(lambda p, x: Block(cfg).apply({"params": p}, x, attention_weights))
    for i in range(cfg.depth):
        x, attention = block(jax.tree.map(lambda a, i=i: a[i], params["blocks"]), x)
        normed = layer_norm(x, params["norm"]["scale"], params["norm"]["bias"], cfg.layer_norm_eps)
        for key, value in (("tokens", x), ("normed", normed), ("attention", attention)):
            np.testing.assert_allclose(value, scanned["per_block"][key][i], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(x, scanned["tokens"], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(FaceViT(cfg).apply(variables, x, method=FaceViT.embedding), scanned["embedding"])
    # Under nn.scan (the layout the parameters come in) the block gives the same tokens.
    run = nn.scan(Block, variable_axes={"params": 0}, length=cfg.depth)(cfg)
    first = FaceViT(cfg).apply(truncate_blocks(variables, 0), images, num_blocks=0, method=_embed_only)
    looped, _ = run.apply({"params": params["blocks"]}, first)
    np.testing.assert_allclose(looped, scanned["tokens"], atol=1e-6, rtol=1e-6)


def _embed_only(module, images, num_blocks):
    # Patch + position embedding only: a zero-block scan returns the tokens entering block 0.
    return module(images, num_blocks=num_blocks)["tokens"]


CASES = [
    (blocks, aggregation, attention, "euclidean")
    for blocks in [(0, 1, 2), (0, 2), (1, 2), (0, 1)]
    for aggregation, attention in [("mean", "last"), ("attention", "last"), ("attention", "all")]
] + [((0, 1, 2), "attention", "last", metric) for metric in sorted(METRICS) if metric != "euclidean"]


@pytest.mark.parametrize("blocks, aggregation, attention, metric", CASES)
def test_streaming_equals_states_path(model_and_images, blocks, aggregation, attention, metric):
    cfg, variables, images = model_and_images
    s = ScoreSettings(blocks, alpha=3.0, metric=metric, aggregation=aggregation, attention=attention)
    via_states = score_from_states(cfg, variables, images, s)
    streamed = score_streaming(cfg, truncate_blocks(variables, s.num_blocks_to_run), images, s)
    for key in via_states:
        np.testing.assert_allclose(streamed[key], via_states[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "num_blocks, attention, wanted, segments",
    [
        (4, None, (3,), [(0, 4, False)]),
        (4, attention_received, None, [(0, 4, True)]),
        (4, attention_received, (3,), [(0, 3, False), (3, 4, True)]),
        (5, attention_received, (0, 2, 3), [(0, 1, True), (1, 2, False), (2, 4, True), (4, 5, False)]),
        (3, attention_received, (0, 1, 2), [(0, 3, True)]),
    ],
)
def test_attention_segments(num_blocks, attention, wanted, segments):
    assert attention_segments(num_blocks, attention, wanted) == segments


class _SpyTap:
    """Sums the attention received in `attention_blocks` and notes, per traced block, whether it got any."""

    attention = staticmethod(attention_received)

    def __init__(self, attention_blocks):
        self.attention_blocks = attention_blocks
        self.seen = []

    def init(self, tokens):
        return jnp.zeros(tokens.shape[:2])

    def step(self, state, index, tokens, normed, attention):
        self.seen.append(attention is not None)
        return (state if attention is None else state + attention), normed


def test_only_attention_blocks_compute_attention(model_and_images):
    cfg, variables, images = model_and_images
    spy = _SpyTap(attention_blocks=(1,))
    got = FaceViT(cfg).apply(variables, images, tap=spy)
    # Three segments, each traced once: blocks 0, 1 and 2; only block 1 computes its weights.
    assert spy.seen == [False, True, False]
    trace = FaceViT(cfg).apply(variables, images, tap=TraceTap())
    received = trace["per_block"]["attention"][1].mean(axis=1).sum(axis=1)
    np.testing.assert_allclose(got["tap_state"], received, atol=1e-6, rtol=1e-6)
    # Per-block outputs are stacked across segments in block order, as one scan stacks them.
    np.testing.assert_allclose(got["per_block"], trace["per_block"]["normed"], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(got["tokens"], trace["tokens"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention", ["last", "all"])
def test_attention_kernels_give_the_same_scores(model_and_images, attention):
    # The xla kernel goes through jax.nn.dot_product_attention's (B, N, heads, head_dim) layout,
    # the same call the cudnn kernel makes on NVIDIA GPUs.
    cfg, variables, images = model_and_images
    s = ScoreSettings((0, 2), alpha=3.0, attention=attention)
    v = truncate_blocks(variables, 3)
    plain = score_streaming(cfg, v, images, s)
    fused = score_streaming(cfg, v, images, s, attention_kernel="xla")
    for key in plain:
        np.testing.assert_allclose(fused[key], plain[key], atol=1e-6, rtol=0)
    tokens = lambda kernel: FaceViT(cfg, attention_kernel=kernel).apply(variables, images)["tokens"]  # noqa: E731
    np.testing.assert_allclose(tokens("xla"), tokens("matmul"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        tokens("flash")


@pytest.mark.parametrize("attention", ["last", "all"])
def test_one_block_segments_score_as_the_states_path(model_and_images, attention):
    cfg, variables, _ = model_and_images
    images = jax.random.uniform(jax.random.PRNGKey(9), (11, 32, 32, 3), minval=-1, maxval=1)
    # Blocks (0, 2): 'last' runs a scan over blocks 0-1, then block 2 in a scan of its own; 'all'
    # runs blocks 0, 1 and 2 each in a scan of its own.
    s = ScoreSettings((0, 2), alpha=3.0, attention=attention)
    via_states = score_from_states(cfg, variables, images, s)
    streamed = score_streaming(cfg, truncate_blocks(variables, 3), images, s)
    for key in via_states:
        np.testing.assert_allclose(streamed[key], via_states[key], atol=1e-6, rtol=0)


def test_cudnn_kernel_head_sizes_are_checked(testing_config):
    import dataclasses

    from vitnt_jax.model import check_attention_kernel

    check_attention_kernel("cudnn", testing_config)  # head size 8
    odd = dataclasses.replace(testing_config, embed_dim=20)  # 2 heads of 10
    with pytest.raises(ValueError, match="multiple of 8 up to 256; testing has 10"):
        check_attention_kernel("cudnn", odd)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        Scorer(testing_config, init_variables(testing_config), ScoreSettings((0, 1)), attention_kernel="flash")


@pytest.mark.parametrize("tap", [None, _SpyTap(attention_blocks=(1,))])
def test_blocks_need_truncated_parameters(model_and_images, tap):
    cfg, variables, images = model_and_images
    with pytest.raises(ValueError, match="parameters hold 3 blocks but 2 are to run"):
        FaceViT(cfg).apply(variables, images, tap=tap, num_blocks=2)


def test_states_path_shapes(model_and_images):
    cfg, variables, images = model_and_images
    got = compute_states(cfg, variables, images, ScoreSettings((0, 2)))
    assert got["states"].shape == (2, 3, cfg.num_patches, cfg.embed_dim)
    assert got["received"].shape == (2, 3, cfg.num_patches)
    np.testing.assert_allclose(jnp.linalg.norm(got["states"], axis=-1), 1.0, rtol=1e-5)


def test_blocks_after_the_last_selected_are_not_run(model_and_images):
    cfg, variables, images = model_and_images
    s = ScoreSettings((0, 1))
    scorer = Scorer(cfg, variables, s)
    assert jax.tree.leaves(scorer.variables["params"]["blocks"])[0].shape[0] == 2
    # Different weights in the unused block 2 change nothing.
    changed = jax.tree.map(lambda a: a, variables)
    changed["params"]["blocks"] = jax.tree.map(lambda a: a.at[2].add(5.0), variables["params"]["blocks"])
    u8 = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 32, 32, 3), 0, 256), np.uint8)
    np.testing.assert_array_equal(scorer(u8)["quality"], Scorer(cfg, changed, s)(u8)["quality"])


def test_embedding_runs_all_blocks_and_matches_plain_forward(model_and_images):
    cfg, variables, images = model_and_images
    s = ScoreSettings((0, 1))
    u8 = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 32, 32, 3), 0, 256), np.uint8)
    with_embedding = Scorer(cfg, variables, s, embed=True)(u8)
    plain = Scorer(cfg, variables, s)(u8)
    np.testing.assert_allclose(with_embedding["quality"], plain["quality"], atol=1e-6)
    assert with_embedding["embedding"].shape == (2, cfg.embedding_dim)
    with pytest.raises(ValueError, match="needs every block"):
        FaceViT(cfg).apply(truncate_blocks(variables, 2), images, num_blocks=2, embed=True)


def test_wrong_image_size_is_a_clear_error(model_and_images):
    cfg, variables, _ = model_and_images
    with pytest.raises(ValueError, match="model expects 32x32x3"):
        FaceViT(cfg).apply(variables, jnp.zeros((1, 112, 112, 3)))


def test_no_retracing_for_repeated_batch_shapes(model_and_images):
    cfg, variables, _ = model_and_images
    s = ScoreSettings((0, 1, 2))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def score(v, x):
        return score_streaming(cfg, v, x, s)["quality"]

    rng = np.random.default_rng(0)
    for _ in range(4):
        score(variables, jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32))
    chex.clear_trace_counter()


def test_scorer_compiles_once_per_batch_shape(model_and_images):
    cfg, variables, _ = model_and_images
    # Settings no other test uses: equal scorers share one compiled function, whatever ran before in this worker.
    scorer = Scorer(cfg, variables, ScoreSettings((0, 1, 2), alpha=7.25))
    rng = np.random.default_rng(0)
    for _ in range(3):
        scorer(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    assert scorer.cache_size() == 1
    with pytest.raises(NotImplementedError, match="pmap Scorer has none"):
        Scorer(cfg, variables, ScoreSettings((0, 1, 2)), parallel="pmap").cache_size()


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_equal_scorers_share_one_compilation(model_and_images, parallel, monkeypatch):
    import vitnt_jax.scorer as scorer_module

    cfg, variables, _ = model_and_images
    traces = []  # the scoring program calls score_streaming once per trace (jax compiles what it traces)
    real = scorer_module.score_streaming
    monkeypatch.setattr(scorer_module, "score_streaming", lambda *a, **k: traces.append(1) or real(*a, **k))
    s = ScoreSettings((0, 2), alpha=5.0 if parallel == "jit" else 5.5)  # settings no other test uses
    images = np.random.default_rng(3).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    first = Scorer(cfg, variables, s, parallel=parallel)(images)
    assert traces
    traces.clear()
    changed = jax.tree.map(lambda a: a * 1.01, variables)  # other weights, the same static settings
    again = Scorer(cfg, changed, s, parallel=parallel)(images)
    assert traces == []
    assert not np.allclose(again["quality"], first["quality"], rtol=1e-6, atol=0)  # the new weights were used
    Scorer(cfg, variables, ScoreSettings((0, 2), alpha=6.0), parallel=parallel)(images)
    assert traces  # other static settings: another program


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_lower_gives_the_program_dispatch_runs(model_and_images, parallel):
    cfg, variables, _ = model_and_images
    scorer = Scorer(cfg, variables, ScoreSettings((0, 1, 2)), parallel=parallel, micro_batch=None)
    compiled = scorer.lower(5).compile()  # padded to 8 images, one per device
    images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x = images if parallel == "jit" else images.reshape(8, 1, 32, 32, 3)
    got = np.asarray(compiled(scorer.variables, x)["quality"]).reshape(-1)
    np.testing.assert_allclose(got, scorer(images)["quality"], rtol=4 * np.finfo(np.float32).eps, atol=0)
    assert compiled.memory_analysis() is not None


def test_bfloat16_scores_stay_close(model_and_images):
    cfg, variables, images = model_and_images
    s = ScoreSettings((0, 1, 2), alpha=3.0)
    v = truncate_blocks(variables, 3)
    exact = score_streaming(cfg, v, images, s)["quality"]
    half = score_streaming(cfg, v, images, s, dtype=jnp.bfloat16)["quality"]
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, exact, atol=0.05)


def test_scan_stacks_params_on_axis_zero(testing_config):
    shapes = variable_shapes(testing_config)["params"]["blocks"]
    for leaf in jax.tree.leaves(shapes):
        assert leaf.shape[0] == testing_config.depth
