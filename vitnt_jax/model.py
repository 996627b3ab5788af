"""The face Vision Transformer in Flax Linen: one block class run under `nn.scan`.

The model knows nothing about quality. Each scanned block hands its output tokens, after the
model's final LayerNorm, and (when asked) its softmax attention to a *tap*: a small object with
pure functions that either emits per-block outputs (stacked on axis 0 by the scan) or folds them
into a running state kept in the scan carry. `vitnt_jax.stability` defines the taps that score.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitnt_jax.config import ViTConfig

Array = jax.Array
PyTree = Any


class Tap(Protocol):
    """What a scanned block calls after it runs; see `vitnt_jax.stability` for the real ones."""

    # What the tap needs of each block's attention: None, "received" (the (B, N) attention each
    # patch receives: softmax weights averaged over heads and summed over queries, computed right
    # after the softmax so the weights need not outlive it), "weights" (the full softmax), or
    # "logits" (the pre-softmax scores q.k * head_dim^-0.5; ATTN-FIQA reads these).
    attention: str | None
    # Optional: the block indices whose attention the tap reads (absent or None: every block).
    # The others get attention=None and run with fused attention, whose weights never materialise.
    attention_blocks: tuple[int, ...] | None

    def init(self, tokens: Array) -> PyTree:
        """Returns the initial carry state, given the (B, N, D) tokens that enter block 0."""

    def step(self, state: PyTree, index: Array, tokens: Array, normed: Array, attention: Array | None):
        """Returns (new state, per-block output) for block `index`.

        tokens: (B, N, D) the block's output (the residual stream after its MLP), patch tokens only.
        normed: (B, N, D) float32, the same tokens after the model's final LayerNorm.
        attention: per `attention`: None; "received": (B, N) float32; "weights" / "logits": (B,
          heads, T_query, N_key) float32 softmax weights / pre-softmax scores. All use every query
          token (class token included) but only the N patch-token keys: class-token models report
          the attention the PATCHES receive (the weights' row sums are then below 1). None in the
          blocks outside `attention_blocks`.
        """


def attention_segments(
    num_blocks: int, attention: str | None, attention_blocks: tuple[int, ...] | None
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

    attention = "weights"

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
    Whenever the weights or logits are asked for, the matmul path runs. The xla and cudnn kernels
    use JAX's default matmul precision, not `precision`.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None
    kernel: str = "matmul"
    received_chunk: int | None = None  # "received": sum the weights this many images at a time

    @nn.compact
    def __call__(self, x: Array, output: str | None) -> tuple[Array, Array | None]:
        """Returns (attention output, None | "received" (B, T_key) | "weights" | "logits" (B, H, T, T))."""
        cfg = self.config
        b, n, d = x.shape
        dense = lambda features, bias, name: nn.Dense(  # noqa: E731
            features, use_bias=bias, dtype=self.dtype, precision=self.precision, name=name
        )
        qkv = dense(3 * d, cfg.qkv_bias, "qkv")(x).reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
        if output is None and self.kernel != "matmul":
            # (B, N, heads, head_dim) is the layout dot_product_attention takes; scale head_dim^-0.5.
            out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.kernel)
            return dense(d, True, "proj")(out.reshape(b, n, d)), None
        # (B, heads, N, head_dim) operands: batched matmuls in the layout XLA's GEMM wants.
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))

        def softmax_weights(q, k):
            logits = jnp.matmul(q, k.transpose(0, 1, 3, 2), precision=self.precision) * cfg.head_dim**-0.5
            # Softmax in float32 even under bfloat16: the attention weights feed the score.
            return logits, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        logits, weights = softmax_weights(q, k)
        # When the weights feed only the next matmul, XLA fuses dot-softmax-dot and the weights
        # never materialise; any other use of them makes them a (B, heads, N, N) buffer.
        out = jnp.matmul(weights.astype(self.dtype), v, precision=self.precision).transpose(0, 2, 1, 3)
        out = dense(d, True, "proj")(out.reshape(b, n, d))
        if output == "received" and self.received_chunk and b > self.received_chunk:
            # The same weights again, a few images at a time, so that `out` keeps its fused
            # attention and the weights' memory stays flat in the batch size.
            per_image = lambda qk: softmax_weights(qk[0][None], qk[1][None])[1][0].mean(axis=0).sum(axis=0)  # noqa: E731
            return out, jax.lax.map(per_image, (q, k), batch_size=self.received_chunk)
        if output == "received":
            return out, weights.mean(axis=1).sum(axis=1)
        if output == "logits":
            return out, logits.astype(jnp.float32)
        return out, (weights if output == "weights" else None)


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
    """One pre-norm transformer block; the same class runs in a Python loop or under nn.scan.

    Call signature follows the scan contract: `(carry, index, final_scale, final_bias) ->
    (carry, out)` with carry = (tokens, tap state) and out = whatever the tap emits.
    """

    config: ViTConfig
    tap: Any = NoTap()
    dtype: Any = jnp.float32
    precision: Any = None
    with_attention: bool = True  # False: the tap gets attention=None and the attention is fused
    attention_kernel: str = "matmul"  # see Attention.kernel
    received_chunk: int | None = None  # see Attention.received_chunk

    @nn.compact
    def __call__(self, carry, index, final_scale, final_bias):
        cfg = self.config
        x, state = carry
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name
        )
        wanted = self.tap.attention if self.with_attention else None
        attend = Attention(cfg, self.dtype, self.precision, self.attention_kernel, self.received_chunk, name="attn")
        y, attention = attend(norm("norm1")(x), wanted)
        x = x + y
        x = x + Mlp(cfg, self.dtype, self.precision, name="mlp")(norm("norm2")(x))
        # Scores use patch tokens only: drop the class token and its attention key column.
        k = cfg.num_prefix_tokens
        patches = x[:, k:]
        normed = layer_norm(patches, final_scale, final_bias, cfg.layer_norm_eps)
        if attention is not None:
            attention = attention[..., k:]
        state, out = self.tap.step(state, index, patches, normed, attention)
        return (x, state), out


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
    """Face ViT: patch embedding + position embedding, scanned blocks, optional embedding head."""

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_kernel: str = "matmul"  # for the blocks whose attention weights no tap reads; see Attention
    # A block that runs outside a scan sums the attention it reports this many images at a time
    # (see Attention.received_chunk); None: the whole batch. Chunks split the batch axis, so leave
    # it None when that axis is sharded over devices (each device would gather the whole batch).
    received_chunk: int | None = None

    @nn.compact
    def __call__(
        self,
        images: Array | None,
        *,
        tap: Any = None,
        num_blocks: int | None = None,
        embed: bool = False,
        head_input: Array | None = None,
        head_dropout: float = 0.0,
    ) -> dict[str, Any]:
        """Returns {'tap_state', 'per_block', 'tokens'} and, with embed=True, 'embedding'.

        images: (B, H, W, C) float, already scaled (face ViTs: [-1, 1]) in the model's colour order.
        num_blocks: run only blocks 0..num_blocks-1; the `blocks` params must then hold exactly
          that many blocks on axis 0 (see `truncate_blocks`). Default: all blocks.
        embed: also compute the face embedding (needs every block).
        head_input: (B, T, D) final residual-stream tokens (the 'tokens' output). When given, only
          the embedding head runs, on them, and only {'embedding'} is returned (`images` is
          ignored): repeated stochastic head passes (SER-FIQ) reuse one backbone pass.
        head_dropout: dropout rate on the input of the head's first Linear (feature_0), with the
          'dropout' rng; 0 (default) is the deterministic model. Face heads only.
        The head also sows its two BatchNorm inputs into the 'intermediates' collection
        ('feature_1_input', 'feature_3_input') when that collection is mutable (GraFIQs).
        """
        cfg = self.config
        if head_input is not None:
            final_scale, final_bias = FinalNorm(cfg.embed_dim, name="norm")()
            return {"embedding": self._embedding_head(head_input, final_scale, final_bias, head_dropout)}
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
        p = cfg.patch_size
        x = nn.Conv(
            cfg.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            precision=self.precision,
            name="patch_embed",
        )(images.astype(self.dtype))
        x = x.reshape(b, cfg.num_patches, cfg.embed_dim)  # row-major grid = torch flatten(2)
        if cfg.class_token:
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.embed_dim))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.embed_dim)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, cfg.num_tokens, cfg.embed_dim))
        x = x + pos.astype(self.dtype)
        if cfg.ln_pre:
            x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name="ln_pre")(x)
        final_scale, final_bias = FinalNorm(cfg.embed_dim, name="norm")()

        carry = (x, tap.init(x[:, cfg.num_prefix_tokens :]))
        segments = attention_segments(num_blocks, tap.attention, getattr(tap, "attention_blocks", None))
        if len(segments) == 1 or self.is_initializing():
            scanned = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=num_blocks,
            )
            with_attention = segments[0][2] or len(segments) > 1
            block = scanned(cfg, tap, self.dtype, self.precision, with_attention, self.attention_kernel, name="blocks")
            carry, per_block = block(carry, jnp.arange(num_blocks), final_scale, final_bias)
        else:
            carry, per_block = self._segmented_blocks(carry, segments, tap, final_scale, final_bias)
        x, state = carry
        result = {"tap_state": state, "per_block": per_block, "tokens": x}
        if embed or (self.is_initializing() and cfg.head != "none"):
            result["embedding"] = self._embedding_head(x, final_scale, final_bias, head_dropout)
        return result

    def _segmented_blocks(self, carry, segments, tap, final_scale, final_bias):
        """Runs the scanned blocks' parameters segment by segment; returns (carry, per-block out).

        A scan body is one program for all its blocks, so the blocks whose attention the tap does
        not read run in scans of their own, where XLA fuses their attention (dot, softmax, dot) and
        the (B, heads, N, N) weights never materialise; a one-block segment runs without a scan.
        Each scan step indexes the full parameter stack (slicing it per segment outside the loop
        would copy the parameters).
        """
        stacked = self.variables["params"]["blocks"]
        have = jax.tree.leaves(stacked)[0].shape[0]
        if have != segments[-1][1]:
            raise ValueError(
                f"the parameters hold {have} blocks but {segments[-1][1]} are to run; see truncate_blocks."
            )
        outs = []
        for start, stop, need in segments:
            if stop - start == 1:
                # A block on its own is straight-line code, where a loop over chunks of images costs
                # little (nested in a scan body it made XLA:CPU 34% slower), so it may sum its
                # attention in chunks of `received_chunk` images and fuse the attention itself.
                block = Block(
                    self.config, tap, self.dtype, self.precision, need, self.attention_kernel, self.received_chunk
                )
                params = jax.tree.map(lambda a, start=start: a[start], stacked)
                carry, out = block.apply({"params": params}, carry, jnp.asarray(start), final_scale, final_bias)
                outs.append(jax.tree.map(lambda a: a[None], out))
                continue
            block = Block(self.config, tap, self.dtype, self.precision, need, self.attention_kernel)

            def step(carry, index, block=block):
                params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked)
                return block.apply({"params": params}, carry, index, final_scale, final_bias)

            carry, out = jax.lax.scan(step, carry, jnp.arange(start, stop))
            outs.append(out)
        return carry, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)

    def _embedding_head(self, x: Array, final_scale: Array, final_bias: Array, dropout: float = 0.0) -> Array:
        cfg = self.config
        if dropout and cfg.head not in ("face", "transface"):
            raise ValueError(f"head dropout needs a face embedding head; config {cfg.name!r} has head {cfg.head!r}.")
        # CVLface and insightface apply the final norm before flattening; the copy of vit.py in
        # the authors' FIQA repository omits it there, but its quality score never uses the head.
        normed = layer_norm(x, final_scale, final_bias, cfg.layer_norm_eps)
        dense = lambda features, name, bias=False: nn.Dense(  # noqa: E731
            features, use_bias=bias, precision=self.precision, name=name
        )
        if cfg.head == "cls":
            return normed[:, 0]
        if cfg.head == "clip":
            # CLIP multiplies by `proj` (width, out) with no transpose and no bias.
            proj = self.param("proj", nn.initializers.normal(cfg.embed_dim**-0.5), (cfg.embed_dim, cfg.embedding_dim))
            return jnp.dot(normed[:, 0], proj, precision=self.precision)
        flat = normed.reshape(x.shape[0], -1)
        if cfg.head == "transface":
            # TransFace's token gate: Linear(N*D -> N), ReLU, Linear(N -> N), Sigmoid, one weight per
            # token, multiplied onto the normed tokens before the face head (block tokens unchanged).
            gate = jax.nn.relu(dense(cfg.num_patches, "senet_0")(flat))
            gate = jax.nn.sigmoid(dense(cfg.num_patches, "senet_2")(gate))
            flat = (normed * gate[:, :, None]).reshape(x.shape[0], -1)
        batch_norm = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=True, epsilon=cfg.head_batch_norm_eps, name=name
        )
        if dropout:
            # Where insightface's iresnet and SER-FIQ's ArcFace put it: on the embedding Linear's input.
            flat = nn.Dropout(dropout, deterministic=False, name="head_dropout")(flat)
        h = dense(cfg.embed_dim, "feature_0")(flat)
        # sow is a no-op unless 'intermediates' is mutable: GraFIQs reads the BatchNorm inputs.
        self.sow("intermediates", "feature_1_input", h)
        h = dense(cfg.embedding_dim, "feature_2")(batch_norm("feature_1")(h))
        self.sow("intermediates", "feature_3_input", h)
        return batch_norm("feature_3")(h)


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
