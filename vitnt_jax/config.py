"""Architecture configs of the face Vision Transformers we score with, and presets by name."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from typing import Any, Literal, get_args

from vitnt_jax.errors import UserError

Activation = Literal["relu6", "gelu", "gelu_tanh", "quick_gelu"]
# Embedding heads: "face" = final norm -> flatten -> Dense -> BN -> Dense -> BN (CVLface,
# insightface); "transface" = the same after TransFace's token gate (senet); "clip" = final norm
# of the class token @ proj; "cls" = final norm of the class token (timm pre-logits); "none".
Head = Literal["face", "transface", "clip", "cls", "none"]
Color = Literal["rgb", "bgr"]

# Upper bounds far above every released face or vision ViT (ViT-L: width 768, depth 24; CLIP:
# 224 px), low enough that no config within them describes a model that cannot fit in memory.
MAX_IMG_SIZE = 4096
MAX_WIDTH = 16384
MAX_DEPTH = 512
MAX_MLP_DIM = 65536


class ConfigError(UserError, ValueError):
    """A config field with a value no model can have; the message names the field, its value and what is allowed."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _show(value: Any) -> str:
    # Bounded: a crafted config may hold a megabyte of text or a deeply nested list in a field.
    return _REPR.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problems(c: ViTConfig) -> list[str]:
    """Returns one clause per invalid field, each naming the field, its value and what is allowed."""

    def whole(name: str, low: int, high: int, also: str = "") -> bool:
        value = getattr(c, name)
        if not _is_int(value) or not low <= value <= high:
            found.append(f"{name} is {_show(value)}, but it must be a whole number from {low} to {high}{also}")
            return False
        return True

    def real(name: str, low: float, high: float, *, open_low: bool = False) -> bool:
        value = getattr(c, name)
        ok = _is_real(value) and math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
        if not ok:
            bound = f"above {low:g}" if open_low else f"from {low:g}"
            found.append(f"{name} is {_show(value)}, but it must be a finite number {bound} to {high:g}")
        return ok

    def choice(name: str, allowed: tuple) -> None:
        value = getattr(c, name)
        if not isinstance(value, str) or value not in allowed:
            found.append(f"{name} is {_show(value)}, but it must be one of {', '.join(map(repr, allowed))}")

    def flag(name: str) -> None:
        value = getattr(c, name)
        if not isinstance(value, bool):
            found.append(f"{name} is {_show(value)}, but it must be true or false")

    def triple(name: str, low: float, high: float) -> None:
        value = getattr(c, name)
        ok = isinstance(value, tuple) and len(value) == 3
        ok = ok and all(_is_real(v) and math.isfinite(v) and low <= v <= high for v in value)
        if not ok:
            found.append(
                f"{name} is {_show(value)}, but it must be three finite numbers (one per channel) "
                f"from {low:g} to {high:g}"
            )

    found: list[str] = []
    if not isinstance(c.name, str) or not c.name or len(c.name) > 200:
        found.append(f"name is {_show(c.name)}, but it must be a non-empty text of at most 200 characters")
    if whole("img_size", 1, MAX_IMG_SIZE) and _is_int(c.patch_size):
        whole("patch_size", 1, c.img_size, " (img_size)")
    else:
        whole("patch_size", 1, MAX_IMG_SIZE)
    if c.in_channels != 3 or not _is_int(c.in_channels):
        found.append(f"in_channels is {_show(c.in_channels)}, but it must be 3 (images are scored as RGB or BGR)")
    if whole("embed_dim", 1, MAX_WIDTH) and _is_int(c.num_heads) and 1 <= c.num_heads:
        if c.embed_dim % c.num_heads:
            found.append(f"num_heads is {_show(c.num_heads)}, but it must divide embed_dim ({c.embed_dim})")
    else:
        whole("num_heads", 1, MAX_WIDTH)
    whole("depth", 1, MAX_DEPTH)
    if real("mlp_ratio", 0.0, MAX_MLP_DIM, open_low=True) and _is_int(c.embed_dim):
        if not 1 <= int(c.embed_dim * c.mlp_ratio) <= MAX_MLP_DIM:
            found.append(
                f"mlp_ratio is {_show(c.mlp_ratio)}, "
                f"but the MLP width embed_dim * mlp_ratio must be from 1 to {MAX_MLP_DIM}"
            )
    choice("activation", get_args(Activation))
    for name in ("qkv_bias", "class_token", "patch_bias", "ln_pre"):
        flag(name)
    real("layer_norm_eps", 1e-12, 1.0)
    choice("head", get_args(Head))
    if c.head == "none" or c.embedding_dim is None:
        if (c.head == "none") != (c.embedding_dim is None):
            found.append(
                f"embedding_dim is {_show(c.embedding_dim)} with head {_show(c.head)}, "
                "but it must be null exactly when head is 'none'"
            )
    elif whole("embedding_dim", 1, MAX_WIDTH) and c.head == "cls" and c.embedding_dim != c.embed_dim:
        found.append(
            f"embedding_dim is {_show(c.embedding_dim)}, but head 'cls' gives the class token, so it must equal "
            f"embed_dim ({c.embed_dim})"
        )
    if c.head in ("clip", "cls") and c.class_token is False:
        found.append(f"class_token is false, but head {_show(c.head)} reads the class token, so it must be true")
    if c.head == "transface" and c.class_token is True:  # its token gate weighs the patch tokens only
        found.append("class_token is true, but head 'transface' gates patch tokens only, so it must be false")
    real("head_batch_norm_eps", 1e-12, 1.0)
    choice("color", get_args(Color))
    # mean and std apply to pixels scaled to [0, 1]; a std near zero would overflow float32.
    triple("mean", -10.0, 10.0)
    triple("std", 1e-3, 10.0)
    if not isinstance(c.default_blocks, str) or len(c.default_blocks) > 1000:
        found.append(
            f"default_blocks is {_show(c.default_blocks)}, but it must be a block selection such as 'all' or '0-19'"
        )
    elif _is_int(c.depth) and 1 <= c.depth <= MAX_DEPTH:
        from vitnt_jax.selection import parse_blocks

        try:
            if len(parse_blocks(c.default_blocks, c.depth)) < 2:
                found.append(f"default_blocks is {_show(c.default_blocks)}, but it must select at least two blocks")
        except ValueError as error:
            found.append(
                f"default_blocks is {_show(c.default_blocks)}, which is no selection out of {c.depth} blocks "
                f"({str(error).rstrip('.')})"
            )
    return found


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that differs between the face ViT families we convert.

    Field names follow the PyTorch constructors (img_size, patch_size, embed_dim, depth ...).
    `default_blocks` is the block selection the published evaluation uses for this backbone.
    """

    name: str = "custom"
    img_size: int = 112
    patch_size: int = 8
    in_channels: int = 3
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    activation: Activation = "relu6"
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-5
    class_token: bool = False
    patch_bias: bool = True  # CLIP's patch conv has no bias
    ln_pre: bool = False  # CLIP: LayerNorm after the position embedding
    head: Head = "face"
    embedding_dim: int | None = 512  # output width of the head ("cls": embed_dim; "none": None)
    head_batch_norm_eps: float = 2e-5
    color: Color = "rgb"  # channel order the network expects
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    default_blocks: str = "all"  # a block selection (see vitnt_jax.selection), of at least two blocks

    def __post_init__(self):
        problems = _problems(self)
        if problems:
            raise ConfigError(f"{'; '.join(problems)}.")

    @property
    def grid_size(self) -> int:
        """Patches per side; a VALID conv ignores the last img_size % patch_size pixels."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (the class token); scores use patch tokens only."""
        return int(self.class_token)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        # int() truncation, as the PyTorch modules compute hidden_features.
        return int(self.embed_dim * self.mlp_ratio)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """Returns the config a JSON dict describes; unknown fields are an error, and so is any invalid value.

        Raises ConfigError (a ValueError) naming every invalid field, its value and what is allowed.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"the config is {type(data).__name__} {_show(data)}, but it must be a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; this checkpoint needs a newer vitnt-jax.")
        data = dict(data)
        for key in ("mean", "std"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))


# CVLface AdaFace ViTs (the paper's backbones): patch 8 on 112 px, width 512, ReLU6 MLP,
# no qkv bias. The paper scores ViT-B with blocks 0-19 and ViT-S with all 12 blocks.
PRESETS: dict[str, ViTConfig] = {
    "cvlface_vit_small": ViTConfig(
        name="cvlface_vit_small", depth=12, num_heads=8, mlp_ratio=5.0, default_blocks="all"
    ),
    "cvlface_vit_base": ViTConfig(
        name="cvlface_vit_base", depth=24, num_heads=16, mlp_ratio=3.0, default_blocks="0-19"
    ),
}

# insightface arcface_torch ViTs (also LVFace's releases) and TransFace (the same plus a token
# gate): patch 9 on 112 px = a 12x12 grid (pixel rows/cols 108-111 are never read), 8 heads,
# MLP 4x, ReLU6, no qkv bias. Without a published block selection for them we use the paper's
# rule for CVLface: a 24-block model tracks blocks 0-19, a 12-block model all of them.
_INSIGHTFACE = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
for _variant, (_width, _depth) in _INSIGHTFACE.items():
    for _family, _head in (("insightface", "face"), ("transface", "transface")):
        PRESETS[f"{_family}_{_variant}"] = ViTConfig(
            name=f"{_family}_{_variant}",
            patch_size=9,
            embed_dim=_width,
            depth=_depth,
            num_heads=8,
            mlp_ratio=4.0,
            head=_head,
            default_blocks="0-19" if _depth == 24 else "all",
        )

PRESETS.update(
    {
        # OpenAI CLIP ViT-B/16 visual tower (the paper's foundation-model ablation).
        "clip_vit_b16": ViTConfig(
            name="clip_vit_b16",
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            activation="quick_gelu",
            qkv_bias=True,
            layer_norm_eps=1e-5,
            class_token=True,
            patch_bias=False,
            ln_pre=True,
            head="clip",
            embedding_dim=512,
            mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711),
        ),
        # timm vit_base_patch16_224 (generic ImageNet ViT-B/16).
        "timm_vit_base_patch16_224": ViTConfig(
            name="timm_vit_base_patch16_224",
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            activation="gelu",
            qkv_bias=True,
            layer_norm_eps=1e-6,
            class_token=True,
            head="cls",
            embedding_dim=768,
        ),
        # Tiny layout for tests: 4x4 grid of 8-px patches, 3 blocks.
        "testing": ViTConfig(
            name="testing",
            img_size=32,
            patch_size=8,
            embed_dim=16,
            depth=3,
            num_heads=2,
            mlp_ratio=2.0,
            embedding_dim=8,
            default_blocks="all",
        ),
    }
)


def get_preset(name: str) -> ViTConfig:
    """Returns the preset config called `name`."""
    try:
        return PRESETS[name]
    except KeyError as error:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.") from error
