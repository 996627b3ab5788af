"""Our own PyTorch modules with the CVLface / insightface face-ViT layout, and a vectorised
PyTorch ViTNT-FIQA oracle written from DESIGN.md section 1. Used as parity references in tests.

The state_dict keys and the maths follow the published layout (pre-norm blocks, ReLU6 MLP,
qkv without bias, LayerNorm eps 1e-5, head Linear -> BatchNorm1d(eps 2e-5) -> Linear -> BN).
"""

from __future__ import annotations

import torch
from torch import nn

from vitnt_jax.config import ViTConfig


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, C)
        weights = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), weights


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x):
        y, weights = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    """CVLface-layout ViT; `trace` returns every block's output, its attention and the embedding."""

    def __init__(self, cfg: ViTConfig, mask_token: bool = False):
        super().__init__()
        d, n = cfg.embed_dim, cfg.num_patches
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.feature = nn.Sequential(
            nn.Linear(n * d, d, bias=False),
            nn.BatchNorm1d(d, eps=cfg.head_batch_norm_eps),
            nn.Linear(d, cfg.embedding_dim, bias=False),
            nn.BatchNorm1d(cfg.embedding_dim, eps=cfg.head_batch_norm_eps),
        )
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))

    @torch.inference_mode()
    def trace(self, images: torch.Tensor):
        """images (B, C, H, W) in [-1, 1] -> (block outputs [(B,N,D)], attentions [(B,H,N,N)], embedding)."""
        x = self.patch_embed(images) + self.pos_embed
        outputs, attentions = [], []
        for block in self.blocks:
            x, weights = block(x)
            outputs.append(x)
            attentions.append(weights)
        embedding = self.feature(self.norm(x).reshape(x.shape[0], -1))
        return outputs, attentions, embedding


def randomize(model: FaceViT, seed: int) -> FaceViT:
    """Returns `model` in eval mode with every parameter and BN statistic random (not default)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            p.copy_(scale + torch.randn(p.shape, generator=g) * (0.2 if scale else 0.1))
        for bn in (model.feature[1], model.feature[3]):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return model.eval()


@torch.inference_mode()
def oracle_score(
    model: FaceViT, images: torch.Tensor, blocks, alpha=8.0, aggregation="attention", attention="last"
) -> dict[str, torch.Tensor]:
    """Vectorised ViTNT-FIQA in PyTorch, written from DESIGN.md section 1 (true forward pass)."""
    outputs, attentions, _ = model.trace(images)
    z = torch.stack([nn.functional.normalize(model.norm(outputs[t]), dim=-1) for t in blocks], 1)
    distance = (z[:, 1:] - z[:, :-1]).norm(dim=-1).mean(1)  # (B, N)
    q = 2.0 / (1.0 + torch.exp(alpha * distance))
    if aggregation == "mean":
        return {"quality": q.mean(1), "patch_quality": q}
    received = torch.stack([attentions[t].mean(1).sum(1) for t in blocks], 0)  # (K, B, N)
    received = received[-1] if attention == "last" else received.mean(0)
    weights = received / received.sum(1, keepdim=True)
    return {"quality": (q * weights).sum(1), "patch_quality": q}
