"""Masked-patch pretraining (SSAST recipe, docs/model.md#masking and #objective): cluster masking, prediction heads, losses.

For each clip, M patches are masked: their token embeddings are replaced by a learned ``mask_embed``
before the [CLS] token and positional embedding are added. From the encoder's outputs at the masked
positions, two heads predict the raw (normalised) spectrogram patches:

* discriminative: InfoNCE over the clip's own masked patches (no temperature), with its accuracy;
* generative: mean squared error;

loss = NCE + 10·MSE. Officially the two objectives use two encoder passes with independent masks
(``two_pass=True``); ``two_pass=False`` feeds both heads from one masked pass (half the compute).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ssamba.encoder import PatchGrid

VALIDATION_MASK_COUNT = 400  # the official validation always masks 400 of 512 patches


class MaskableEncoder(Protocol):
    """What the pretraining model needs from an encoder (SSAMBA or the SSAST baseline)."""

    num_prefix_tokens: int
    embed_dim: int

    def embed_patches(self, features: torch.Tensor) -> torch.Tensor: ...

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------


def cluster_mask_indices(num_patches: int, num_mask: int, time_patches: int, rng: random.Random) -> torch.Tensor:
    """SSAST cluster masking of one clip (docs/model.md#masking), sorted ascending.

    Draw a cluster size c ∈ {3, 4, 5} once; then repeatedly pick a start patch s and add the c×c
    square ``s + time_patches·i + j`` of flat indices (rows wrap; index 0 and indices past the end
    are dropped) until more than ``num_mask`` distinct patches are collected; keep the
    ``num_mask`` lowest, which is what ``list(set(ids))[:M]`` does in CPython for these small
    integers. Patch 0 is therefore never masked and the top frequency row is under-masked.
    """
    _check_mask_count(num_patches, num_mask)
    cluster = rng.randrange(3) + 3
    chosen: set[int] = set()
    while len(chosen) <= num_mask:
        start = rng.randrange(num_patches)
        for i in range(cluster):
            for j in range(cluster):
                candidate = start + time_patches * i + j
                if 0 < candidate < num_patches:
                    chosen.add(candidate)
    return torch.tensor(sorted(chosen)[:num_mask])


def random_mask_indices(num_patches: int, num_mask: int, rng: random.Random) -> torch.Tensor:
    """Uniform masking without clusters, used by SSAST for frame tokens; sorted ascending."""
    _check_mask_count(num_patches, num_mask)
    return torch.tensor(sorted(rng.sample(range(num_patches), num_mask)))


def _check_mask_count(num_patches: int, num_mask: int) -> None:
    # Cluster masking never picks patch 0, so at most num_patches - 1 can be masked.
    if not 1 <= num_mask < num_patches:
        raise ValueError(f"cannot mask {num_mask} of {num_patches} patches: the count must be below "
                         f"{num_patches} and at least 1")


def check_mask_choice(mask_patches: int | None, mask_ratio: float | None) -> None:
    """The rules that hold whatever the patch grid: one of count and ratio, each in range."""
    if (mask_patches is None) == (mask_ratio is None):
        raise ValueError("give exactly one of mask_patches and mask_ratio")
    if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if mask_patches is not None and mask_patches < 1:
        raise ValueError(f"mask_patches must be at least 1, got {mask_patches}")


def mask_count(num_patches: int, mask_patches: int | None = None, mask_ratio: float | None = None) -> int:
    """Masked patches per clip from an absolute count or a ratio of the patches (exactly one given):
    the one place where mask counts are checked."""
    check_mask_choice(mask_patches, mask_ratio)
    if mask_ratio is not None:
        mask_patches = max(1, round(mask_ratio * num_patches))
    _check_mask_count(num_patches, mask_patches)
    return mask_patches


def sample_masks(grid: PatchGrid, batch_size: int, num_mask: int, rng: random.Random) -> torch.Tensor:
    """``(batch, num_mask)`` masked patch indices: cluster masking for patch tokens, random masking
    for frame tokens (SSAST switches on ``num_mel_bins != fshape``)."""
    if grid.fshape != grid.num_mel_bins:
        masks = [cluster_mask_indices(grid.num_patches, num_mask, grid.time_patches, rng) for _ in range(batch_size)]
    else:
        masks = [random_mask_indices(grid.num_patches, num_mask, rng) for _ in range(batch_size)]
    return torch.stack(masks)


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


def info_nce(targets: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official InfoNCE and accuracy over each clip's masked patches (docs/model.md#objective).

    ``targets`` and ``predictions`` are ``(batch, M, patch_size)``. Scores ``S = X·Pᵀ`` per clip
    (``S[i, j] = ⟨x_i, p_j⟩``, no temperature); loss ``−mean_i log softmax_j(S)[i, i]``, averaged
    over clips. Accuracy: the fraction of columns j whose argmax over rows of the row-softmax is j.
    """
    scores = targets @ predictions.transpose(1, 2)  # (batch, M, M)
    log_probs = F.log_softmax(scores, dim=-1)
    loss = -log_probs.diagonal(dim1=1, dim2=2).mean()
    best_row = log_probs.argmax(dim=1)  # per column j, argmax over i (log is monotone)
    accuracy = (best_row == torch.arange(scores.shape[-1], device=scores.device)).float().mean()
    return loss, accuracy


def patchify(features: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """``(batch, frames, mel)`` → the raw patches ``(batch, N, fshape·tshape)`` in token order, each
    flattened frequency-major, exactly as ``nn.Unfold`` on ``(batch, 1, mel, frames)``."""
    image = features.unsqueeze(1).transpose(2, 3)
    return F.unfold(image, kernel_size=(grid.fshape, grid.tshape), stride=(grid.fstride, grid.tstride)).transpose(1, 2)


def masks_to_device(masks: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Masks drawn on the host to the device without waiting for the device's queue (pinned copy)."""
    if device.type != "cuda":
        return masks.to(device)
    return masks.pin_memory().to(device, non_blocking=True)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens[b, indices[b, i]]`` for every clip b: ``(batch, L, D)``, ``(batch, M)`` → ``(batch, M, D)``."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def check_pretraining_grid(grid: PatchGrid) -> None:
    """Masked prediction needs non-overlapping patches: an overlapping neighbour would show part of a
    masked patch (the official code refuses them too)."""
    if grid.overlapping:
        raise ValueError(f"pretraining patches must not overlap (stride ≥ patch size), got {grid}")


def prediction_head(embed_dim: int, patch_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, patch_size))


@dataclass(frozen=True)
class PretrainConfig:
    """Masked patches per clip (a count, or a ratio with ``mask_patches=None``), two passes or one,
    and the weight of the generative loss."""

    mask_patches: int | None = 400
    mask_ratio: float | None = None
    two_pass: bool = True
    mse_weight: float = 10.0

    def __post_init__(self) -> None:
        check_mask_choice(self.mask_patches, self.mask_ratio)

    def num_masked(self, num_patches: int) -> int:
        """Masked patches per clip on a grid of ``num_patches``; ``ValueError`` if the grid cannot hold them."""
        return mask_count(num_patches, self.mask_patches, self.mask_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    nce: torch.Tensor
    mse: torch.Tensor
    accuracy: torch.Tensor


class SSAMBAPretrainModel(nn.Module):
    """An encoder with ``mask_embed`` and the two prediction heads (official names ``cpredlayer``
    and ``gpredlayer``, so official checkpoints load by name)."""

    def __init__(self, encoder: MaskableEncoder, grid: PatchGrid, config: PretrainConfig = PretrainConfig()) -> None:
        super().__init__()
        check_pretraining_grid(grid)
        self.encoder, self.grid, self.config = encoder, grid, config
        self.num_mask = config.num_masked(grid.num_patches)
        dim = encoder.embed_dim
        self.cpredlayer = prediction_head(dim, grid.patch_size)
        self.gpredlayer = prediction_head(dim, grid.patch_size)
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.xavier_normal_(self.mask_embed)

    def encode_masked(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Encoder outputs at the masked positions, ``(batch, M, D)``, with masked tokens replaced."""
        tokens = self.encoder.embed_patches(features)
        is_masked = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        is_masked.scatter_(1, masks, True)
        tokens = torch.where(is_masked.unsqueeze(-1), self.mask_embed.to(tokens.dtype), tokens)
        encoded = self.encoder.forward_tokens(tokens)
        return gather_tokens(encoded, masks + self.encoder.num_prefix_tokens)

    def forward(
        self, features: torch.Tensor, rng: random.Random, num_mask: int | None = None
    ) -> PretrainOutput:
        """Losses for a batch of normalised fbanks ``(batch, frames, mel)``; masks drawn from ``rng``.

        ``num_mask`` overrides the configured count (validation uses 400)."""
        num_mask = self.num_mask if num_mask is None else num_mask
        targets = patchify(features, self.grid)
        batch = features.shape[0]
        nce_masks = masks_to_device(sample_masks(self.grid, batch, num_mask, rng), features.device)
        mse_masks = masks_to_device(sample_masks(self.grid, batch, num_mask, rng), features.device) if self.config.two_pass else nce_masks
        nce_hidden = self.encode_masked(features, nce_masks)
        mse_hidden = self.encode_masked(features, mse_masks) if self.config.two_pass else nce_hidden
        nce, accuracy = info_nce(gather_tokens(targets, nce_masks).float(), self.cpredlayer(nce_hidden).float())
        reconstruction = self.gpredlayer(mse_hidden).float()
        mse = F.mse_loss(reconstruction, gather_tokens(targets, mse_masks).float())
        return PretrainOutput(nce + self.config.mse_weight * mse, nce, mse, accuracy)

    @torch.no_grad()
    def reconstruct(self, features: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Input with its masked patches replaced by the generative head's predictions, and the mask,
        both ``(batch, frames, mel)`` over the area the patches cover: for figures and inspection."""
        masks = sample_masks(self.grid, features.shape[0], self.num_mask, rng).to(features.device)
        predicted = self.gpredlayer(self.encode_masked(features, masks)).to(features.dtype)
        patches = patchify(features, self.grid)
        patches = patches.scatter(1, masks.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), predicted)
        mask_patches = torch.zeros_like(patches).scatter(1, masks.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), 1.0)
        return self._unpatchify(patches, features), self._unpatchify(mask_patches, features)

    def _unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        g = self.grid
        image = F.fold(
            patches.transpose(1, 2),
            output_size=(like.shape[2], like.shape[1]),
            kernel_size=(g.fshape, g.tshape),
            stride=(g.fstride, g.tstride),
        )
        return image.squeeze(1).transpose(1, 2)
