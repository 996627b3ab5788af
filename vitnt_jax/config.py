"""Architecture configs of the face Vision Transformers we score with, and presets by name."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Activation = Literal["relu6", "gelu", "gelu_tanh", "quick_gelu"]
# Embedding heads: "face" = final norm -> flatten -> Dense -> BN -> Dense -> BN (CVLface,
# insightface); "transface" = the same after TransFace's token gate (senet); "clip" = final norm
# of the class token @ proj; "cls" = final norm of the class token (timm pre-logits); "none".
Head = Literal["face", "transface", "clip", "cls", "none"]


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
    color: Literal["rgb", "bgr"] = "rgb"  # channel order the network expects
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    default_blocks: str = "all"

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}.")
        if self.head in ("clip", "cls") and not self.class_token:
            raise ValueError(f"head {self.head!r} reads the class token; set class_token=True.")
        if (self.head == "none") != (self.embedding_dim is None):
            raise ValueError("embedding_dim must be None exactly when head is 'none'.")

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
        """Returns the config a JSON dict describes; unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; this checkpoint needs a newer vitnt-jax.")
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
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
