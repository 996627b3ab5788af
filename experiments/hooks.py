"""Baseline-only views into the face ViT, made from outside it with Flax method interception.

The model has no hooks of its own: these context managers intercept its submodules' calls while
a `FaceViT.apply` runs inside them (`flax.linen.intercept_methods`, the counterpart of PyTorch's
forward hooks, which the published baselines use). Use them inside the traced function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp


@contextlib.contextmanager
def dropout_before(name: str, rate: float, key: jax.Array) -> Iterator[None]:
    """Applies inverted dropout (keep 1 - rate, scale 1 / (1 - rate)) to the input of submodule `name`.

    The mask is drawn from `key` with the input's shape; rate 0 changes nothing.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1) (got {rate}).")

    def interceptor(next_fun, args, kwargs, context):
        if rate and context.method_name == "__call__" and context.module.name == name:
            x = args[0]
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            args = (jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)), *args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def record_inputs(names: tuple[str, ...]) -> Iterator[dict[str, jax.Array]]:
    """Yields a dict that receives the input of each submodule in `names` when it is called."""
    seen: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name in names:
            seen[context.module.name] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield seen
