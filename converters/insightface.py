"""insightface arcface_torch ViTs (ViT-T/S/B/L; also LVFace) and TransFace -> vitnt-jax checkpoint.

    python -m converters.insightface SRC DST [--variant vit_t|vit_s|vit_b|vit_l] [--overwrite]

SRC: the released `model.pt` (a plain state_dict), a `module.`-prefixed one, or a full training
checkpoint (`checkpoint_gpu_*.pt`, the backbone under `state_dict_backbone`). LVFace publishes
its ViTs in this same layout: convert them here. A TransFace checkpoint is recognised by its
token gate (`senet.0.weight`, `senet.2.weight`) and converted with it, so the embedding equals
TransFace's. Patch 9 on 112 px gives a 12x12 grid: pixel rows/columns 108-111 are never read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters.face_layout import flax_shapes, table
from converters.state_dict import ConversionError, apply_table, read_checkpoint, run_cli, save_converted, unwrap
from vitnt_jax.config import PRESETS, ViTConfig

VARIANTS = ("vit_t", "vit_s", "vit_b", "vit_l")
# Full training checkpoints hold the backbone next to the margin head and optimizer state.
WRAPPERS = ("state_dict_backbone", "state_dict", "model")
PREFIXES = ("module.",)
IGNORED = {
    # Learned fill-in for randomly masked patches: used only in training (insightface keeps it
    # in every checkpoint, even with mask_ratio 0).
    "mask_token": "training only",
    # BatchNorm's update counter: used only to update running statistics in training.
    "num_batches_tracked": "training only",
}


def family_of(state: dict) -> str:
    """Returns 'transface' when the state_dict carries TransFace's token gate, else 'insightface'."""
    return "transface" if any(k.startswith("senet.") for k in state) else "insightface"


def infer_variant(state: dict) -> str:
    """Returns vit_t | vit_s | vit_b | vit_l from depth and width (all have 8 heads, MLP 4x, patch 9)."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        width = int(state["pos_embed"].shape[-1])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as error:
        raise ConversionError(
            "the checkpoint is not an insightface ViT state_dict (no blocks.*, pos_embed, "
            "patch_embed.proj.weight keys); check that SRC is the ViT backbone's model.pt."
        ) from error
    for variant in VARIANTS:
        c = PRESETS[f"insightface_{variant}"]
        if (c.depth, c.embed_dim, c.patch_size) == (depth, width, patch):
            return variant
    raise ConversionError(
        f"the checkpoint (depth {depth}, width {width}, patch {patch}) matches no insightface ViT "
        f"({', '.join(VARIANTS)}); set "
        "{variant} if it is one of them.",
        field="variant",
    )


def convert_state_dict(
    state: dict, variant: str | None = None, config: ViTConfig | None = None
) -> tuple[ViTConfig, dict, str]:
    """Returns (config, flax variables, variant) for an unwrapped insightface / TransFace state_dict.

    config: map onto this layout instead of the variant's preset (tests use tiny layouts).
    """
    if config is not None:
        what = f"the checkpoint does not match {config.name}"
        return config, apply_table(state, table(config), IGNORED, flax_shapes(config), what), "custom"
    variant = variant or infer_variant(state)
    if variant not in VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    family = family_of(state)
    config = PRESETS[f"{family}_{variant}"]
    what = f"the checkpoint does not match {'TransFace' if family == 'transface' else 'insightface'} {variant}"
    variables = apply_table(state, table(config), IGNORED, flax_shapes(config), what)
    return config, variables, variant


def convert(src: str | Path, dst: str | Path, variant: str | None = None, *, overwrite: bool = False) -> Path:
    """Converts the insightface / TransFace checkpoint `src` into the vitnt-jax checkpoint `dst`."""
    state = unwrap(read_checkpoint(src), WRAPPERS, PREFIXES)
    config, variables, variant = convert_state_dict(state, variant)
    family = "transface" if config.head == "transface" else "insightface"
    return save_converted(Path(src), dst, config, variables, {"family": family, "variant": variant}, overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        prog="python -m converters.insightface",
        description="Convert an insightface arcface_torch / LVFace / TransFace ViT checkpoint to vitnt-jax.",
        src_help="model.pt, or a training checkpoint holding state_dict_backbone",
        variants=list(VARIANTS),
        convert=convert,
    )


if __name__ == "__main__":
    sys.exit(main())
