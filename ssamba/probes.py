"""Frozen-encoder probes: how well a clip embedding separates labelled classes, without training the encoder.

A clip's embedding pools the encoder's patch tokens (:func:`clip_embeddings`); two probes score a set of
embeddings split into training and held-out clips:

- :func:`knn_scores`: a weighted k-nearest-neighbour vote (DINO's monitor): cosine similarity to every
  training clip, the ``k`` most similar vote for their classes with weight ``exp(similarity / T)``.
- :func:`logistic_scores`: a logistic regression on standardised embeddings, fitted by full-batch L-BFGS
  (softmax for single-label tasks, one sigmoid per class for multi-label ones).

Both return class scores of the held-out clips; ``ssamba.metrics`` turns them into accuracy or mAP. Everything
runs on whatever device the embeddings are on, in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssamba.encoder import PatchGrid

# How a clip's patch tokens become one vector. ``bands``: the mean over time of each frequency band, side by
# side (F·D values: keeps the spectral layout); ``mean``: the mean of every patch (D); ``both``: the two
# concatenated, mean first ((F+1)·D). The same names pool HEAR and embed outputs (``ssamba.hear``).
POOLINGS: tuple[str, ...] = ("bands", "mean", "both")
DEFAULT_POOLING = "bands"


def embedding_size(grid: PatchGrid, embed_dim: int, pooling: str) -> int:
    """The length of a pooled embedding."""
    bands = {"bands": grid.freq_patches, "mean": 1, "both": grid.freq_patches + 1}[_checked(pooling)]
    return bands * embed_dim


def _checked(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def column_embeddings(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """Patch tokens ``(n, F, T, D)`` → one embedding per time column ``(n, T, size)``."""
    _checked(pooling)
    mean = tokens.mean(dim=1)
    if pooling == "mean":
        return mean
    bands = tokens.transpose(1, 2).flatten(2)
    return bands if pooling == "bands" else torch.cat([mean, bands], dim=-1)


def covered_columns(frames: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """How many patch columns hold a clip of ``frames`` frames rather than its zero padding (at least one)."""
    frames = frames.clamp(max=grid.target_length)
    columns = torch.div(frames - grid.tshape + grid.tstride - 1, grid.tstride, rounding_mode="floor") + 1
    return columns.clamp(1, grid.time_patches)


def clip_embeddings(encoded: torch.Tensor, grid: PatchGrid, pooling: str = DEFAULT_POOLING,
                    frames: torch.Tensor | None = None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Encoder outputs ``(n, prefix + F·T, D)`` → clip embeddings ``(n, size)``: the column embeddings
    averaged over the columns the clip covers (all columns when ``frames`` is not given)."""
    tokens = encoded[:, num_prefix_tokens:]
    tokens = tokens.reshape(tokens.shape[0], grid.freq_patches, grid.time_patches, tokens.shape[-1])
    columns = column_embeddings(tokens, pooling)
    if frames is None:
        return columns.mean(dim=1)
    covered = covered_columns(frames.to(columns.device), grid)
    weights = (torch.arange(grid.time_patches, device=columns.device)[None, :] < covered[:, None]).to(columns.dtype)
    return (columns * weights[..., None]).sum(dim=1) / covered[:, None].to(columns.dtype)


def knn_scores(train: torch.Tensor, train_targets: torch.Tensor, held_out: torch.Tensor, k: int = 20,
               temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-NN class scores of the held-out embeddings ``(m, classes)``: each of the ``k`` most
    cosine-similar training clips adds ``exp(similarity / temperature)`` to its classes (``train_targets``
    one- or multi-hot ``(n, classes)``); scores are normalised by the total weight, so a multi-label score
    is the weighted share of neighbours that carry the class."""
    train, held_out = F.normalize(train.double(), dim=1), F.normalize(held_out.double(), dim=1)
    similarity = held_out @ train.T
    nearest, index = similarity.topk(min(k, train.shape[0]), dim=1)
    weights = (nearest / temperature).exp()
    votes = (weights[..., None] * train_targets.double()[index]).sum(dim=1)
    return votes / weights.sum(dim=1, keepdim=True)


def standardise(train: torch.Tensor, held_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's per-feature mean and standard deviation (constant features: 1)."""
    train, held_out = train.double(), held_out.double()
    mean, std = train.mean(dim=0), train.std(dim=0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (train - mean) / std, (held_out - mean) / std


def logistic_scores(train: torch.Tensor, train_targets: torch.Tensor, held_out: torch.Tensor,
                    weight_decay: float = 1e-3, multi_label: bool = False, max_iter: int = 200) -> torch.Tensor:
    """Logits ``(m, classes)`` of a logistic regression fitted on the standardised training embeddings:
    minimises the mean cross-entropy (softmax; per-class binary for ``multi_label``) plus
    ``weight_decay · ‖W‖²`` (bias unpenalised) with full-batch L-BFGS. A convex problem: its optimum,
    not a schedule, so it compares across runs."""
    x, held_out = standardise(train, held_out)
    targets = train_targets.double()
    weight = torch.zeros(x.shape[1], targets.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(targets.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        if multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / x.shape[0]
        else:
            loss = F.cross_entropy(logits, targets)
        loss = loss + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (held_out @ weight + bias).detach()
