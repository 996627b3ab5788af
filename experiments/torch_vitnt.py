"""A vectorised PyTorch implementation of ViTNT-FIQA on the CVLface layout, for benchmarks.

Written from DESIGN.md section 1 (not from the authors' loops): the blocks up to the last selected
one run once; per-patch distances accumulate as the blocks run (only the previous normalised state
is kept); attention probabilities are formed explicitly only in the block(s) whose weights the
score needs, fused scaled_dot_product_attention elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vitnt_jax.config import ViTConfig


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)

    def forward(self, x, want_attention: bool):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = None
        if want_attention:
            weights = torch.softmax((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.relu6(self.fc1(self.norm2(x)))), weights


def state_from_flax(variables, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """Returns a `TorchViTNT` state_dict holding the same weights as our Flax `variables`.

    Dense kernel (in, out) -> weight (out, in); conv kernel (p, p, C, D) -> (D, C, p, p).
    """
    import numpy as np

    params = variables["params"]
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    state = {
        "patch.weight": t(params["patch_embed"]["kernel"]).permute(3, 2, 0, 1),
        "patch.bias": t(params["patch_embed"]["bias"]),
        "pos": t(params["pos_embed"]),
        "norm.weight": t(params["norm"]["scale"]),
        "norm.bias": t(params["norm"]["bias"]),
    }
    blocks = params["blocks"]
    dense = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
    for i in range(cfg.depth):
        for name, (group, layer) in dense.items():
            state[f"blocks.{i}.{name}.weight"] = t(blocks[group][layer]["kernel"][i]).T
            if "bias" in blocks[group][layer]:
                state[f"blocks.{i}.{name}.bias"] = t(blocks[group][layer]["bias"][i])
        for norm in ("norm1", "norm2"):
            state[f"blocks.{i}.{norm}.weight"] = t(blocks[norm]["scale"][i])
            state[f"blocks.{i}.{norm}.bias"] = t(blocks[norm]["bias"][i])
    return state


class TorchViTNT(nn.Module):
    """Scores (B, 3, H, W) images in [-1, 1]; `forward(x, blocks, score=False)` is the plain pass."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    @torch.inference_mode()
    def forward(self, images, blocks, alpha=8.0, attention="last", score=True):
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        selected, last = set(blocks), blocks[-1]
        previous = dist = received = None
        for t in range(last + 1):
            need = score and t in selected and (attention == "all" or t == last)
            x, weights = self.blocks[t](x, need)
            if not score or t not in selected:
                continue
            z = F.normalize(self.norm(x), dim=-1)
            if previous is not None:
                step = (z - previous).norm(dim=-1)
                dist = step if dist is None else dist + step
            previous = z
            if weights is not None:
                got = weights.mean(1).sum(1)
                received = got if received is None or attention == "last" else received + got
        if not score:
            return x
        q = 2.0 / (1.0 + torch.exp(alpha * dist / (len(blocks) - 1)))
        w = received / received.sum(1, keepdim=True)
        return (q * w).sum(1)
