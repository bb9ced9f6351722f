"""``python -m pipeline.finetune``: fine-tune or linearly probe an encoder on a labelled task, on Ray Train.

    python -m pipeline.finetune --config configs/finetune/<task>.yaml [--set model.checkpoint=s3://...]

1. The task's layout is read and checked (``pipeline.tasks``); its audio goes through the featurize
   stage once (``features``; a re-run reuses the shards).
2. Splits: tasks with folds (ESC-50) run one training per test fold, named ``<name>-fold<k>``, and
   report the mean accuracy; tasks with splits train on ``train``, select on ``validation`` and report
   ``test`` at the selected epoch.
3. Each training runs on Ray Train (DDP): the encoder (our checkpoint, an official ``.pth`` or random
   init) moved to the fine-tuning grid, mean or [CLS] pooling, ``LayerNorm → Linear``; Adam with a
   head learning-rate multiplier and per-epoch step decay; cross-entropy; accuracy every epoch to
   MLflow; the best epoch's checkpoint kept (by validation accuracy).

Waveform mixup is not applied: the featurize-once path stores fbanks, not waveforms.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import featurize
from pipeline.config import (
    ExamplesConfig, FeaturizeConfig, FinetuneJobConfig, InputConfig, flatten, public_dict, run_command,
)
from pipeline.data import examples_dataset
from pipeline.sources import AudioSource, SourceError
from pipeline.storage import resolve
from pipeline.tasks import TaskData, read_task
from pipeline.tracking import RunTracker, resolve_tracking_uri
from pipeline.trainer import report, restored_state, torch_trainer
from ssamba import AudioClassifier, ClassifierConfig, EncoderConfig, PatchGrid, SSAMBAEncoder
from ssamba.checkpoint import load_encoder_weights
from ssamba.finetune import encoder_on_grid

def prepare(config: FinetuneJobConfig) -> TaskData:
    """Read the task and featurize its audio (resuming whatever an earlier run wrote)."""
    data = read_task(config.task, config.data_root, config.storage)
    manifest = resolve(config.features.rstrip("/") + ".manifest.jsonl", config.storage)
    manifest.write_bytes("".join(json.dumps(source.to_dict()) + "\n" for source in data.sources).encode())
    featurize.run(FeaturizeConfig(input=InputConfig(manifest=manifest.uri), output=config.features,
                                  storage=config.storage, shard_size=64))
    return data


def build_classifier(config: FinetuneJobConfig, num_classes: int) -> AudioClassifier:
    grid = PatchGrid(num_mel_bins=128, target_length=config.target_length, fstride=config.model.stride,
                     tstride=config.model.stride)
    if config.model.checkpoint:
        data = resolve(config.model.checkpoint, config.storage).read_bytes()
        encoder_config, state = load_encoder_weights(data)
        encoder = encoder_on_grid(encoder_config, state, grid)
    else:
        encoder = SSAMBAEncoder(EncoderConfig.from_size(config.model.size, grid=grid))
    return AudioClassifier(encoder, ClassifierConfig(num_classes, config.model.pooling, config.model.freeze_encoder))


def _targets(batch: dict[str, np.ndarray], classes: list[str]) -> dict[str, np.ndarray]:
    index = {name: i for i, name in enumerate(classes)}
    return {"fbank": batch["fbank"], "target": np.array([index[label] for label in batch["label"]], dtype=np.int64)}


def _subset(config: FinetuneJobConfig, sources: list[AudioSource], classes: list[str], train: bool) -> ray.data.Dataset:
    examples = ExamplesConfig(features=config.features, target_length=config.target_length, norm=config.norm,
                              augment=config.augment if train else {}, shuffle=train)
    uris = {source.uri for source in sources}
    return (examples_dataset(examples, config.storage)
            .filter(lambda row: row["uri"] in uris)
            .map_batches(_targets, fn_kwargs={"classes": classes}))


def _accuracy(model, shard, batch_size: int, device) -> float:
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            correct[0] += (model(batch["fbank"]).argmax(dim=-1) == batch["target"]).sum()
            correct[1] += batch["target"].shape[0]
    model.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    return (correct[0] / correct[1].clamp_min(1)).item()


def train_loop(loop_config: dict) -> None:
    config: FinetuneJobConfig = loop_config["config"]
    classes, run_name = loop_config["classes"], loop_config["run_name"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(rank)
    classifier = build_classifier(config, len(classes))
    head, encoder = list(classifier.mlp_head.parameters()), list(classifier.encoder.parameters())
    model = ray.train.torch.prepare_model(classifier)
    groups = [{"params": head, "lr": config.optim.lr * config.optim.head_lr_multiplier, "base_lr": config.optim.lr * config.optim.head_lr_multiplier}]
    if not config.model.freeze_encoder:
        groups.append({"params": encoder, "lr": config.optim.lr, "base_lr": config.optim.lr})
    optimizer = torch.optim.Adam(groups, weight_decay=config.optim.weight_decay, betas=config.optim.betas)
    start_epoch = 0
    state = restored_state()
    if state is not None:
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    tracker = None
    if rank == 0:
        tracker = RunTracker(loop_config["tracking_uri"], config.tracking.experiment, run_name,
                             tags={"task": config.task, "classes": str(len(classes))})
        if not tracker.resumed:
            tracker.log_params(flatten(public_dict(config)))
    train_shard, eval_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("eval")
    test_shard = ray.train.get_dataset_shard("test") if loop_config["has_test"] else None
    for epoch in range(start_epoch, config.epochs):
        decays = 0 if epoch < config.optim.decay_start_epoch else (epoch - config.optim.decay_start_epoch) // config.optim.decay_every + 1
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * config.optim.decay**decays
        losses = []
        for batch in train_shard.iter_torch_batches(batch_size=config.batch_size, drop_last=True, device=device):
            loss = F.cross_entropy(model(batch["fbank"]), batch["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_accuracy": _accuracy(model, eval_shard, config.batch_size, device)}
        if test_shard is not None:
            metrics["test_accuracy"] = _accuracy(model, test_shard, config.batch_size, device)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        report(metrics, lambda: {"model": getattr(model, "module", model).state_dict(),
                                 "optimizer": optimizer.state_dict(), "epoch": epoch, "classes": classes},
               f"epoch-{epoch:04d}")
    if tracker is not None:
        tracker.finish()


def train_once(config: FinetuneJobConfig, run_name: str, classes: list[str], train: list[AudioSource],
               evaluate: list[AudioSource], test: list[AudioSource] | None) -> ray.train.Result:
    storage = resolve(config.storage_path, config.storage)
    datasets = {"train": _subset(config, train, classes, True), "eval": _subset(config, evaluate, classes, False)}
    if test:
        datasets["test"] = _subset(config, test, classes, False)
    trainer = torch_trainer(
        train_loop,
        {"config": config, "classes": classes, "run_name": run_name, "has_test": bool(test),
         "tracking_uri": resolve_tracking_uri(config.tracking.tracking_uri)},
        run_name, storage, config.scaling, datasets,
        ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_accuracy",
                                   checkpoint_score_order="max"),
    )
    return trainer.fit()


def best_metrics(result: ray.train.Result) -> dict:
    """The reported metrics of the epoch with the best validation accuracy (its checkpoint is kept)."""
    return max((metrics for _, metrics in result.best_checkpoints), key=lambda metrics: metrics["val_accuracy"])


def run(config: FinetuneJobConfig) -> dict:
    """Fine-tune as configured; returns the summary (per fold or the selected epoch's test accuracy)."""
    if not ray.is_initialized():
        ray.init()
    data = prepare(config)
    folds = sorted({s.fold for s in data.sources if s.fold is not None})
    if folds:
        results = {}
        for fold in config.folds or folds:
            best = best_metrics(train_once(config, f"{config.name}-fold{fold}", data.classes,
                                           [s for s in data.sources if s.fold != fold], data.fold(fold), None))
            results[f"fold{fold}"] = best["val_accuracy"]
        return {"folds": results, "mean_accuracy": float(np.mean(list(results.values())))}
    if not data.split("train") or not data.split("validation"):
        raise SourceError(f"task {config.task}: needs folds, or train and validation splits")
    best = best_metrics(train_once(config, config.name, data.classes, data.split("train"), data.split("validation"),
                                   data.split("test") or None))
    return {"best_epoch": int(best["epoch"]), "validation_accuracy": best["val_accuracy"],
            "test_accuracy": best.get("test_accuracy")}


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], FinetuneJobConfig, lambda config, args: json.dumps(run(config)),
                       argv, (SourceError,))


if __name__ == "__main__":
    sys.exit(main())
