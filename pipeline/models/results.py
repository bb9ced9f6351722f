"""What a fine-tuning run reports about its selected epoch, so runs compare in the MLflow UI:

* summary metrics: ``best_epoch``, ``best_val_<metric>`` and, where the task has a test split,
  ``test_<metric>_at_best`` (the per-epoch ``val_<metric>`` curve shows the last epoch in the runs
  table; these show the epoch that was kept);
* per-class scores of each scored split (``per_class_<split>.json``, an MLflow table): support,
  precision, recall and F1 for single-label tasks, positives and average precision for multi-label;
* a confusion matrix figure of each split (``confusion_<split>.png``; single-label only);
* for a multi-fold job, the mean and (population) standard deviation over the folds of each summary
  metric (``<summary>_mean``, ``<summary>_std``), logged on the parent run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.runtime.tracking import RunTracker
from ssamba.metrics import average_precision, confusion_matrix, per_class_scores


def selected_summary(metric: str, selected: dict[str, float]) -> dict[str, float]:
    """The summary metrics of a run from the reported metrics of its selected epoch."""
    summary = {"best_epoch": float(selected["epoch"]), f"best_val_{metric}": float(selected[f"val_{metric}"])}
    if selected.get(f"test_{metric}") is not None:
        summary[f"test_{metric}_at_best"] = float(selected[f"test_{metric}"])
    return summary


def fold_statistics(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """``<name>_mean`` and ``<name>_std`` (population std, 0 for one fold) of every summary metric all
    folds have, except the epoch numbers."""
    names = [name for name in per_fold[0] if name != "best_epoch" and all(name in fold for fold in per_fold)]
    statistics = {}
    for name in names:
        values = np.array([fold[name] for fold in per_fold], dtype=np.float64)
        statistics[f"{name}_mean"], statistics[f"{name}_std"] = float(values.mean()), float(values.std())
    return statistics


def per_class_table(classes: list[str], scores: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> pd.DataFrame:
    """One row per class of a split's scores and targets (see the module docstring)."""
    if multi_label:
        return pd.DataFrame({"class": classes, "positives": (targets > 0.5).sum(dim=0).tolist(),
                             "average_precision": average_precision(scores, targets.float()).tolist()})
    columns = per_class_scores(confusion_matrix(scores, targets.float()))
    return pd.DataFrame({"class": classes, **{name: values.tolist() for name, values in columns.items()}})


def confusion_figure(classes: list[str], confusion: torch.Tensor, title: str):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted); counts are
    written in the cells when there are few classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(4 + 0.25 * len(classes), 24)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(classes))
    axis.set_xticks(ticks, classes, rotation=90, fontsize=7)
    axis.set_yticks(ticks, classes, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if len(classes) <= 20:
        for (row, column), count in np.ndenumerate(confusion.numpy()):
            if count:
                axis.text(column, row, str(count), ha="center", va="center", fontsize=7)
    figure.tight_layout()
    return figure


def log_selected(tracker: RunTracker, metric: str, classes: list[str], selected: dict[str, float],
                 outputs: dict[str, dict[str, torch.Tensor]], multi_label: bool) -> dict[str, float]:
    """Log the selected epoch's summary metrics, per-class tables and confusion matrices (``outputs``:
    per split prefix, the epoch's ``scores`` and ``targets``); returns the summary metrics."""
    import matplotlib.pyplot as plt

    summary = selected_summary(metric, selected)
    tracker.log_metrics(summary, int(selected["epoch"]))
    for prefix, output in outputs.items():
        tracker.log_table(per_class_table(classes, output["scores"], output["targets"], multi_label),
                          f"per_class_{prefix}.json")
        if not multi_label:
            figure = confusion_figure(classes, confusion_matrix(output["scores"], output["targets"].float()),
                                      f"{prefix}, epoch {int(selected['epoch'])}")
            tracker.log_figure(figure, f"confusion_{prefix}.png")
            plt.close(figure)
    return summary
