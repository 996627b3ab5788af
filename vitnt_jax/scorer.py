"""Jitted ViTNT-FIQA scoring: the model plus a tap, in one compiled function per batch shape."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitnt_jax.config import ViTConfig
from vitnt_jax.model import FaceViT, check_attention_kernel, truncate_blocks
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
    attention_kernel: str = "matmul",
) -> dict[str, Array]:
    """Returns the score dict with the score folded into the scan carry (flat memory in depth).

    `variables` must hold exactly `settings.num_blocks_to_run` blocks, or all of them when
    embed=True (the embedding needs the full depth); see `truncate_blocks`.
    images: (B, H, W, C) float, already preprocessed.
    attention_kernel: how the blocks whose attention the score does not read compute it (see
      `vitnt_jax.model.Attention`); the score's own block(s) always use the explicit softmax.
    """
    tap = StreamingTap(settings)
    run = config.depth if embed else settings.num_blocks_to_run
    model = FaceViT(config, dtype=dtype, precision=precision, attention_kernel=attention_kernel)
    out = model.apply(variables, images, tap=tap, num_blocks=run, embed=embed)
    result = tap.finish(out["tap_state"])
    if embed:
        result["embedding"] = out["embedding"].astype(jnp.float32)
    return result


OUTPUTS = ("quality", "patch_quality", "patch_distance", "patch_weight", "embedding")


class Scorer:
    """Compiled, data-parallel scoring of uint8 batches: `scorer(images) -> dict of numpy arrays`.

    The batch is split over `devices` (default: every local device) on a 1-D mesh axis 'data'
    with the parameters replicated: `parallel='jit'` uses jax.jit with NamedSharding (the modern
    form), `parallel='pmap'` a literal jax.pmap; both give the same numbers. Batches whose size
    is not a multiple of the device count are padded with zeros and the padding dropped again.
    Parameters are truncated to the blocks that must run: nothing after the last selected block
    is computed unless the embedding is asked for. One compilation per batch shape, shared by every
    Scorer with the same static settings (model config, score settings, outputs, precision, dtype,
    kernel, micro-batch, devices): a second Scorer, other weights included, compiles nothing.
    `lower(batch)` gives the program for inspection (HLO, memory and cost analysis).

    micro_batch: each device scores its share of the batch `micro_batch` images at a time, in a
    loop inside the same compiled call (the share is padded up to a multiple of it). "auto" (the
    default) is 8 on CPUs, where it was measured faster per image and keeps memory flat in the
    batch size, and off (None) on accelerators, which want whole batches.
    """

    def __init__(
        self,
        config: ViTConfig,
        variables: PyTree,
        settings: ScoreSettings,
        *,
        embed: bool = False,
        outputs: tuple[str, ...] | None = None,
        precision: Any = "highest",
        dtype: Any = jnp.float32,
        devices: list | None = None,
        parallel: str = "jit",
        attention_kernel: str = "matmul",
        micro_batch: int | str | None = "auto",
    ):
        if settings.blocks[-1] >= config.depth:
            raise ValueError(f"block {settings.blocks[-1]} does not exist in a {config.depth}-block model.")
        if parallel not in ("jit", "pmap"):
            raise ValueError(f"unknown parallel mode {parallel!r}; choose jit or pmap.")
        self.config, self.settings, self.embed, self.parallel = config, settings, embed, parallel
        self.devices = list(devices) if devices is not None else jax.local_devices()
        check_attention_kernel(attention_kernel, config)
        if attention_kernel == "cudnn":
            if any(device.platform != "gpu" for device in self.devices):
                raise ValueError("the cudnn attention kernel needs NVIDIA GPUs; use --attention-kernel matmul here.")
            if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
                raise ValueError("the cudnn attention kernel runs in bfloat16 only; add --dtype bfloat16.")
        if micro_batch == "auto":
            micro_batch = CPU_MICRO_BATCH if all(device.platform == "cpu" for device in self.devices) else None
        if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
            raise ValueError(f"micro_batch must be a positive number of images, 'auto' or None (got {micro_batch!r}).")
        self.micro_batch = micro_batch
        self.outputs = tuple(outputs) if outputs is not None else OUTPUTS
        run = config.depth if embed else settings.num_blocks_to_run
        variables = truncate_blocks(variables, run)
        mesh = Mesh(np.asarray(self.devices), ("data",))
        # jit: each micro-batch step takes `micro_batch` images from every device's share.
        shards, chunks = (
            (self.num_devices, NamedSharding(mesh, PartitionSpec(None, "data"))) if parallel == "jit" else (1, None)
        )
        # One Python function per set of static settings, shared by every Scorer that has them: jax
        # caches traces and compilations by function, so equal Scorers compile each batch shape once.
        fn = _scoring_function(
            config,
            settings,
            embed,
            precision,
            jnp.dtype(dtype),
            self.outputs,
            attention_kernel,
            micro_batch,
            shards,
            chunks,
        )
        if parallel == "jit":
            self._data = NamedSharding(mesh, PartitionSpec("data"))
            replicated = NamedSharding(mesh, PartitionSpec())
            self.variables = jax.device_put(variables, replicated)
            self._fn = jax.jit(fn, in_shardings=(replicated, self._data), out_shardings=self._data)
        else:
            # One copy of the parameters per device, stacked on the mapped axis and placed once.
            n = len(self.devices)
            stacked = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))), variables)
            self.variables = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("data")))
            self._data = None
            self._fn = jax.pmap(fn, devices=self.devices)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def padded_size(self, batch: int) -> int:
        """Returns the batch size scored for `batch` images: a multiple of the device count, and
        each device's share a multiple of `micro_batch` when the share is larger than it."""
        n = self.num_devices
        share = -(-batch // n)
        if self.micro_batch and share > self.micro_batch:
            share = -(-share // self.micro_batch) * self.micro_batch
        return share * n

    def _input_shape(self, batch: int) -> tuple[int, ...]:
        c, size = self.config, self.padded_size(batch)
        image = (c.img_size, c.img_size, c.in_channels)
        return (size, *image) if self.parallel == "jit" else (self.num_devices, size // self.num_devices, *image)

    def lower(self, batch: int) -> jax.stages.Lowered:
        """Returns the lowered scoring program for `batch` images (padded as `dispatch` pads them).

        `.compile()` gives the executable (`.as_text()`, `.memory_analysis()`, `.cost_analysis()`);
        with parallel='pmap' the input is (devices, images per device, H, W, C).
        """
        images = jax.ShapeDtypeStruct(self._input_shape(batch), jnp.uint8, sharding=self._data)
        return self._fn.lower(self.variables, images)

    def cache_size(self) -> int:
        """Returns how many programs this Scorer's jitted function holds: one per padded batch size.

        parallel='jit' only (jax.pmap keeps no cache to read); raises NotImplementedError otherwise.
        """
        if self.parallel != "jit":
            raise NotImplementedError("cache_size() reads jax.jit's cache; a pmap Scorer has none to read.")
        return self._fn._cache_size()

    def dispatch(self, images: np.ndarray) -> tuple[int, dict[str, Array]]:
        """Starts scoring (B, H, W, C) uint8 images; returns (B, device results) without waiting."""
        images = np.asarray(images)
        c = self.config
        if images.dtype != np.uint8 or images.shape[1:] != (c.img_size, c.img_size, c.in_channels):
            raise ValueError(
                f"Scorer takes (B, {c.img_size}, {c.img_size}, {c.in_channels}) uint8 RGB images, got "
                f"{images.shape} {images.dtype}; use score_streaming for float input."
            )
        b = images.shape[0]
        size = self.padded_size(b)
        if size != b:
            images = np.concatenate([images, np.zeros((size - b, *images.shape[1:]), images.dtype)])
        if self.parallel == "jit":
            return b, self._fn(self.variables, jax.device_put(images, self._data))
        shards = images.reshape(self.num_devices, size // self.num_devices, *images.shape[1:])
        return b, self._fn(self.variables, shards)

    def fetch(self, pending: tuple[int, dict[str, Array]]) -> dict[str, np.ndarray]:
        """Waits for a `dispatch` result and returns it as numpy arrays without the padding."""
        b, result = pending
        out = {}
        for key, value in result.items():
            value = np.asarray(value)
            if self.parallel == "pmap":
                value = value.reshape(-1, *value.shape[2:])
            out[key] = value[:b]
        return out

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Returns the score dict for (B, H, W, C) uint8 RGB images at the model's input size."""
        return self.fetch(self.dispatch(np.asarray(images)))


# Images per device and step on CPUs (measured: ViT-B at batch 32 on 2 cores, 7.4 img/s in steps
# of 8 against 6.2 in one piece, and a third of the temporaries).
CPU_MICRO_BATCH = 8


def micro_batched(fn, variables, images, *, size: int | None, shards: int, sharding=None) -> PyTree:
    """Returns fn(variables, images), computed `size` images per shard at a time in a loop.

    images: (B, ...) with B split into `shards` equal contiguous shares (the devices' shares), each
    a multiple of `size`; every output has B on axis 0. No loop when a share holds <= `size` images.
    """
    b = images.shape[0]
    share = b // shards
    if not size or share <= size:
        return fn(variables, images)
    if b % shards or share % size:
        raise ValueError(
            f"a batch of {b} images does not split into {shards} shares of whole {size}-image steps; "
            "pad it to Scorer.padded_size."
        )
    steps = share // size
    rest = images.shape[1:]
    # (shards, steps, size) -> (steps, shards * size): step i takes chunk i of every device's share.
    x = images.reshape(shards, steps, size, *rest).swapaxes(0, 1).reshape(steps, shards * size, *rest)
    if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
    out = jax.lax.map(lambda chunk: fn(variables, chunk), x)
    undo = lambda a: a.reshape(steps, shards, size, *a.shape[2:]).swapaxes(0, 1).reshape(b, *a.shape[2:])  # noqa: E731
    return jax.tree.map(undo, out)


@functools.cache
def _scoring_function(
    config, settings, embed, precision, dtype, outputs, attention_kernel, micro_batch, shards, chunks
):
    """Returns `(variables, uint8 images) -> score dict` for these static settings, the same object each time."""

    def score(variables, images):
        result = score_streaming(
            config,
            variables,
            preprocess(images, config),
            settings,
            embed=embed,
            precision=precision,
            dtype=dtype,
            attention_kernel=attention_kernel,
        )
        return {k: v for k, v in result.items() if k in outputs}

    return functools.partial(micro_batched, score, size=micro_batch, shards=shards, sharding=chunks)
