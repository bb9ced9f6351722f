"""The SSAST encoder (a DeiT ViT on spectrogram patches, docs/model.md#ssast-baseline): the efficiency and quality baseline.

It exposes the same interface as :class:`ssamba.encoder.SSAMBAEncoder` (``embed_patches``,
``forward_tokens``, ``num_prefix_tokens``, ``embed_dim``), so the pretraining heads, the fine-tuning
classifier and the benchmarks run one code path for both models. Attention is computed eagerly
(``softmax(QKᵀ/√d)·V`` with the full attention matrix) as in the SSAMBA paper's comparison, or with
``scaled_dot_product_attention`` as the fairer modern baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssamba.encoder import PatchEmbed, PatchGrid

# DeiT widths and heads; every size has 12 layers.
SSAST_SIZES: dict[str, tuple[int, int]] = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


@dataclass(frozen=True)
class SSASTConfig:
    embed_dim: int = 768
    num_heads: int = 12
    depth: int = 12
    mlp_ratio: float = 4.0
    grid: PatchGrid = PatchGrid()
    attention: Literal["eager", "sdpa"] = "eager"

    @classmethod
    def from_size(cls, size: str, **overrides) -> SSASTConfig:
        if size not in SSAST_SIZES:
            raise ValueError(f"unknown model size {size!r}; choose from {sorted(SSAST_SIZES)}")
        embed_dim, heads = SSAST_SIZES[size]
        return cls(embed_dim=embed_dim, num_heads=heads, **overrides)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, implementation: str) -> None:
        super().__init__()
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {implementation!r}")
        self.num_heads, self.implementation = num_heads, implementation
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: SSASTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, config.num_heads, config.attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SSASTEncoder(nn.Module):
    """ViT with [CLS] and distillation tokens (positions 0 and 1), learnable positional embedding."""

    num_prefix_tokens = 2

    def __init__(self, config: SSASTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.grid, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid.num_patches + 2, dim))
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for param in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def embed_patches(self, features: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(features)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        prefix = torch.cat([self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1)], dim=1)
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed_patches(features))
