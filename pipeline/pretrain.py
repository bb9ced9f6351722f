"""``python -m pipeline.pretrain``: SSAMBA masked-patch pretraining on Ray Train, tracked in MLflow.

    python -m pipeline.pretrain --config configs/pretrain/<preset>.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m pipeline.pretrain --config configs/pretrain/base.yaml

The run is named by ``name``: its checkpoints live under ``<storage_path>/<name>`` and relaunching
with the same name continues from the last one (step count, optimizer, schedule, RNG state). Inside
a run, ``scaling.max_failures`` lets Ray restart a failed worker group from the last checkpoint.
With ``scaling.num_workers: [min, max]`` the run is elastic: Ray Train restarts the group larger or
smaller as nodes come and go, and each start accumulates as many micro-batches as keep
``train.global_batch_size``.
The run's MLflow status tells how it ended: FINISHED, FAILED (restarts used up) or KILLED (Ctrl-C or
SIGTERM of this command); a relaunch sets it RUNNING again.

Rank 0 prints what runs where at start (operators, device, precision, world size, global batch) and
a progress line every ``train.log_every`` steps: step, mean loss, samples/s, elapsed time and ETA.

The training loop below reads top to bottom: build, restore, then for each batch: masked forward,
backward (gradient accumulation with DDP's ``no_sync``), clip, step, and every so often log,
evaluate, draw a reconstruction and checkpoint.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import ray
import ray.train
import torch

from pipeline.config import ConfigError, PretrainJobConfig, flatten, public_dict
from pipeline.data import feature_store
from pipeline.data.examples import examples_dataset, training_batches
from pipeline.data.reading import StorageUnavailable, stop_on_storage_failure
from pipeline.data.storage import Location, resolve
from pipeline.models.loaders import ENCODER_FILE
from pipeline.models.model_card import Export, ModelCard, publish
from pipeline.runtime import run_record
from pipeline.runtime.launch import Input, examples_inputs, mlflow_ui_hint, run_command
from pipeline.runtime.resources import check_cluster, input_cpus_kept
from pipeline.runtime.tracking import RunTracker, resolve_tracking_uri, run_status
from pipeline.training import faults
from pipeline.training.loop import (
    Clock,
    all_reduce_sum,
    announce_compute,
    autocast,
    base_rates,
    effective_precision,
    format_metrics,
    gradient_sync,
    node_count,
    optimizer_step,
    rank0_tracker,
    say,
    seed_worker,
    set_learning_rates,
    unwrap,
)
from pipeline.training.probing import PROBE_DATASET, ProbeHistory, Prober, ProbeSet, choose_probe_set, probe_dataset
from pipeline.training.trainer import LoopConfig, TrainWorker, Worker, torch_trainer
from ssamba import FbankConfig, SSAMBAEncoder, SSAMBAPretrainModel, SSAMBATeacherStudentModel, save_checkpoint
from ssamba import tokens_per_clip as ssamba_tokens_per_clip

# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------


class LearningRate:
    """Linear warm-up, then plateau (×factor after ``patience`` evaluations without a better
    validation accuracy), cosine decay to zero at ``max_steps``, or constant."""

    def __init__(self, config: PretrainJobConfig) -> None:
        self.optim, self.max_steps = config.optim, config.train.max_steps
        self.plateau_scale, self.best, self.bad_evaluations = 1.0, -math.inf, 0

    def factor(self, step: int) -> float:
        warmup = min(1.0, step / self.optim.warmup_steps) if self.optim.warmup_steps else 1.0
        if self.optim.schedule == "cosine":
            progress = min(1.0, max(0.0, (step - self.optim.warmup_steps) / max(1, self.max_steps - self.optim.warmup_steps)))
            return warmup * 0.5 * (1 + math.cos(math.pi * progress))
        return warmup * self.plateau_scale

    def observe(self, validation_accuracy: float) -> None:
        if self.optim.schedule != "plateau":
            return
        if validation_accuracy > self.best:
            self.best, self.bad_evaluations = validation_accuracy, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations > self.optim.plateau_patience:
            self.plateau_scale *= self.optim.plateau_factor
            self.bad_evaluations = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best, self.bad_evaluations = state["plateau_scale"], state["best"], state["bad_evaluations"]


@dataclass(frozen=True)
class PretrainLoop(LoopConfig[PretrainJobConfig]):
    """What the driver hands the pretraining loop, beyond the job: the probe set's classes."""

    probe_classes: tuple[str, ...] = ()


def accumulation_steps(config: PretrainJobConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on ``world_size`` workers: whatever keeps the global batch
    (the config checked that it divides for every world size the run may have)."""
    return config.train.global_batch_size // (config.train.batch_size * world_size)


# --------------------------------------------------------------------------------------------------
# Training loop (runs on every Ray Train worker)
# --------------------------------------------------------------------------------------------------


@dataclass
class Training:
    """What one worker trains, and what a checkpoint saves and restores."""

    model: torch.nn.Module  # DDP-wrapped on Ray Train workers
    optimizer: torch.optim.Optimizer
    rates: list[float]  # the optimizer's configured rates, scaled by the schedule
    schedule: LearningRate
    mask_rng: random.Random
    step: int = 0
    epoch: int = 0
    restored: bool = False
    validation: dict[str, float] = field(default_factory=dict)  # the latest evaluation's metrics
    probes: ProbeHistory = field(default_factory=ProbeHistory)

    @property
    def inner(self) -> SSAMBAPretrainModel | SSAMBATeacherStudentModel:
        return unwrap(self.model)

    def state(self, config: PretrainJobConfig) -> dict:
        return {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "mask_rng": self.mask_rng.getstate(),
                "torch_rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch,
                "probes": self.probes.state_dict(), "config": json.dumps(public_dict(config))}

    def restore(self, state: dict) -> None:
        self.inner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.mask_rng.setstate(state["mask_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch, self.restored = state["step"], state["epoch"], True
        if "probes" in state:  # checkpoints from before probes existed have none
            self.probes.load_state_dict(state["probes"])


# The validation metrics of each objective (fields of its output), and the prefix of their names.
VALIDATION_METRICS = {"masked_patches": ("val_masked_", ("nce", "mse", "accuracy")),
                      "teacher_student": ("val_", ("loss", "frame_mse", "utterance_mse"))}


def pretrain_model(config: PretrainJobConfig) -> SSAMBAPretrainModel | SSAMBATeacherStudentModel:
    """The encoder with the configured objective around it."""
    encoder = config.model.encoder_config()
    if config.objective.teacher_student:
        return SSAMBATeacherStudentModel(SSAMBAEncoder(encoder), encoder.grid, config.objective.teacher_student_config())
    return SSAMBAPretrainModel(SSAMBAEncoder(encoder), encoder.grid, config.masking.pretrain_config())


def tokens_per_clip(config: PretrainJobConfig, num_patches: int) -> int:
    """Tokens the encoder processes per clip per step (for ``tokens_per_s``)."""
    if config.objective.teacher_student:
        return ssamba_tokens_per_clip(config.objective.teacher_student_config(), num_patches).total
    return num_patches + 1


def step_metrics(out) -> dict[str, float]:
    """Every scalar the objective's output holds (``accuracy`` logged as ``masked_accuracy``; a term the
    config leaves out is ``None`` and not logged)."""
    return {"masked_accuracy" if f.name == "accuracy" else f.name: getattr(out, f.name).item() for f in fields(out)
            if getattr(out, f.name) is not None}


def validation_score(config: PretrainJobConfig, metrics: dict[str, float]) -> float:
    """What the plateau schedule follows (higher is better)."""
    return -metrics["val_loss"] if config.objective.teacher_student else metrics["val_masked_accuracy"]


def build(config: PretrainJobConfig, worker: Worker) -> Training:
    """Seed the worker, build model and optimizer, and restore the run's last checkpoint if any."""
    seed_worker(config.train.seed, worker.rank)
    mask_rng = random.Random(config.train.seed * 1000 + worker.rank)
    model = worker.prepare_model(pretrain_model(config))
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]  # not an EMA teacher
    optimizer = torch.optim.AdamW(trained, lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay)
    training = Training(model, optimizer, base_rates(optimizer), LearningRate(config), mask_rng)
    state = worker.restored_state()
    if state is not None:
        training.restore(state)
    return training


def _evaluate(training: Training, config: PretrainJobConfig, worker: Worker, autocast) -> dict[str, float]:
    """The objective on the validation clips with fixed masks: masked-patch InfoNCE, MSE and accuracy
    at the official validation mask count (``val_masked_*``), or the teacher-student losses (``val_*``)."""
    inner = training.inner
    prefix, names = VALIDATION_METRICS[config.objective.kind]
    # From the config, not from the outputs: every worker must sum the same list, batches or none.
    if config.objective.teacher_student and config.objective.reconstruction_weight > 0:
        names = (*names, "reconstruction_mse")
    masking = {} if config.objective.teacher_student else {
        "num_mask": min(config.masking.validation_mask_patches, inner.grid.num_patches - 1)}
    rng = random.Random(1234 + worker.rank)
    inner.eval()
    sums = [0.0] * (len(names) + 1)  # each metric × clips, then the clips
    with torch.no_grad():
        batches = worker.dataset("val").iter_torch_batches(batch_size=config.train.batch_size, device=worker.device)
        for index, batch in enumerate(batches):
            if config.train.eval_batches is not None and index >= config.train.eval_batches:
                break
            with autocast():
                out = inner(batch["fbank"], rng, **masking)
            clips = batch["fbank"].shape[0]
            for i, name in enumerate(names):
                sums[i] += float(getattr(out, name)) * clips
            sums[-1] += clips
    inner.train()
    *totals, clips = all_reduce_sum(sums, worker.device)
    return {prefix + name: total / max(clips, 1.0) for name, total in zip(names, totals)}


def _log_reconstruction(tracker: RunTracker, training: Training, features: torch.Tensor, step: int) -> None:
    """An MLflow image of an input spectrogram, its mask and the generative head's reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inner = training.inner
    inner.eval()
    reconstruction, mask = inner.reconstruct(features[:1].float(), random.Random(step))
    inner.train()
    figure, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    panels = (("input (normalised fbank)", features[0]), ("mask", mask[0]), ("reconstruction", reconstruction[0]))
    for axis, (title, image) in zip(axes, panels):
        axis.imshow(image.float().cpu().T.numpy(), origin="lower", aspect="auto", interpolation="nearest")
        axis.set_title(title)
        axis.set_ylabel("mel bin")
    axes[-1].set_xlabel("frame")
    figure.suptitle(f"step {step}")
    figure.tight_layout()
    tracker.log_figure(figure, f"reconstruction/step-{step:08d}.png")
    plt.close(figure)


class Interval:
    """Rank 0's view of the steps since the last log line: samples seen by all workers, mean loss."""

    def __init__(self) -> None:
        self.began, self.samples, self.loss_sum, self.micro_batches = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss.detach()  # a tensor: no device sync until the log line
        self.samples += samples
        self.micro_batches += 1

    def rates(self, tokens_per_clip: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.began
        return {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.samples * tokens_per_clip / elapsed}

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, self.micro_batches)


def _log_step(tracker: RunTracker, training: Training, out, interval: Interval, lr: float, clock: Clock,
              config: PretrainJobConfig, scale: dict[str, int]) -> None:
    """The step's metrics (with the scale it ran at) to MLflow and one progress line to the console."""
    rates = interval.rates(tokens_per_clip(config, training.inner.grid.num_patches))
    tracker.log_metrics({**step_metrics(out), "lr": lr, **rates, **scale}, training.step)
    say(f"step {training.step}/{config.train.max_steps} | loss {interval.mean_loss():.4f} | "
        f"{rates['samples_per_s']:.1f} samples/s{_latest_probe(config, training)} | {clock.timing(training.step)}")


def _latest_probe(config: PretrainJobConfig, training: Training) -> str:
    """`` | probe_knn_accuracy 0.8125`` for the progress line: the first probe metric's latest score."""
    if config.probe is None or not training.probes.latest:
        return ""
    name = config.probe.metrics[0]
    return f" | {name} {training.probes.latest[name]:.4f}"


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _probe(training: Training, config: PretrainJobConfig, prober: Prober, worker: Worker, autocast,
           tracker: RunTracker | None) -> None:
    """Probe the current encoder (every worker), keep the best step's model for ``train.select_by``, log
    the scores, the best so far and the probe's wall time (``probe_seconds``) to MLflow and print them
    (rank 0)."""
    started = time.perf_counter()
    scores = prober.scores(training.inner.encoder, autocast)
    selecting = worker.rank == 0 and config.train.select_by != "last"  # rank 0 saves, and exports, the kept model
    training.probes.observe(scores, training.step, config.train.select_by,
                            (lambda: _cpu_copy(training.inner)) if selecting else None)
    if tracker is None:
        return
    seconds = time.perf_counter() - started
    best = {name: value for name, value in training.probes.metrics().items() if name.startswith("best_")}
    tracker.log_metrics({**scores, **{name: value for name, value in best.items() if not name.endswith("_step")},
                         "probe_seconds": seconds}, training.step)
    leading = config.probe.metrics[0]
    value, step = training.probes.best[leading]
    say(f"probe at step {training.step}: {format_metrics(scores)} | best {leading} {value:.4f} at step {step} | "
        f"{seconds:.1f} s")


@dataclass(frozen=True)
class Exported:
    """The model a run exports, the step it comes from and why it was chosen."""

    model: SSAMBAPretrainModel | SSAMBATeacherStudentModel
    step: int
    selected_by: dict[str, Any]


def exported_model(training: Training, config: PretrainJobConfig) -> Exported:
    """The last step's model, or with ``train.select_by`` the model kept at that probe metric's best step."""
    select_by, probes = config.train.select_by, training.probes
    if select_by == "last" or probes.selected_state is None:
        return Exported(training.inner, training.step, {"chosen": f"the last step ({training.step}): train.select_by "
                                                        "is last", **training.validation, **probes.latest})
    model = pretrain_model(config)
    model.load_state_dict(probes.selected_state)
    value, step = probes.best[select_by]
    return Exported(model, step, {"chosen": f"step {step} of {training.step}: the best {select_by} of the probes "
                                  f"every {config.probe.every} steps (train.select_by)", select_by: value})


def encoder_card(tracker: RunTracker, exported: Exported, training: Training, config: PretrainJobConfig) -> ModelCard:
    """The facts of a finished run's encoder (see ``pipeline.models.model_card``)."""
    encoder = exported.model.encoder
    seen = feature_store.recorded_summary(config.data.features, config.storage) if config.data.features else {}
    return ModelCard(
        kind="encoder", run=config.name, run_id=tracker.run_id, architecture=encoder.config.to_dict(),
        parameters=sum(p.numel() for p in encoder.parameters()), objective=exported.model.config.to_dict(),
        data={"features": config.data.features or "featurized on the fly",
              **{key: seen[key] for key in ("files", "rows", "hours") if key in seen}},
        training={"steps": training.step, "exported_step": exported.step,
                  "global_batch_size": config.train.global_batch_size},
        selected_by=exported.selected_by, fbank=asdict(FbankConfig(num_mel_bins=encoder.config.grid.num_mel_bins)),
        commit=tracker.source_commit())


def _export_encoder(tracker: RunTracker, training: Training, config: PretrainJobConfig) -> None:
    """The run's encoder (:func:`exported_model`), where fine-tuning looks for it (:func:`encoder_uri`), as a
    run artifact and as an MLflow model (registered as ``tracking.register_as``), with its model card."""
    exported = exported_model(training, config)
    inner = exported.model
    grid = inner.encoder.config.grid
    card = encoder_card(tracker, exported, training, config)
    file = io.BytesIO()
    save_checkpoint(file, inner, inner.encoder.config, inner.config,
                    metadata={"step": exported.step, "run": config.name, "model_card": card.to_json()})
    example = torch.zeros(1, grid.target_length, grid.num_mel_bins)
    publish(Export(ENCODER_FILE, file.getvalue(), card, copy.deepcopy(inner.encoder).cpu(), example, "encoder",
                   {"step": str(exported.step), "run": config.name}), run_folder(config), tracker,
            config.tracking.register_as)
    tracker.log_dict(inner.encoder.config.to_dict(), "model/encoder_config.json")


def train_loop(train_loop_config: dict) -> None:
    """Pretraining on one Ray Train worker: build and restore; then per micro-batch a masked forward
    and backward (DDP's ``no_sync`` until the last of ``grad_accum``); per optimizer step clip, step
    and, at their cadences, log, evaluate, draw a reconstruction and checkpoint; export at the end."""
    loop: PretrainLoop = LoopConfig.of(train_loop_config)
    config, worker = loop.job, TrainWorker()
    max_steps, cadence = config.train.max_steps, config.train
    training = build(config, worker)
    model, optimizer = training.model, training.optimizer
    accum = accumulation_steps(config, worker.world_size)
    # What may change when the run resizes or restarts; the global batch never does (a param).
    scale = {"world_size": worker.world_size, "nodes": node_count(worker), "grad_accum": accum}
    precision = effective_precision(worker.device, config.train.precision)
    autocast_context = autocast(worker.device, config.train.precision)
    prober = Prober(config.probe, worker, len(loop.probe_classes)) if config.probe is not None else None

    tracker = rank0_tracker(loop, worker, lambda: {
        **flatten(public_dict(config)), "encoder_parameters": sum(p.numel() for p in training.inner.encoder.parameters())},
        documents={"config.json": public_dict(config)})
    if tracker is not None:
        tracker.set_tags({"resumed_from_step": str(training.step)} if training.restored else {})
        announce_compute(worker.device, precision, worker.world_size, config.train.global_batch_size)

    def due(every: int) -> bool:
        return training.step % every == 0 or training.step == max_steps

    clock, interval = Clock(training.step, max_steps), Interval()
    model.train()
    while training.step < max_steps:
        micro = 0
        batches = training_batches(worker.dataset("train"), config.data, config.data.local_shuffle_buffer,
                                   config.train.batch_size, worker.device)
        for micro, batch in enumerate(batches, start=1):
            # Forward and backward; gradients are averaged across workers on the last micro-batch only.
            sync = micro % accum == 0
            with gradient_sync(model, sync):
                with autocast_context():
                    out = model(batch["fbank"], training.mask_rng)
                (out.loss / accum).backward()
            interval.add(out.loss, batch["fbank"].shape[0] * worker.world_size)
            if not sync:
                continue

            # Optimizer step.
            set_learning_rates(optimizer, training.rates, training.schedule.factor(training.step + 1))
            lr = optimizer.param_groups[0]["lr"]
            optimizer_step(model, optimizer, config.optim.grad_clip)
            if config.objective.teacher_student:  # the teacher follows the student, on every rank alike
                training.inner.update_teacher(training.step)
            training.step += 1

            # Cadences: log, evaluate, figure, checkpoint.
            if tracker is not None and (training.step % cadence.log_every == 0 or training.step == 1):
                _log_step(tracker, training, out, interval, lr, clock, config, scale)
                interval = Interval()
            metrics = {"step": training.step, "epoch": training.epoch, "loss": out.loss.item()}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"the loss is {metrics['loss']} at step {training.step}: training diverged "
                                         "(lower optim.lr, or set optim.grad_clip)")
            if config.validation is not None and due(cadence.eval_every):
                validation = training.validation = _evaluate(training, config, worker, autocast_context)
                training.schedule.observe(validation_score(config, validation))
                metrics.update(validation)
                if tracker is not None:
                    tracker.log_metrics(validation, training.step)
            probed = config.probe is not None and due(config.probe.every)
            if probed:
                _probe(training, config, prober, worker, autocast_context, tracker)
            metrics.update(training.probes.metrics())
            if tracker is not None and due(cadence.figure_every) and hasattr(training.inner, "reconstruct"):
                _log_reconstruction(tracker, training, batch["fbank"], training.step)
            # Reports reach Ray Train (and a sweep's Tune); a probe's scores are reported as they come.
            if due(cadence.checkpoint_every) or probed:
                worker.report(metrics, (lambda: training.state(config)) if due(cadence.checkpoint_every) else None,
                              f"step-{training.step:08d}")
            faults.after_step(config.testing, training.step, training.restored, worker)
            if training.step >= max_steps:
                break
        if micro == 0:  # an epoch without one full batch would repeat forever
            raise ValueError(f"train.batch_size {config.train.batch_size}: this worker's share of the training "
                             "data holds no full batch")
        training.epoch += 1

    if tracker is not None:
        _export_encoder(tracker, training, config)
        tracker.stop_system_metrics()


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def storage_root(config: PretrainJobConfig) -> Location:
    """``storage_path`` as a location: the one place a pretraining job resolves its storage."""
    return resolve(config.storage_path, config.storage)


def run_folder(config: PretrainJobConfig) -> Location:
    """The run's folder: checkpoints, run record, lock, the exported encoder and its card."""
    return storage_root(config).join(config.name)


def encoder_uri(config: PretrainJobConfig) -> str:
    """Where a finished run leaves its weights for fine-tuning (``model.checkpoint`` of a finetune job)."""
    return run_folder(config).join(ENCODER_FILE).uri


def check_batch_fits(config: PretrainJobConfig) -> None:
    """Refuse a batch larger than a worker's share of the training clips (counted by the featurize
    run that made them), before Ray starts: every epoch would end before its first batch."""
    if config.data.features is None:
        return
    rows = feature_store.recorded_summary(config.data.features, config.storage).get("rows")
    workers = config.world_sizes[-1]
    if rows is not None and rows < config.train.batch_size * workers:
        raise ConfigError(f"train.batch_size: {config.train.batch_size} per worker x {workers} workers is more than "
                          f"the {rows} training clips in data.features: lower train.batch_size")


def run(config: PretrainJobConfig, callbacks: list[ray.train.UserCallback] | None = None,
        parent_run_id: str | None = None, accept_config_changes: bool = False) -> ray.train.Result:
    """Launch (or resume) the named run and wait for it; its MLflow run ends FINISHED, FAILED (Ray's
    restarts used up) or KILLED (Ctrl-C, SIGTERM). A sweep trial passes Tune's report callback and
    its parent MLflow run (the run is then nested under the sweep's). A relaunch whose config changed
    is refused before Ray starts unless the changes are accepted (see ``run_record``)."""
    check_batch_fits(config)
    probe_set = choose_probe_set(config.probe, config.storage) if config.probe is not None else None
    with run_record.named_run(config, "pipeline.pretrain", config.scaling.use_gpu, accept_config_changes) as tracking:
        check_cluster(config.scaling)
        return _launch(config, storage_root(config), callbacks, parent_run_id, tracking, probe_set)


def _launch(config: PretrainJobConfig, storage: Location, callbacks: list[ray.train.UserCallback] | None,
            parent_run_id: str | None, tracking: run_record.TrackingSetup, probe_set: ProbeSet | None) -> ray.train.Result:
    datasets = {"train": examples_dataset(config.data, config.storage, columns=["fbank"], finished=False)}
    if config.validation is not None:
        datasets["val"] = examples_dataset(config.validation, config.storage, columns=["fbank"])
    if probe_set is not None:
        datasets[PROBE_DATASET] = probe_dataset(config.probe, probe_set, config.data, config.storage,
                                                config.model.num_mel_bins)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    tracker = RunTracker(tracking_uri, config.tracking.experiment, config.name,
                         tags={"checkpoint_location": storage.join(config.name).uri}, parent_run_id=parent_run_id,
                         source_tags=tracking.source_tags)
    trainer = torch_trainer(
        train_loop, PretrainLoop(config, tracking_uri, tracker.run_id, tracking.system_metrics,
                                 probe_set.classes if probe_set is not None else ()),
        config.name, storage, config.scaling, datasets,
        ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        # glibc would otherwise fragment the heap with the CPU scan's large temporaries.
        worker_env={"MALLOC_MMAP_THRESHOLD_": str(16 * 1024 * 1024)},
        callbacks=callbacks,
        whole=(PROBE_DATASET,),
    )
    with run_status(tracker), input_cpus_kept(config.scaling, config.name):
        with stop_on_storage_failure("run it again once the store is back: it resumes from its last checkpoint"):
            return trainer.fit()


def prepare_probe(config: PretrainJobConfig) -> None:
    """Choose and featurize the probe set ahead of the runs that probe it (a sweep, before its trials)."""
    probe_dataset(config.probe, choose_probe_set(config.probe, config.storage), config.data, config.storage,
                  config.model.num_mel_bins)


def inputs(config: PretrainJobConfig) -> list[Input]:
    """What must exist before the run starts: its training and validation examples, the probe's dataset."""
    probe = [Input("probe.data_root", config.probe.data_root)] if config.probe is not None else []
    return examples_inputs("data", config.data) + examples_inputs("validation", config.validation) + probe


def summary(config: PretrainJobConfig, result: ray.train.Result) -> str:
    """What a finished run left, and where."""
    metrics = result.metrics or {}
    lines = [f"pretraining {config.name}: finished at step {metrics.get('step')}"]
    if "val_masked_accuracy" in metrics:
        lines.append(f"  val_masked_accuracy: {metrics['val_masked_accuracy']:.4f}")
    for name in config.probe.metrics if config.probe is not None else []:
        if f"best_{name}" in metrics:
            lines.append(f"  {name}: {metrics[name]:.4f} at the end, best {metrics[f'best_{name}']:.4f} at step "
                         f"{int(metrics[f'best_{name}_step'])}")
    if config.train.select_by != "last":
        lines.append(f"  exported encoder: the step with the best {config.train.select_by}")
    return "\n".join([
        *lines,
        f"  checkpoints: {run_folder(config)}",
        f"  encoder for fine-tuning: {encoder_uri(config)}",
        "  " + mlflow_ui_hint(resolve_tracking_uri(config.tracking.tracking_uri), config.tracking.experiment),
    ])


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], PretrainJobConfig,
                       lambda config, args: summary(config, run(config, accept_config_changes=args.accept_config_changes)),
                       argv, (StorageUnavailable,), inputs=inputs, accept_changes_flag=True)


if __name__ == "__main__":
    from pipeline.pretrain import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
