"""CVLface AdaFace ViT (the paper's backbones) -> vitnt-jax checkpoint.

    python -m converters.cvlface SRC DST [--variant base|small|testing] [--overwrite]

SRC: `pretrained_model/model.pt` of e.g. `minchul/cvlface_adaface_vit_base_webface4m` (keys
`net.*`), the repository's `model.safetensors` (keys `model.net.*`), or any state_dict of the
same layout, optionally under `module.` or inside a {'state_dict'|'model': ...} wrapper.
Mapping is strict: every missing or unexpected key is named (the authors' loader uses
strict=False and silently scores with random weights for any misnamed key).
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters.face_layout import flax_shapes, table
from converters.state_dict import ConversionError, apply_table, read_checkpoint, run_cli, save_converted, unwrap
from vitnt_jax.config import PRESETS, ViTConfig

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
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as error:
        raise ConversionError(
            "the checkpoint is not a CVLface ViT state_dict (no blocks.*, pos_embed, "
            "patch_embed.proj.weight keys); check that SRC is the ViT's model.pt or model.safetensors."
        ) from error
    found = (depth, width, mlp, patch)
    for variant, name in VARIANTS.items():
        c = PRESETS[name]
        if (c.depth, c.embed_dim, c.mlp_dim, c.patch_size) == found:
            return variant
    raise ConversionError(
        f"the checkpoint (depth {depth}, width {width}, MLP {mlp}, patch {patch}) matches no CVLface "
        f"variant ({', '.join(VARIANTS)}); set "
        "{variant} if it is one of them.",
        field="variant",
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
    state = unwrap(read_checkpoint(src), WRAPPERS, PREFIXES)
    config, variables, variant = convert_state_dict(state, variant)
    return save_converted(Path(src), dst, config, variables, {"family": "cvlface", "variant": variant}, overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        prog="python -m converters.cvlface",
        description="Convert a CVLface AdaFace ViT checkpoint (.pt or .safetensors) to vitnt-jax.",
        src_help="model.pt / model.safetensors / any state_dict of the CVLface ViT layout",
        variants=sorted(VARIANTS),
        convert=convert,
    )


if __name__ == "__main__":
    sys.exit(main())
