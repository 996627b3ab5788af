"""The face Vision Transformer in Flax Linen: a plain pre-norm block, its parameters stacked on axis 0.

The model knows nothing about quality. After every block it hands the block's output tokens,
after the model's final LayerNorm, and (when asked) what the tap computes of the block's softmax
attention to a *tap*: a small object with pure functions that either emits per-block outputs
(stacked on axis 0) or folds them into a running state kept in the scan carry.
`vitnt_jax.stability` defines the taps that score.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitnt_jax.config import ViTConfig

Array = jax.Array
PyTree = Any


class Tap(Protocol):
    """What the blocks call after each block runs; see `vitnt_jax.stability` for the real ones."""

    # What the tap reads of each block's attention: None, or a function of the block's (B, heads,
    # T_query, T_key) float32 softmax weights that keeps the key axis last. The block applies it right
    # after the softmax, so weights reduced there (e.g. `vitnt_jax.stability.attention_received`) need
    # not outlive the block, and hands the tap the result's patch-token key columns only (class-token
    # models report the attention the PATCHES receive; the weights' rows then sum to less than 1).
    attention: Callable[[Array], Array] | None
    # Optional: the block indices whose attention the tap reads (absent or None: every block).
    # The others get attention=None and run with fused attention, whose weights never materialise.
    attention_blocks: tuple[int, ...] | None

    def init(self, tokens: Array) -> PyTree:
        """Returns the initial carry state, given the (B, N, D) patch tokens that enter block 0."""

    def step(self, state: PyTree, index: Array, tokens: Array, normed: Array, attention: Array | None):
        """Returns (new state, per-block output) for block `index`.

        tokens: (B, N, D) the block's output (the residual stream after its MLP), patch tokens only.
        normed: (B, N, D) float32, the same tokens after the model's final LayerNorm.
        attention: `attention(weights)` of this block, or None in the blocks outside `attention_blocks`.
        """


def attention_weights(weights: Array) -> Array:
    """Returns the softmax weights unchanged: the `Tap.attention` of a tap that reads them whole."""
    return weights


def attention_segments(
    num_blocks: int, attention: Callable | None, attention_blocks: tuple[int, ...] | None
) -> list[tuple[int, int, bool]]:
    """Returns the maximal runs (start, stop, with_attention) of blocks 0..num_blocks-1.

    One run when every block needs the same (no attention, or attention everywhere).
    """
    if attention is None:
        return [(0, num_blocks, False)]
    if attention_blocks is None:
        return [(0, num_blocks, True)]
    wanted = set(attention_blocks)
    segments: list[tuple[int, int, bool]] = []
    for index in range(num_blocks):
        need = index in wanted
        if segments and segments[-1][2] == need:
            segments[-1] = (segments[-1][0], index + 1, need)
        else:
            segments.append((index, index + 1, need))
    return segments


class NoTap:
    """A tap that keeps and emits nothing: the plain forward pass."""

    attention = None

    def init(self, tokens):
        return ()

    def step(self, state, index, tokens, normed, attention):
        return state, None


class TraceTap:
    """Emits every block's raw tokens, final-normed tokens and full attention (for inspection)."""

    attention = staticmethod(attention_weights)

    def init(self, tokens):
        return ()

    def step(self, state, index, tokens, normed, attention):
        return state, {"tokens": tokens, "normed": normed, "attention": attention}


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """Returns LayerNorm(x) over the last axis with PyTorch's biased two-pass variance, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, -1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps) * scale + bias


_ACTIVATIONS = {
    "relu6": jax.nn.relu6,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


ATTENTION_KERNELS = ("matmul", "xla", "cudnn")


def check_attention_kernel(kernel: str, config: ViTConfig) -> None:
    """Raises ValueError, in one sentence, if `kernel` is unknown or cannot run `config`."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}.")
    # cuDNN's fused attention takes head sizes that are multiples of 8, up to 256.
    if kernel == "cudnn" and (config.head_dim % 8 or config.head_dim > 256):
        raise ValueError(
            f"the cudnn attention kernel needs a head size that is a multiple of 8 up to 256; {config.name} has "
            f"{config.head_dim}: use --attention-kernel matmul."
        )


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q; k; v], heads major).

    `kernel` computes the attention whose weights nobody reads: "matmul" (our batched matmuls,
    which XLA fuses into one dot-softmax-dot on CPU), "xla" or "cudnn" (jax.nn.dot_product_attention
    with that implementation; cudnn is flash attention on NVIDIA GPUs, bfloat16/float16 only).
    Whenever the weights are read, the matmul path runs. The xla and cudnn kernels use JAX's
    default matmul precision, not `precision`.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None
    kernel: str = "matmul"

    def setup(self):
        cfg = self.config
        dense = lambda features, bias: nn.Dense(features, use_bias=bias, dtype=self.dtype, precision=self.precision)  # noqa: E731
        self.qkv = dense(3 * cfg.embed_dim, cfg.qkv_bias)
        self.proj = dense(cfg.embed_dim, True)

    def _heads(self, x: Array) -> tuple[Array, Array, Array]:
        # (B, heads, T, head_dim) operands: batched matmuls in the layout XLA's GEMM wants.
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.config.num_heads, self.config.head_dim)
        return tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))

    def _scores(self, q: Array, k: Array) -> Array:
        return jnp.matmul(q, k.transpose(0, 1, 3, 2), precision=self.precision) * self.config.head_dim**-0.5

    def logits(self, x: Array) -> Array:
        """Returns the (B, heads, T, T) pre-softmax scores q.k * head_dim^-0.5 of (B, T, D) input tokens."""
        q, k, _ = self._heads(x)
        return self._scores(q, k)

    def __call__(self, x: Array, reduce: Callable[[Array], Array] | None = None) -> tuple[Array, Array | None]:
        """Returns (attention output (B, T, D), None or `reduce(float32 softmax weights)` at the patch keys).

        reduce: keeps the key axis last; its result's class-token key columns are dropped.
        """
        cfg = self.config
        b, n, d = x.shape
        if reduce is None and self.kernel != "matmul":
            qkv = self.qkv(x).reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
            # (B, T, heads, head_dim) is the layout dot_product_attention takes; scale head_dim^-0.5.
            out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.kernel)
            return self.proj(out.reshape(b, n, d)), None
        q, k, v = self._heads(x)
        logits = self._scores(q, k)
        # Softmax in float32 even under bfloat16: the attention weights feed the score.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        # When the weights feed only the next matmul, XLA fuses dot-softmax-dot and the weights
        # never materialise; `reduce` right after the softmax keeps only its (smaller) result.
        out = jnp.matmul(weights.astype(self.dtype), v, precision=self.precision).transpose(0, 2, 1, 3)
        out = self.proj(out.reshape(b, n, d))
        return out, (None if reduce is None else reduce(weights)[..., cfg.num_prefix_tokens :])


class Mlp(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = nn.Dense(cfg.mlp_dim, dtype=self.dtype, precision=self.precision, name="fc1")(x)
        x = _ACTIVATIONS[cfg.activation](x)
        return nn.Dense(cfg.embed_dim, dtype=self.dtype, precision=self.precision, name="fc2")(x)


class Block(nn.Module):
    """A pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)).

    Returns (x, attention) with attention = `reduce` of its softmax weights (see `Attention`), so
    the same block runs in a Python loop, under `jax.lax.scan` or under `nn.scan`.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_kernel: str = "matmul"  # see Attention.kernel

    def setup(self):
        cfg = self.config
        norm = lambda: nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype)  # noqa: E731
        self.norm1 = norm()
        self.attn = Attention(cfg, self.dtype, self.precision, self.attention_kernel)
        self.norm2 = norm()
        self.mlp = Mlp(cfg, self.dtype, self.precision)

    def __call__(self, x: Array, reduce: Callable[[Array], Array] | None = None) -> tuple[Array, Array | None]:
        y, attention = self.attn(self.norm1(x), reduce)
        x = x + y
        return x + self.mlp(self.norm2(x)), attention

    def attention_logits(self, x: Array) -> Array:
        """Returns the (B, heads, T, T) pre-softmax attention scores of this block for its (B, T, D) input."""
        return self.attn.logits(self.norm1(x))


class FinalNorm(nn.Module):
    """Holds the final LayerNorm's parameters; every block's output is normalised with them."""

    dim: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        return (
            self.param("scale", nn.initializers.ones, (self.dim,)),
            self.param("bias", nn.initializers.zeros, (self.dim,)),
        )


class FaceViT(nn.Module):
    """Face ViT: patch embedding + position embedding, the blocks, optional embedding head.

    Parameters: `blocks` holds every block's parameters stacked on axis 0 (Flax's nn.scan layout).
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_kernel: str = "matmul"  # for the blocks whose attention weights no tap reads; see Attention

    def setup(self):
        cfg = self.config
        p, d = cfg.patch_size, cfg.embed_dim
        self.patch_embed = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            precision=self.precision,
        )
        # The order of these self.param calls fixes their random init (Flax counts them per scope).
        if cfg.class_token:
            self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, cfg.num_tokens, d))
        if cfg.ln_pre:
            self.ln_pre = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype)
        self.norm = FinalNorm(d)
        # nn.scan only declares the stacked parameters (one split rng per block); every forward
        # pass runs them through `_run_blocks`.
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth)
        self.blocks = scanned(cfg, self.dtype, self.precision, self.attention_kernel)
        dense = lambda features: nn.Dense(features, use_bias=False, precision=self.precision)  # noqa: E731
        batch_norm = lambda: nn.BatchNorm(use_running_average=True, epsilon=cfg.head_batch_norm_eps)  # noqa: E731
        if cfg.head == "clip":
            # CLIP multiplies by `proj` (width, out) with no transpose and no bias.
            self.proj = self.param("proj", nn.initializers.normal(d**-0.5), (d, cfg.embedding_dim))
        if cfg.head == "transface":
            self.senet_0, self.senet_2 = dense(cfg.num_patches), dense(cfg.num_patches)
        if cfg.head in ("face", "transface"):
            self.feature_0, self.feature_1 = dense(d), batch_norm()
            self.feature_2, self.feature_3 = dense(cfg.embedding_dim), batch_norm()

    def __call__(
        self, images: Array, *, tap: Any = None, num_blocks: int | None = None, embed: bool = False
    ) -> dict[str, Any]:
        """Returns {'tap_state', 'per_block', 'tokens'} and, with embed=True, 'embedding'.

        images: (B, H, W, C) float, already scaled (face ViTs: [-1, 1]) in the model's colour order.
        num_blocks: run only blocks 0..num_blocks-1; the `blocks` params must then hold exactly
          that many blocks on axis 0 (see `truncate_blocks`). Default: all blocks.
        embed: also compute the face embedding (needs every block).
        'tokens' is the (B, T, D) residual stream after the last run block (class token included);
        'per_block' stacks the tap's per-block outputs on axis 0.
        """
        cfg = self.config
        check_attention_kernel(self.attention_kernel, cfg)
        tap = NoTap() if tap is None else tap
        num_blocks = cfg.depth if num_blocks is None else num_blocks
        if embed and num_blocks != cfg.depth:
            raise ValueError("the face embedding needs every block; do not truncate the model.")
        if cfg.head == "none" and embed:
            raise ValueError(f"config {cfg.name!r} has no embedding head.")
        b, h, w, c = images.shape
        if (h, w, c) != (cfg.img_size, cfg.img_size, cfg.in_channels):
            raise ValueError(
                f"images are {h}x{w}x{c} but the model expects {cfg.img_size}x{cfg.img_size}x{cfg.in_channels}."
            )
        # NHWC conv output, row-major over the grid: the patch order of torch's flatten(2).transpose(1, 2).
        x = self.patch_embed(images.astype(self.dtype)).reshape(b, cfg.num_patches, cfg.embed_dim)
        if cfg.class_token:
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, cfg.embed_dim)), x], 1)
        x = x + self.pos_embed.astype(self.dtype)
        if cfg.ln_pre:
            x = self.ln_pre(x)
        if self.is_initializing():
            self.blocks(x)  # creates the stacked block parameters
        (x, state), per_block = self._run_blocks((x, tap.init(x[:, cfg.num_prefix_tokens :])), tap, num_blocks)
        result = {"tap_state": state, "per_block": per_block, "tokens": x}
        if embed or (self.is_initializing() and cfg.head != "none"):
            result["embedding"] = self.embedding(x)
        return result

    def _run_blocks(self, carry, tap, num_blocks: int):
        """Runs blocks 0..num_blocks-1 from the stacked parameters; returns (carry, per-block outputs).

        The one execution path of every block: a `jax.lax.scan` per run of blocks that need the same
        attention (`attention_segments`). A scan body is one program for all its blocks, so blocks
        whose attention the tap does not read get scans of their own, where XLA fuses their
        attention (dot, softmax, dot) and the (B, heads, N, N) weights never materialise. Each step
        indexes the full parameter stack (slicing it per segment would copy the parameters).
        """
        cfg = self.config
        stacked = self.variables["params"]["blocks"]
        have = jax.tree.leaves(stacked)[0].shape[0]
        if have != num_blocks:
            raise ValueError(f"the parameters hold {have} blocks but {num_blocks} are to run; see truncate_blocks.")
        scale, bias = self.norm()
        block = Block(cfg, self.dtype, self.precision, self.attention_kernel, parent=None)
        k = cfg.num_prefix_tokens

        def step(carry, index, reduce):
            x, state = carry
            params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked)
            x, attention = block.apply({"params": params}, x, reduce)
            # Scores use patch tokens only: the class token is dropped here (and its key by Attention).
            normed = layer_norm(x[:, k:], scale, bias, cfg.layer_norm_eps)
            state, out = tap.step(state, index, x[:, k:], normed, attention)
            return (x, state), out

        outs = []
        for start, stop, need in attention_segments(num_blocks, tap.attention, getattr(tap, "attention_blocks", None)):
            if stop == start:
                return carry, None  # no block runs: the tokens that enter block 0
            reduce = tap.attention if need else None
            carry, out = jax.lax.scan(functools.partial(step, reduce=reduce), carry, jnp.arange(start, stop))
            outs.append(out)
        return carry, outs[0] if len(outs) == 1 else jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)

    def embedding(self, tokens: Array) -> Array:
        """Returns the (B, E) face embedding of (B, T, D) final residual-stream tokens (the 'tokens' output)."""
        cfg = self.config
        # CVLface and insightface apply the final norm before flattening; the copy of vit.py in
        # the authors' FIQA repository omits it there, but its quality score never uses the head.
        normed = layer_norm(tokens, *self.norm(), cfg.layer_norm_eps)
        if cfg.head == "cls":
            return normed[:, 0]
        if cfg.head == "clip":
            return jnp.dot(normed[:, 0], self.proj, precision=self.precision)
        if cfg.head not in ("face", "transface"):
            raise ValueError(f"config {cfg.name!r} has no embedding head.")
        flat = normed.reshape(tokens.shape[0], -1)
        if cfg.head == "transface":
            # TransFace's token gate: Linear(N*D -> N), ReLU, Linear(N -> N), Sigmoid, one weight per
            # token, multiplied onto the normed tokens before the face head (block tokens unchanged).
            gate = jax.nn.sigmoid(self.senet_2(jax.nn.relu(self.senet_0(flat))))
            flat = (normed * gate[:, :, None]).reshape(tokens.shape[0], -1)
        return self.feature_3(self.feature_2(self.feature_1(self.feature_0(flat))))


def truncate_blocks(variables: PyTree, num_blocks: int) -> PyTree:
    """Returns `variables` with only the first `num_blocks` scanned blocks (the rest never run)."""
    params = dict(variables["params"])
    params["blocks"] = jax.tree.map(lambda a: a[:num_blocks], params["blocks"])
    return {**variables, "params": params}


def init_variables(config: ViTConfig, seed: int = 0) -> PyTree:
    """Returns randomly initialised variables ({'params', 'batch_stats'}) for `config`."""
    images = jnp.zeros((1, config.img_size, config.img_size, config.in_channels), jnp.float32)
    return FaceViT(config).init(jax.random.PRNGKey(seed), images)


def variable_shapes(config: ViTConfig) -> PyTree:
    """Returns the ShapeDtypeStruct tree of the variables of `config`, without allocating them."""
    images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: FaceViT(config).init(jax.random.PRNGKey(0), x), images)


def count_params(variables: PyTree) -> int:
    """Returns the number of trainable parameters (the 'params' collection only)."""
    return sum(int(a.size) for a in jax.tree.leaves(variables["params"]))
