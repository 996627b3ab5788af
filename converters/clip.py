"""CLIP ViT-B/16 visual tower (OpenAI and open_clip files) -> vitnt-jax checkpoint.

    python -m converters.clip SRC DST [--activation quick_gelu|gelu] [--overwrite]

SRC: OpenAI's `ViT-B-16.pt` (a TorchScript archive with fp16 weights) or an open_clip file
(`open_clip_pytorch_model.bin` / `open_clip_model.safetensors`). Only the `visual.*` tower is
converted; the text tower is not used. OpenAI's weights use QuickGELU (x * sigmoid(1.702 x)),
the default here; pass `--activation gelu` for open_clip models trained with exact GELU.
Scores use the 196 patch tokens after `ln_post` (the tower's final LayerNorm); the embedding is
`ln_post(class token) @ proj` (no transpose). Input: 224x224 RGB with CLIP's mean/std.

TorchScript: OpenAI's `.pt` files are TorchScript archives, which `torch.load(weights_only=True)`
cannot read and `torch.jit.load` would run (a crafted archive's `__setstate__` can write files).
This converter reads their tensors with `converters.torchscript`, which runs nothing of the
archive: the same state_dict `torch.jit.load(...).state_dict()` gives, or a one-line refusal.
"""

from __future__ import annotations

import dataclasses
import sys
import zipfile
from pathlib import Path

import numpy as np

from converters import torchscript
from converters.face_layout import flax_shapes
from converters.state_dict import (
    ConversionError,
    Row,
    apply_table,
    conv,
    identity,
    linear,
    read_checkpoint,
    run_cli,
    save_converted,
    unwrap,
)
from vitnt_jax.config import PRESETS, ViTConfig

WRAPPERS = ("state_dict", "model")
PREFIXES = ("module.",)
PRESET = "clip_vit_b16"


def _class_embedding(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, 1, -1)  # CLIP keeps it as (D,); ours is a (1, 1, D) token


def _positional_embedding(a: np.ndarray) -> np.ndarray:
    return a[None]  # (N + 1, D) -> (1, N + 1, D)


def table(config: ViTConfig) -> list[Row]:
    """Returns the explicit torch-key -> flax-path rows of CLIP's VisionTransformer."""
    v = "visual."
    rows = [
        Row(v + "conv1.weight", "params/patch_embed/kernel", conv),
        Row(v + "class_embedding", "params/cls_token", _class_embedding),
        Row(v + "positional_embedding", "params/pos_embed", _positional_embedding),
        Row(v + "ln_pre.weight", "params/ln_pre/scale", identity),
        Row(v + "ln_pre.bias", "params/ln_pre/bias", identity),
        Row(v + "ln_post.weight", "params/norm/scale", identity),
        Row(v + "ln_post.bias", "params/norm/bias", identity),
        Row(v + "proj", "params/proj", identity),  # used as x @ proj: no transpose
    ]
    per_block = [
        ("ln_1.weight", "norm1/scale", identity),
        ("ln_1.bias", "norm1/bias", identity),
        ("attn.in_proj_weight", "attn/qkv/kernel", linear),  # rows [q; k; v], heads major
        ("attn.in_proj_bias", "attn/qkv/bias", identity),
        ("attn.out_proj.weight", "attn/proj/kernel", linear),
        ("attn.out_proj.bias", "attn/proj/bias", identity),
        ("ln_2.weight", "norm2/scale", identity),
        ("ln_2.bias", "norm2/bias", identity),
        ("mlp.c_fc.weight", "mlp/fc1/kernel", linear),
        ("mlp.c_fc.bias", "mlp/fc1/bias", identity),
        ("mlp.c_proj.weight", "mlp/fc2/kernel", linear),
        ("mlp.c_proj.bias", "mlp/fc2/bias", identity),
    ]
    for i in range(config.depth):
        rows += [Row(f"{v}transformer.resblocks.{i}.{t}", f"params/blocks/{f}", fn, block=i) for t, f, fn in per_block]
    return rows


def read_clip(path: str | Path) -> dict:
    """Returns the state_dict of an OpenAI TorchScript archive or of a plain/open_clip file."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
        if scripted:
            return torchscript.read_state_dict(path)
    return read_checkpoint(path)


def convert_state_dict(
    state: dict, activation: str = "quick_gelu", config: ViTConfig | None = None
) -> tuple[ViTConfig, dict]:
    """Returns (config, flax variables) for a CLIP state_dict (its text tower is ignored).

    config: the layout to map onto (default: the ViT-B/16 preset; tests pass a tiny one).
    """
    if activation not in ("quick_gelu", "gelu"):
        raise ConversionError(f"unknown activation {activation!r}; choose quick_gelu or gelu.")
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ConversionError("the checkpoint has no visual.* keys; it is not a CLIP model file.")
    config = dataclasses.replace(config or PRESETS[PRESET], activation=activation)
    variables = apply_table(
        visual, table(config), {}, flax_shapes(config), f"the checkpoint does not match {config.name}"
    )
    return config, variables


def convert(src: str | Path, dst: str | Path, *, activation: str = "quick_gelu", overwrite: bool = False) -> Path:
    """Converts the CLIP file `src` into the vitnt-jax checkpoint `dst`."""
    state = unwrap(read_clip(src), WRAPPERS, PREFIXES)
    config, variables = convert_state_dict(state, activation)
    source = {"family": "clip", "variant": PRESET, "activation": activation}
    return save_converted(Path(src), dst, config, variables, source, overwrite)


def main(argv: list[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument(
            "--activation",
            choices=["quick_gelu", "gelu"],
            default="quick_gelu",
            help="MLP activation the weights were trained with (default: quick_gelu, OpenAI's)",
        )

    return run_cli(
        argv,
        prog="python -m converters.clip",
        description="Convert a CLIP ViT-B/16 visual tower (OpenAI .pt or open_clip file) to vitnt-jax.",
        src_help="ViT-B-16.pt (OpenAI TorchScript) or open_clip_pytorch_model.bin / open_clip_model.safetensors",
        variants=[],
        convert=convert,
        add_arguments=extra,
    )


if __name__ == "__main__":
    sys.exit(main())
