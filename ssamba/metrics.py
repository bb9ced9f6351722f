"""Downstream metrics of the fine-tuning recipes (docs/model.md#metrics), as the official ``calculate_stats`` computes
them with sklearn: accuracy for single-label tasks, mAP for multi-label AudioSet.

Both take ``scores`` and ``targets`` of shape ``(examples, classes)``: scores are logits or
probabilities (only their order matters), targets one-hot or multi-hot (positive where > 0.5).
"""

from __future__ import annotations

import torch


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose highest score is their (first) target class."""
    if scores.shape[0] == 0:
        return float("nan")
    return (scores.argmax(dim=-1) == targets.argmax(dim=-1)).double().mean().item()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision, ``(classes,)`` float64, NaN for a class without positives.

    sklearn's ``average_precision_score``: Σ over distinct score thresholds of (recall step) ×
    precision, so tied scores enter together at the precision of the whole tie group."""
    order = scores.double().argsort(dim=0, descending=True)
    ranked = scores.double().gather(0, order)
    hits = (targets > 0.5).double().gather(0, order)
    true_positives = hits.cumsum(dim=0)
    rank = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device)[:, None]
    # Each example counts at the end of its tie group: the last rank sharing its score.
    group_end = torch.ones_like(ranked, dtype=torch.bool)
    group_end[:-1] = ranked[1:] != ranked[:-1]
    end_rank = torch.where(group_end, rank.expand_as(ranked), torch.full_like(ranked, float("inf")))
    end_rank = end_rank.flip(0).cummin(dim=0).values.flip(0)
    end_index = (end_rank - 1).long()
    precision = true_positives.gather(0, end_index) / end_rank
    positives = hits.sum(dim=0)
    return (hits * precision).sum(dim=0) / positives.where(positives > 0, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro mean of :func:`average_precision` over the classes with at least one positive (NaN if none)."""
    per_class = average_precision(scores, targets)
    present = per_class[~per_class.isnan()]
    return present.mean().item() if present.numel() else float("nan")


def confusion_matrix(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(classes, classes)`` counts of single-label predictions: row = true class (the target's
    argmax), column = predicted class (the highest score)."""
    classes = scores.shape[-1]
    pairs = targets.argmax(dim=-1) * classes + scores.argmax(dim=-1)
    return torch.bincount(pairs.cpu(), minlength=classes * classes).reshape(classes, classes)


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each class's ``support`` (true examples), ``precision``, ``recall`` and ``f1`` from a
    :func:`confusion_matrix`; 0 where undefined (no predictions or no examples), as sklearn reports."""
    counts = confusion.double()
    hits, support, predicted = counts.diagonal(), counts.sum(dim=1), counts.sum(dim=0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.where(both > 0, 1.0), 0.0)
    return {"support": support.long(), "precision": precision, "recall": recall, "f1": f1}
