"""timm ViTs (`vit_base_patch16_224` and its pretrained tags) -> vitnt-jax checkpoint.

    python -m converters.timm SRC DST [--overwrite]

SRC: a timm `model.safetensors` / `pytorch_model.bin` of vit_base_patch16_224 (class token,
exact GELU, LayerNorm eps 1e-6, qkv with bias). Scores use the 196 patch tokens; the embedding
is the final-normed class token (timm's pre-logits features). The ImageNet classifier (`head.*`)
is dropped: it is neither part of the score nor of the embedding.
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters.face_layout import block_rows, flax_shapes
from converters.state_dict import (
    ConversionError,
    Row,
    apply_table,
    conv,
    identity,
    read_checkpoint,
    run_cli,
    save_converted,
    unwrap,
)
from vitnt_jax.config import PRESETS, ViTConfig

WRAPPERS = ("state_dict", "model", "state_dict_ema")
PREFIXES = ("module.",)
IGNORED = {
    # ImageNet classifier on the class token: not used for quality or for the embedding.
    "head.weight": "classifier",
    "head.bias": "classifier",
}
PRESET = "timm_vit_base_patch16_224"


def table(config: ViTConfig) -> list[Row]:
    """Returns the explicit torch-key -> flax-path rows of timm's VisionTransformer."""
    rows = [
        Row("cls_token", "params/cls_token", identity),
        Row("pos_embed", "params/pos_embed", identity),
        Row("patch_embed.proj.weight", "params/patch_embed/kernel", conv),
        Row("patch_embed.proj.bias", "params/patch_embed/bias", identity),
        Row("norm.weight", "params/norm/scale", identity),
        Row("norm.bias", "params/norm/bias", identity),
    ]
    return rows + block_rows(config)


def convert_state_dict(state: dict, config: ViTConfig | None = None) -> tuple[ViTConfig, dict]:
    """Returns (config, flax variables) for an unwrapped timm ViT state_dict."""
    config = config or PRESETS[PRESET]
    if "cls_token" not in state and "pos_embed" in state:
        raise ConversionError("the checkpoint has no cls_token; it is not a class-token timm ViT.")
    variables = apply_table(
        state, table(config), IGNORED, flax_shapes(config), f"the checkpoint does not match {config.name}"
    )
    return config, variables


def convert(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Converts the timm checkpoint `src` into the vitnt-jax checkpoint `dst`."""
    state = unwrap(read_checkpoint(src), WRAPPERS, PREFIXES)
    config, variables = convert_state_dict(state)
    return save_converted(Path(src), dst, config, variables, {"family": "timm", "variant": PRESET}, overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        prog="python -m converters.timm",
        description="Convert a timm vit_base_patch16_224 checkpoint to vitnt-jax.",
        src_help="model.safetensors / pytorch_model.bin of timm's vit_base_patch16_224",
        variants=[],
        convert=convert,
    )


if __name__ == "__main__":
    sys.exit(main())
