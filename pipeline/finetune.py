"""``python -m pipeline.finetune``: fine-tune or linearly probe an encoder on a labelled task, on Ray Train.

    python -m pipeline.finetune --config configs/finetune/<task>.yaml [--set model.checkpoint=s3://...]

1. The task's layout is read and checked (``pipeline.data.layouts``); its audio goes through the featurize
   stage once (``features``; a re-run reuses the shards). Clips a task lists without audio (AudioSet
   downloads) are skipped and counted in the summary's ``missing_audio``.
2. Splits: tasks with folds (ESC-50) run one training per test fold, named ``<name>-fold<k>``, and
   report the mean of the metric; tasks with splits train on ``train``, select on ``validation`` and
   report ``test`` at the selected epoch (AS-20K has no test split: its eval set is the validation).
3. Each training runs on Ray Train (DDP): the encoder (our checkpoint, an official ``.pth`` or random
   init) moved to the fine-tuning grid, mean or [CLS] pooling, ``LayerNorm → Linear``; Adam with a
   head learning-rate multiplier and per-epoch step decay; one-/multi-hot float targets, in-batch
   mixup (``augment.mixup``) and cross-entropy or binary cross-entropy (``loss``); the task's metric
   every epoch to MLflow (``val_accuracy``/``test_accuracy``, or ``val_mAP`` for AudioSet); the best
   epoch's checkpoint kept by :func:`validation_metric`. Rank 0 prints a line per epoch (train loss,
   the metrics, elapsed time, ETA); each split's MLflow run ends FINISHED, FAILED or KILLED.
4. From the selected epoch's checkpoint the driver logs the run's summary metrics, per-class scores
   and confusion matrix (``pipeline.models.results``) and exports the model as ``classifier.pt`` beside the
   checkpoints and in MLflow (``ssamba.load_classifier``). Several folds nest under a parent MLflow run
   named ``name`` that gets the folds' mean and std.

Mixup mixes batches of finished examples (normalised, augmented log-mel features) with partners from
the same batch, where the official loader mixes waveforms with partners from the whole dataset: the
featurize-once path stores fbanks, not waveforms.
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F

from pipeline.config import (
    AugmentConfig,
    ExamplesConfig,
    FinetuneJobConfig,
    FinetuneOptimConfig,
    flatten,
    public_dict,
)
from pipeline.data import feature_store, featurizer
from pipeline.data.examples import examples_dataset, labelled_rows, training_batches
from pipeline.data.feature_store import STORED_PRECISION
from pipeline.data.layouts import TaskData, read_task
from pipeline.data.sources import AudioSource, SourceError
from pipeline.data.storage import Location, resolve
from pipeline.models import results
from pipeline.models.loaders import CLASSIFIER_FILE, load_encoder_weights
from pipeline.models.model_card import Export, ModelCard, publish
from pipeline.runtime import run_record
from pipeline.runtime.launch import Input, mlflow_ui_hint, optional_input, run_command
from pipeline.runtime.resources import check_cluster
from pipeline.runtime.run_record import TrackingSetup
from pipeline.runtime.tracking import RunTracker, resolve_tracking_uri, run_status
from pipeline.training import faults
from pipeline.training.loop import (
    Clock,
    all_gather_rows,
    announce_compute,
    autocast,
    base_rates,
    effective_precision,
    format_metrics,
    gradient_sync,
    optimizer_step,
    rank0_tracker,
    say,
    seed_worker,
    set_learning_rates,
    unwrap,
)
from pipeline.training.trainer import LoopConfig, TrainWorker, TuneTrial, Worker, load_state, torch_trainer
from ssamba import (
    AudioClassifier,
    ClassifierConfig,
    EncoderConfig,
    FbankConfig,
    FeatureSettings,
    PatchGrid,
    SSAMBAEncoder,
    save_classifier,
)
from ssamba.features import mix_batch, norm_stats
from ssamba.finetune import encoder_on_grid
from ssamba.metrics import accuracy, mean_average_precision

METRICS = {"accuracy": accuracy, "mAP": mean_average_precision}
LOSSES = {"ce": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits}  # both take float (soft) targets


def metric_name(config: FinetuneJobConfig) -> str:
    """The task's metric (docs/model.md#metrics): mAP for multi-label AudioSet, accuracy for the single-label tasks."""
    return "mAP" if config.task == "audioset20k" else "accuracy"


def validation_metric(config: FinetuneJobConfig) -> str:
    """The reported metric (higher is better) that selects the best epoch: ``val_accuracy`` or ``val_mAP``."""
    return f"val_{metric_name(config)}"


def prepare(config: FinetuneJobConfig) -> TaskData:
    """Read the task and featurize its audio (resuming whatever an earlier run wrote)."""
    data = read_task(config.task, config.data_root, config.storage)
    featurizer.featurize_listed(data.sources, config.features, config.storage, FbankConfig().num_mel_bins)
    return data


def build_classifier(config: FinetuneJobConfig, num_classes: int) -> AudioClassifier:
    grid = PatchGrid(num_mel_bins=128, target_length=config.target_length, fstride=config.model.stride,
                     tstride=config.model.stride)
    if config.model.checkpoint:
        encoder_config, state = load_encoder_weights(config.model.checkpoint, config.storage)
        encoder = encoder_on_grid(encoder_config, state, grid)
    else:
        encoder = SSAMBAEncoder(EncoderConfig.from_size(config.model.size, grid=grid))
    return AudioClassifier(encoder, ClassifierConfig(num_classes, config.model.pooling, config.model.freeze_encoder))


def _with_targets(batch: dict[str, np.ndarray], positives: dict[str, list[int]],
                  num_classes: int) -> dict[str, np.ndarray]:
    """Keep the rows of one subset, each with its multi-hot target."""
    keep, target = labelled_rows(batch, positives, num_classes)
    return {"fbank": batch["fbank"][keep], "target": target}


def _examples(config: FinetuneJobConfig, train: bool) -> ExamplesConfig:
    """The examples of a split: augmented and shuffled for training."""
    return ExamplesConfig(features=config.features, target_length=config.target_length, norm=config.norm,
                          augment=config.augment.per_example() if train else AugmentConfig(), shuffle=train)


def _subset(config: FinetuneJobConfig, sources: list[AudioSource], classes: list[str], train: bool) -> ray.data.Dataset:
    """One split's examples with their targets; the training split's are left for :func:`training_batches` to
    finish."""
    index = {name: i for i, name in enumerate(classes)}
    positives = {source.uri: [index[name] for name in source.targets] for source in sources}
    return examples_dataset(_examples(config, train), config.storage, finished=not train).map_batches(
        _with_targets, fn_kwargs={"positives": positives, "num_classes": len(classes)})


@dataclass(frozen=True)
class FinetuneLoop(LoopConfig[FinetuneJobConfig]):
    """What the driver hands the fine-tuning loop, beyond the job: the task's classes and whether
    the split has a test set."""

    classes: list[str]
    has_test: bool


class StepDecay:
    """The rates × ``decay`` every ``decay_every`` epochs once ``decay_start_epoch`` epochs have
    trained at the full rate (epochs count from 1)."""

    def __init__(self, optim: FinetuneOptimConfig) -> None:
        self.optim = optim

    def factor(self, epoch: int) -> float:
        start, every = self.optim.decay_start_epoch, self.optim.decay_every
        decays = 0 if epoch <= start else (epoch - start - 1) // every + 1
        return self.optim.decay**decays


def _build(loop: FinetuneLoop, worker: Worker) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, bool]:
    """Seed, build the classifier and Adam (head rate × multiplier, encoder frozen or not), restore
    the last checkpoint; returns the model, the optimizer, the epochs already trained and whether restored."""
    config = loop.job
    seed_worker(config.seed, worker.rank)
    classifier = build_classifier(config, len(loop.classes))
    head, encoder = list(classifier.mlp_head.parameters()), list(classifier.encoder.parameters())
    model = worker.prepare_model(classifier)
    groups = [{"params": head, "lr": config.optim.lr * config.optim.head_lr_multiplier}]
    if not config.model.freeze_encoder:
        groups.append({"params": encoder, "lr": config.optim.lr})
    optimizer = torch.optim.Adam(groups, weight_decay=config.optim.weight_decay, betas=config.optim.betas)
    state = worker.restored_state()
    if state is None:
        return model, optimizer, 0, False
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, state["epoch"], True


def _train_batches(worker: Worker, config: FinetuneJobConfig):
    """One pass over this worker's share of the training examples, the last batch partial."""
    return training_batches(worker.dataset("train"), _examples(config, train=True), config.shuffle_buffer,
                            config.batch_size, worker.device, drop_last=False)


def _train_epoch(model, optimizer, loop: FinetuneLoop, worker: Worker, epoch: int) -> float:
    """One epoch of mixup batches, ``grad_accum`` micro-batches per optimizer step (a last, shorter
    accumulation steps too); the mean training loss of this worker."""
    config, loss_function = loop.job, LOSSES[loop.job.loss]
    losses, mixing = [], np.random.default_rng([config.seed, worker.rank, epoch])
    precision_context = autocast(worker.device, config.precision)
    for micro, batch in enumerate(_train_batches(worker, config), start=1):
        features, targets = mix_batch(batch["fbank"], batch["target"], config.augment.mixup, mixing)
        with gradient_sync(model, micro % config.grad_accum == 0):
            with precision_context():
                loss = loss_function(model(features).float(), targets)
            (loss / config.grad_accum).backward()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the training loss is {losses[-1]} in epoch {epoch}: training diverged "
                                     "(lower optim.lr)")
        if micro % config.grad_accum == 0:
            optimizer_step(model, optimizer, config.optim.grad_clip)
    if not losses:
        raise ValueError("this worker's share of the training split is empty: use fewer scaling.num_workers")
    if len(losses) % config.grad_accum:
        optimizer_step(model, optimizer, config.optim.grad_clip)
    return float(np.mean(losses))


def _outputs(model, shard, batch_size: int, device, num_classes: int) -> torch.Tensor:
    """``(examples, 2·classes)``: the scores and targets of the whole split, gathered from every worker
    (mAP needs every example's scores, not per-worker partial sums)."""
    model.eval()
    with torch.no_grad():
        rows = [torch.cat([model(batch["fbank"]).float(), batch["target"]], dim=1)
                for batch in shard.iter_torch_batches(batch_size=batch_size, device=device)]
    model.train()
    return all_gather_rows(torch.cat(rows) if rows else torch.empty(0, 2 * num_classes, device=device))


def _scores(model, loop: FinetuneLoop, worker: Worker) -> tuple[dict[str, float], dict[str, dict[str, torch.Tensor]]]:
    """The task's metric on the selection split (``val_``) and, where there is one, the test split;
    and each split's scores and targets (kept with the epoch's checkpoint for the selected epoch's report)."""
    config, metric, classes = loop.job, metric_name(loop.job), len(loop.classes)
    splits_to_score = {"val": "eval", **({"test": "test"} if loop.has_test else {})}
    scores, outputs = {}, {}
    for prefix, name in splits_to_score.items():
        rows = _outputs(model, worker.dataset(name), config.batch_size, worker.device, classes)
        scores[f"{prefix}_{metric}"] = METRICS[metric](rows[:, :classes], rows[:, classes:])
        outputs[prefix] = {"scores": rows[:, :classes].cpu(), "targets": rows[:, classes:].cpu() > 0.5}
    return scores, outputs


def _epoch_state(model, optimizer, epoch: int, classes: list[str], outputs: dict) -> dict:
    """An epoch's checkpoint: what resuming needs, the encoder config (to rebuild the classifier
    without its source checkpoint) and the epoch's scores and targets per split (for the report)."""
    inner = unwrap(model)
    return {"model": inner.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "classes": classes,
            "encoder_config": inner.encoder.config.to_dict(), "outputs": outputs}


def fit(loop: FinetuneLoop, worker: Worker) -> None:
    """The fine-tuning loop, wherever it runs: a Ray Train worker (``pipeline.finetune``) or a Tune
    trial (``pipeline.tune``). Build and restore; then per epoch: set the rates, train, score, log
    (MLflow and one console line) and report the metrics with a checkpoint."""
    config = loop.job
    model, optimizer, trained_epochs, restored = _build(loop, worker)
    rates, schedule = base_rates(optimizer), StepDecay(config.optim)
    tracker = rank0_tracker(loop, worker, lambda: flatten(public_dict(config)))
    if tracker is not None:
        announce_compute(worker.device, effective_precision(worker.device, config.precision), worker.world_size,
                         config.batch_size * config.grad_accum * worker.world_size)
    clock = Clock(trained_epochs, config.epochs)
    for epoch in range(trained_epochs + 1, config.epochs + 1):  # epochs count from 1 everywhere
        faults.before_epoch(config.testing, epoch, restored)
        set_learning_rates(optimizer, rates, schedule.factor(epoch))
        train_loss = _train_epoch(model, optimizer, loop, worker, epoch)
        split_scores, outputs = _scores(model, loop, worker)
        scores = {"train_loss": train_loss, **split_scores}
        if tracker is not None:
            tracker.log_metrics(scores, epoch)
            say(f"epoch {epoch}/{config.epochs} | {format_metrics(scores)} | {clock.timing(epoch)}")
        worker.report({"epoch": epoch, **scores},
                      functools.partial(_epoch_state, model, optimizer, epoch, loop.classes, outputs),
                      f"epoch-{epoch:04d}")


def train_loop(train_loop_config: dict) -> None:
    fit(LoopConfig.of(train_loop_config), TrainWorker())


@dataclass(frozen=True)
class Split:
    """One training: the sources it trains on, selects the best epoch on, and tests that epoch on."""

    suffix: str  # of the run name: "-fold<k>" for a cross-validation fold
    train: list[AudioSource]
    evaluate: list[AudioSource]
    test: list[AudioSource] | None


def splits(config: FinetuneJobConfig, data: TaskData) -> list[Split]:
    """One split per test fold (``folds``, default all) for tasks with folds, else train/validation/test."""
    folds = sorted({s.fold for s in data.sources if s.fold is not None})
    if folds:
        return [Split(f"-fold{fold}", [s for s in data.sources if s.fold != fold], data.fold(fold), None)
                for fold in config.folds or folds]
    if not data.split("train") or not data.split("validation"):
        raise SourceError(f"task {config.task}: needs folds, or train and validation splits")
    return [Split("", data.split("train"), data.split("validation"), data.split("test") or None)]


def _datasets(config: FinetuneJobConfig, classes: list[str], split: Split) -> dict[str, ray.data.Dataset]:
    datasets = {"train": _subset(config, split.train, classes, True), "eval": _subset(config, split.evaluate, classes, False)}
    if split.test:
        datasets["test"] = _subset(config, split.test, classes, False)
    return datasets


def _open_run(config: FinetuneJobConfig, run_name: str, classes: list[str], split: Split,
              parent_run_id: str | None, tracking: TrackingSetup | None) -> tuple[RunTracker, FinetuneLoop]:
    """The split's MLflow run (created, or reopened to resume) and what its loop is handed."""
    tracking = tracking or TrackingSetup({}, False)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    tracker = RunTracker(tracking_uri, config.tracking.experiment, run_name,
                         tags={"task": config.task, "classes": str(len(classes))}, parent_run_id=parent_run_id,
                         source_tags=tracking.source_tags)
    loop = FinetuneLoop(config, tracking_uri, tracker.run_id, tracking.system_metrics, classes, bool(split.test))
    return tracker, loop


def feature_settings(config: FinetuneJobConfig) -> FeatureSettings:
    """How the job turns audio into model input: the featurize defaults :func:`prepare` uses (the
    library's fbank), stored as float16 by the featurize job, cropped/padded and normalised as configured."""
    return FeatureSettings(FbankConfig(), config.target_length, norm_stats(config.norm), stored_precision=STORED_PRECISION)


def storage_root(config: FinetuneJobConfig) -> Location:
    """``storage_path`` as a location: the one place a fine-tuning job resolves its run storage."""
    return resolve(config.storage_path, config.storage)


def classifier_uri(config: FinetuneJobConfig, run_name: str) -> str:
    """Where a split's selected model is exported: beside its checkpoints."""
    return storage_root(config).join(run_name, CLASSIFIER_FILE).uri


def classifier_card(config: FinetuneJobConfig, run_name: str, model: AudioClassifier, classes: list[str], epoch: int,
                    scores: dict[str, float], tracker: RunTracker) -> ModelCard:
    """The facts of a split's selected classifier (see ``pipeline.models.model_card``)."""
    seen = feature_store.recorded_summary(config.features, config.storage)
    return ModelCard(
        kind="classifier", run=run_name, run_id=tracker.run_id, architecture=model.encoder.config.to_dict(),
        parameters=sum(p.numel() for p in model.parameters()),
        objective={"task": config.task, "loss": config.loss, "pooling": config.model.pooling,
                   "freeze_encoder": config.model.freeze_encoder, "encoder": config.model.checkpoint or "random init"},
        data={"features": config.features, **{key: seen[key] for key in ("files", "rows", "hours") if key in seen}},
        training={"epochs": config.epochs, "selected_epoch": epoch, "batch_size": config.batch_size},
        selected_by=scores, fbank=asdict(FbankConfig()), labels=classes, commit=tracker.source_commit())


def export_classifier(config: FinetuneJobConfig, run_name: str, classes: list[str], state: dict, selected: dict,
                      tracker: RunTracker) -> str:
    """Write the selected epoch's model as a classifier file (``ssamba.load_classifier``) beside the
    split's checkpoints, as the MLflow artifact ``model/classifier.pt`` and as an MLflow model (registered
    as ``tracking.register_as``, tagged with the metrics that selected it); returns the file's URI."""
    encoder = SSAMBAEncoder(EncoderConfig.from_dict(state["encoder_config"]))
    model = AudioClassifier(encoder, ClassifierConfig(len(classes), config.model.pooling))
    model.load_state_dict(state["model"])
    scores = {name: float(value) for name, value in selected.items() if name.startswith(("val_", "test_"))}
    card = classifier_card(config, run_name, model, classes, int(state["epoch"]), scores, tracker)
    file = io.BytesIO()
    save_classifier(file, model, classes, feature_settings(config),
                    activation="sigmoid" if config.loss == "bce" else "softmax",
                    multi_label=metric_name(config) == "mAP",
                    metadata={"run": run_name, "task": config.task, "epoch": int(state["epoch"]),
                              "model_card": card.to_json()})
    example = torch.zeros(1, config.target_length, encoder.config.grid.num_mel_bins)
    publish(Export(CLASSIFIER_FILE, file.getvalue(), card, model, example, "classifier",
                   {"run": run_name, "epoch": str(int(state["epoch"])),
                    **{name: f"{value:.6g}" for name, value in scores.items()}}),
            storage_root(config).join(run_name), tracker, config.tracking.register_as)
    uri = classifier_uri(config, run_name)
    tracker.set_tags({"classifier_location": uri})
    return uri


def selected_epoch(result: ray.train.Result, selector: str) -> tuple[ray.train.Checkpoint, dict]:
    """The kept checkpoint and reported metrics of the epoch with the best ``selector`` metric."""
    return max(result.best_checkpoints, key=lambda kept: kept[1][selector])


def train_once(config: FinetuneJobConfig, classes: list[str], split: Split,
               parent_run_id: str | None = None, tracking: TrackingSetup | None = None) -> dict[str, float]:
    """One split on Ray Train, named ``<name><suffix>`` (a relaunch resumes it), then the selected
    epoch's report (``pipeline.models.results``) and exported classifier; returns the selected epoch's
    reported metrics. Its MLflow run ends FINISHED, FAILED or KILLED."""
    run_name = config.name + split.suffix
    check_cluster(config.scaling)
    tracker, loop = _open_run(config, run_name, classes, split, parent_run_id, tracking)
    trainer = torch_trainer(
        train_loop, loop,
        run_name, storage_root(config), config.scaling, _datasets(config, classes, split),
        ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=validation_metric(config),
                                   checkpoint_score_order="max"),
    )
    with run_status(tracker):
        checkpoint, selected = selected_epoch(trainer.fit(), validation_metric(config))
        state = load_state(checkpoint)
        results.log_selected(tracker, metric_name(config), classes, selected, state["outputs"],
                             multi_label=metric_name(config) == "mAP")
        export_classifier(config, run_name, classes, state, selected, tracker)
        return selected


def train_in_trial(config: FinetuneJobConfig, data: TaskData, parent_run_id: str) -> None:
    """One fine-tuning inside the current Tune trial, named ``name`` in MLflow (a fine-tuning sweep)."""
    trial_splits = splits(config, data)
    if len(trial_splits) != 1:
        raise SourceError(f"task {config.task} has {len(trial_splits)} folds: a sweep trial trains one, "
                          "set finetune.folds to one test fold")
    (split,) = trial_splits
    tracker, loop = _open_run(config, config.name, data.classes, split, parent_run_id, None)
    with run_status(tracker):
        fit(loop, TuneTrial(_datasets(config, data.classes, split)))


def _parent_run(config: FinetuneJobConfig, parent_run_id: str | None, tracking: TrackingSetup | None) -> RunTracker:
    """The MLflow run of a multi-fold job, named ``name``, with the job's config; its folds nest below it."""
    tracker = RunTracker(resolve_tracking_uri(config.tracking.tracking_uri), config.tracking.experiment, config.name,
                         tags={"task": config.task}, parent_run_id=parent_run_id,
                         source_tags=(tracking or TrackingSetup({}, False)).source_tags)
    if not tracker.has_params():
        tracker.log_params(flatten(public_dict(config)))
    return tracker


def train_splits(config: FinetuneJobConfig, data: TaskData, parent_run_id: str | None = None,
             tracking: TrackingSetup | None = None) -> dict:
    """Train every split of a prepared task. Several folds run under a parent MLflow run that gets the
    mean and std over the folds of the selected epochs' metrics. The summary names the task's metric:
    per fold, ``mean_<metric>`` and ``std_<metric>``, or the selected epoch's ``validation_<metric>`` and
    ``test_<metric>``; plus ``missing_audio`` per split and ``selected``: the validation score that
    ranks encoders and recipes."""
    metric, selector = metric_name(config), validation_metric(config)
    task_splits = splits(config, data)
    if len(task_splits) == 1:
        chosen = train_once(config, data.classes, task_splits[0], parent_run_id, tracking)
        if task_splits[0].suffix:
            return _folds_summary(config, data, {task_splits[0].suffix: chosen})
        return {"best_epoch": int(chosen["epoch"]), f"validation_{metric}": chosen[selector],
                f"test_{metric}": chosen.get(f"test_{metric}"), "selected": chosen[selector],
                "missing_audio": data.missing_audio}
    parent = _parent_run(config, parent_run_id, tracking)
    with run_status(parent):
        best = {split.suffix: train_once(config, data.classes, split, parent.run_id, tracking) for split in task_splits}
        parent.log_metrics(results.fold_statistics([results.selected_summary(metric, chosen) for chosen in best.values()]), 0)
    return _folds_summary(config, data, best)


def _folds_summary(config: FinetuneJobConfig, data: TaskData, best: dict[str, dict]) -> dict:
    metric, selector = metric_name(config), validation_metric(config)
    folds = {suffix.lstrip("-"): chosen[selector] for suffix, chosen in best.items()}
    values = np.array(list(folds.values()), dtype=np.float64)
    return {"folds": folds, f"mean_{metric}": float(values.mean()), f"std_{metric}": float(values.std()),
            "selected": float(values.mean()), "missing_audio": data.missing_audio}


def run(config: FinetuneJobConfig, accept_config_changes: bool = False) -> dict:
    """Fine-tune as configured (see :func:`train_splits` for the summary). A relaunch whose config changed
    is refused before Ray starts unless the changes are accepted (see ``run_record``)."""
    with run_record.named_run(config, "pipeline.finetune", config.scaling.use_gpu, accept_config_changes) as tracking:
        return train_splits(config, prepare(config), tracking=tracking)


def inputs(config: FinetuneJobConfig) -> list[Input]:
    """What must exist before the job starts: the task's data and the encoder it starts from."""
    return [Input("data_root", config.data_root), *optional_input("model.checkpoint", config.model.checkpoint)]


def report(config: FinetuneJobConfig, summary: dict) -> str:
    """The summary as one JSON line, then where the classifiers and the runs are."""
    names = [config.name + fold for fold in (f"-{name}" for name in summary.get("folds", {}))] or [config.name]
    return "\n".join([
        json.dumps(summary),
        *[f"classifier: {classifier_uri(config, name)}" for name in names],
        mlflow_ui_hint(resolve_tracking_uri(config.tracking.tracking_uri), config.tracking.experiment),
    ])


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], FinetuneJobConfig,
                       lambda config, args: report(config, run(config, args.accept_config_changes)),
                       argv, (SourceError,), inputs=inputs, accept_changes_flag=True)


if __name__ == "__main__":
    from pipeline.finetune import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
