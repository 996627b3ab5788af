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


class TransFaceViT(FaceViT):
    """FaceViT plus TransFace's token gate on the final-normed tokens before the face head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg, mask_token=True)
        n, d = cfg.num_patches, cfg.embed_dim
        self.senet = nn.Sequential(
            nn.Linear(n * d, n, bias=False), nn.ReLU(), nn.Linear(n, n, bias=False), nn.Sigmoid()
        )

    @torch.inference_mode()
    def trace(self, images):
        outputs, attentions, _ = super().trace(images)
        normed = self.norm(outputs[-1])
        b = normed.shape[0]
        gate = self.senet(normed.reshape(b, -1)).reshape(b, -1, 1)
        return outputs, attentions, self.feature((normed * gate).reshape(b, -1))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipBlock(nn.Module):
    """CLIP ResidualAttentionBlock: ln_1, nn.MultiheadAttention (in_proj), ln_2, c_fc / c_proj."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        act = QuickGELU() if cfg.activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, cfg.mlp_dim))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_dim, d))

    def forward(self, x):
        y = self.ln_1(x)
        out, weights = self.attn(y, y, y, need_weights=True, average_attn_weights=False)
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class ClipVisual(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.conv1 = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.num_tokens, d) * 0.02)
        self.ln_pre = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ClipBlock(cfg) for _ in range(cfg.depth)])
        self.ln_post = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(torch.randn(d, cfg.embedding_dim) * d**-0.5)


class Clip(nn.Module):
    """The visual tower of CLIP (keys `visual.*`) next to a stand-in text tower we must ignore."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.visual = ClipVisual(cfg)
        self.token_embedding = nn.Embedding(10, 8)  # text-tower stand-in
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.norm = self.visual.ln_post  # the final norm, for oracle_score

    def forward(self, images):
        outputs, attentions, embedding = self.trace(images)
        return embedding

    def trace(self, images):
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding)
        outputs, attentions = [], []
        for block in v.transformer.resblocks:
            x, weights = block(x)
            outputs.append(x)
            attentions.append(weights)
        return outputs, attentions, v.ln_post(x[:, 0]) @ v.proj


class TimmBlock(Block):
    """timm's Block: same names as the face layout, with qkv bias, GELU and eps 1e-6 from cfg."""

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg)
        self.mlp.act = nn.GELU()


class TimmViT(nn.Module):
    def __init__(self, cfg: ViTConfig, num_classes: int = 10):
        super().__init__()
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([TimmBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, num_classes)

    @torch.inference_mode()
    def trace(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        outputs, attentions = [], []
        for block in self.blocks:
            x, weights = block(x)
            outputs.append(x)
            attentions.append(weights)
        return outputs, attentions, self.norm(x)[:, 0]


def perturb(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Returns `model` in eval mode with every parameter moved randomly away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@torch.inference_mode()
def oracle_score_prefixed(model, images, blocks, alpha=8.0, aggregation="attention", attention="last", prefix=1):
    """The vectorised oracle for class-token models: patch tokens only; attention to patch keys,
    from every query (class token included), renormalised over the patches."""
    outputs, attentions, _ = model.trace(images)
    z = torch.stack([nn.functional.normalize(model.norm(outputs[t])[:, prefix:], dim=-1) for t in blocks], 1)
    distance = (z[:, 1:] - z[:, :-1]).norm(dim=-1).mean(1)
    q = 2.0 / (1.0 + torch.exp(alpha * distance))
    if aggregation == "mean":
        return {"quality": q.mean(1), "patch_quality": q}
    received = torch.stack([attentions[t][..., prefix:].mean(1).sum(1) for t in blocks], 0)
    received = received[-1] if attention == "last" else received.mean(0)
    weights = received / received.sum(1, keepdim=True)
    return {"quality": (q * weights).sum(1), "patch_quality": q}
