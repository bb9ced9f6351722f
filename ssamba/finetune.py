"""Fine-tuning and linear-probe models (docs/model.md#fine-tuning).

A pretrained encoder is moved to the fine-tuning patch grid (stride 10 instead of 16, a different
clip length) by adapting its positional embedding exactly as the official code does; the encoder's
outputs are pooled (mean over the non-[CLS] tokens by default, or [CLS]) and classified by
``LayerNorm → Linear``. A frozen encoder gives a linear probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssamba.encoder import EncoderConfig, PatchGrid, SSAMBAEncoder


def adapt_pos_embed(
    pos_embed: torch.Tensor, source: PatchGrid, target: PatchGrid, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Move a ``(1, prefix + f·t, D)`` positional embedding from the ``source`` to the ``target`` grid.

    As in SSAST/SSAMBA: the time axis is centre-cropped when it shrinks and bilinearly
    interpolated otherwise; then the same for the frequency axis. (The official frequency crop
    slices with the time size, a bug that only bites when the frequency axis shrinks; this does the
    intended centre crop.)"""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    if patches.shape[1] != source.num_patches:
        raise ValueError(f"positional embedding has {patches.shape[1]} patch entries, source grid {source.num_patches}")
    grid = patches.transpose(1, 2).reshape(1, dim, source.freq_patches, source.time_patches)
    grid = _fit_axis(grid, target.time_patches, axis=3)
    grid = _fit_axis(grid, target.freq_patches, axis=2)
    return torch.cat([prefix, grid.reshape(1, dim, -1).transpose(1, 2)], dim=1)


def _fit_axis(grid: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    current = grid.shape[axis]
    if size < current:
        start = current // 2 - size // 2
        return grid.narrow(axis, start, size)
    if size > current:
        new_size = (size, grid.shape[3]) if axis == 2 else (grid.shape[2], size)
        return F.interpolate(grid, size=new_size, mode="bilinear", align_corners=False)
    return grid


def adapt_encoder_state(
    state: dict[str, torch.Tensor], source: PatchGrid, target: PatchGrid, num_prefix_tokens: int = 1
) -> dict[str, torch.Tensor]:
    """An encoder state dict from the pretraining grid, ready to load into an encoder built on
    ``target``: positional embedding adapted; patch kernel reused (kernel shapes must match)."""
    if (source.fshape, source.tshape) != (target.fshape, target.tshape):
        raise ValueError(
            f"fine-tuning patch {target.fshape}×{target.tshape} differs from pretraining {source.fshape}×{source.tshape}"
        )
    adapted = dict(state)
    adapted["pos_embed"] = adapt_pos_embed(state["pos_embed"], source, target, num_prefix_tokens)
    return adapted


def encoder_on_grid(config: EncoderConfig, state: dict[str, torch.Tensor], target: PatchGrid) -> SSAMBAEncoder:
    """A pretrained encoder moved to another patch grid (stride, clip length) and loaded."""
    encoder = SSAMBAEncoder(config.with_grid(target))
    encoder.load_state_dict(adapt_encoder_state(state, config.grid, target))
    return encoder


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int
    pooling: Literal["mean", "cls"] = "mean"
    freeze_encoder: bool = False  # True: linear probe

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")


class AudioClassifier(nn.Module):
    """Encoder + pooling + ``LayerNorm → Linear`` head (official name ``mlp_head``). Returns logits."""

    def __init__(self, encoder: nn.Module, config: ClassifierConfig) -> None:
        super().__init__()
        self.encoder, self.config = encoder, config
        dim = encoder.embed_dim
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, config.num_classes))
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> AudioClassifier:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # a probe sees the frozen encoder's deterministic features
        return self

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled clip embedding ``(batch, D)``."""
        encoded = self.encoder(features)
        if self.config.pooling == "cls":
            return encoded[:, 0]
        return encoded[:, self.encoder.num_prefix_tokens :].mean(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.freeze_encoder:
            with torch.no_grad():
                embedding = self.embed(features)
        else:
            embedding = self.embed(features)
        return self.mlp_head(embedding)
