"""CVLface AdaFace ViT (the paper's backbones) -> vitnt-jax checkpoint.

    python -m converters.cvlface SRC DST [--variant base|small|testing] [--overwrite]

SRC: `pretrained_model/model.pt` of e.g. `minchul/cvlface_adaface_vit_base_webface4m` (keys
`net.*`), the repository's `model.safetensors` (keys `model.net.*`), or any state_dict of the
same layout, optionally under `module.` or inside a {'state_dict'|'model': ...} wrapper.
Mapping is strict: every missing or unexpected key is named (the authors' loader uses
strict=False and silently scores with random weights for any misnamed key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from converters.state_dict import (
    ConversionError,
    Row,
    apply_table,
    conv,
    identity,
    linear,
    read_checkpoint,
    sha256,
    unwrap,
)
from vitnt_jax import checkpoint
from vitnt_jax.config import PRESETS, ViTConfig
from vitnt_jax.model import variable_shapes

# "testing" is the tiny preset the test-suite converts; it is no released model.
VARIANTS = {"small": "cvlface_vit_small", "base": "cvlface_vit_base", "testing": "testing"}
WRAPPERS = ("state_dict", "model")
PREFIXES = ("module.", "model.", "net.")
IGNORED = {
    # Learned fill-in for masked patches: used only by training-time random masking.
    "mask_token": "training only",
    # BatchNorm's update counter: used only to update running statistics in training.
    "num_batches_tracked": "training only",
}


def table(config: ViTConfig) -> list[Row]:
    """Returns the explicit torch-key -> flax-path rows of the CVLface / insightface ViT layout."""
    rows = [
        Row("patch_embed.proj.weight", "params/patch_embed/kernel", conv),
        Row("patch_embed.proj.bias", "params/patch_embed/bias", identity),
        Row("pos_embed", "params/pos_embed", identity),
        Row("norm.weight", "params/norm/scale", identity),
        Row("norm.bias", "params/norm/bias", identity),
    ]
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
    for i in range(config.depth):
        rows += [Row(f"blocks.{i}.{t}", f"params/blocks/{f}", fn, block=i) for t, f, fn in per_block]
    if config.embedding_dim is not None:
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
    return rows


def flax_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Returns flax path -> shape for every variable of `config`."""
    flat = jax.tree_util.tree_flatten_with_path(variable_shapes(config))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def infer_variant(state: dict) -> str:
    """Returns the variant ('small' | 'base') whose shapes the state_dict has.

    Head count is not visible in any shape (qkv is (3D, D) for every head count), so it comes
    from the preset that matches depth, width, MLP width and patch size.
    """
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        width = int(state["pos_embed"].shape[-1])
        mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        raise ConversionError(
            "the checkpoint is not a CVLface ViT state_dict (no blocks.*, pos_embed, "
            "patch_embed.proj.weight keys); check that SRC is the ViT's model.pt or model.safetensors."
        ) from None
    found = (depth, width, mlp, patch)
    for variant, name in VARIANTS.items():
        c = PRESETS[name]
        if (c.depth, c.embed_dim, c.mlp_dim, c.patch_size) == found:
            return variant
    raise ConversionError(
        f"the checkpoint (depth {depth}, width {width}, MLP {mlp}, patch {patch}) matches no CVLface "
        f"variant ({', '.join(VARIANTS)}); pass --variant if it is one of them."
    )


def convert_state_dict(state: dict, variant: str | None = None) -> tuple[ViTConfig, dict, str]:
    """Returns (config, flax variables, variant) for an unwrapped CVLface state_dict."""
    variant = variant or infer_variant(state)
    if variant not in VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    config = PRESETS[VARIANTS[variant]]
    variables = apply_table(
        state, table(config), IGNORED, flax_shapes(config), f"the checkpoint does not match CVLface ViT-{variant}"
    )
    return config, variables, variant


def convert(src: str | Path, dst: str | Path, variant: str | None = None, *, overwrite: bool = False) -> Path:
    """Converts the CVLface checkpoint `src` into a vitnt-jax checkpoint directory `dst`."""
    src = Path(src)
    if Path(dst).resolve() in src.resolve().parents:
        raise ConversionError(f"{dst} contains the source {src}; write the checkpoint somewhere else.")
    state = unwrap(read_checkpoint(src), WRAPPERS, PREFIXES)
    config, variables, variant = convert_state_dict(state, variant)
    source = {"family": "cvlface", "variant": variant, "file": src.name, "sha256": sha256(src)}
    try:
        return checkpoint.save(dst, config, variables, source, overwrite=overwrite)
    except checkpoint.CheckpointError as error:
        raise ConversionError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.cvlface",
        description="Convert a CVLface AdaFace ViT checkpoint (.pt or .safetensors) to vitnt-jax.",
    )
    parser.add_argument("src", help="model.pt / model.safetensors / any state_dict of the CVLface ViT layout")
    parser.add_argument("dst", help="output checkpoint directory (pass it to the scorer's --model)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="default: inferred from the shapes")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.variant, overwrite=args.overwrite)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
