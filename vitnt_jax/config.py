"""Architecture configs of the face Vision Transformers we score with, and presets by name."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Activation = Literal["relu6", "gelu", "gelu_tanh", "quick_gelu"]


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
    embedding_dim: int | None = 512  # None: no face-embedding head
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
        if self.class_token:
            raise NotImplementedError("class-token ViTs are not supported yet; face ViTs have none.")

    @property
    def grid_size(self) -> int:
        """Patches per side; a VALID conv ignores the last img_size % patch_size pixels."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

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


def get_preset(name: str) -> ViTConfig:
    """Returns the preset config called `name`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.") from None
