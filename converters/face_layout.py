"""The state_dict layout shared by the face ViTs: insightface arcface_torch (ViT-T/S/B/L, LVFace),
TransFace (plus its token gate) and CVLface (AdaFace ViT-S/B): one explicit rename table."""

from __future__ import annotations

from converters.state_dict import Row, conv, identity, linear
from vitnt_jax.config import ViTConfig


def block_rows(config: ViTConfig) -> list[Row]:
    """Returns the rows of the transformer blocks (`blocks.{i}.*`), shared with timm's ViT."""
    per_block = [
        ("norm1.weight", "norm1/scale", identity),
        ("norm1.bias", "norm1/bias", identity),
        ("attn.qkv.weight", "attn/qkv/kernel", linear),
        ("attn.proj.weight", "attn/proj/kernel", linear),
        ("attn.proj.bias", "attn/proj/bias", identity),
        ("norm2.weight", "norm2/scale", identity),
        ("norm2.bias", "norm2/bias", identity),
        ("mlp.fc1.weight", "mlp/fc1/kernel", linear),
        ("mlp.fc1.bias", "mlp/fc1/bias", identity),
        ("mlp.fc2.weight", "mlp/fc2/kernel", linear),
        ("mlp.fc2.bias", "mlp/fc2/bias", identity),
    ]
    if config.qkv_bias:
        per_block.append(("attn.qkv.bias", "attn/qkv/bias", identity))
    return [
        Row(f"blocks.{i}.{t}", f"params/blocks/{f}", fn, block=i) for i in range(config.depth) for t, f, fn in per_block
    ]


def table(config: ViTConfig) -> list[Row]:
    """Returns the explicit torch-key -> flax-path rows of the CVLface / insightface ViT layout."""
    rows = [
        Row("patch_embed.proj.weight", "params/patch_embed/kernel", conv),
        Row("patch_embed.proj.bias", "params/patch_embed/bias", identity),
        Row("pos_embed", "params/pos_embed", identity),
        Row("norm.weight", "params/norm/scale", identity),
        Row("norm.bias", "params/norm/bias", identity),
    ]
    rows += block_rows(config)
    if config.head in ("face", "transface"):
        # feature = Linear(N*D -> D) -> BatchNorm1d -> Linear(D -> E) -> BatchNorm1d.
        for i in (0, 2):
            rows.append(Row(f"feature.{i}.weight", f"params/feature_{i}/kernel", linear))
        for i in (1, 3):
            rows += [
                Row(f"feature.{i}.weight", f"params/feature_{i}/scale", identity),
                Row(f"feature.{i}.bias", f"params/feature_{i}/bias", identity),
                Row(f"feature.{i}.running_mean", f"batch_stats/feature_{i}/mean", identity),
                Row(f"feature.{i}.running_var", f"batch_stats/feature_{i}/var", identity),
            ]
    if config.head == "transface":
        # TransFace's token gate: Linear(N*D -> N, no bias), ReLU, Linear(N -> N, no bias), Sigmoid.
        rows += [
            Row("senet.0.weight", "params/senet_0/kernel", linear),
            Row("senet.2.weight", "params/senet_2/kernel", linear),
        ]
    return rows


def flax_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Returns flax path -> shape for every variable of `config`."""
    import jax  # here, not at import: a converter's --help needs no JAX

    from vitnt_jax.model import variable_shapes

    flat = jax.tree_util.tree_flatten_with_path(variable_shapes(config))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
