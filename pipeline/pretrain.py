"""``python -m pipeline.pretrain``: SSAMBA masked-patch pretraining on Ray Train, tracked in MLflow.

    python -m pipeline.pretrain --config configs/pretrain/<preset>.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m pipeline.pretrain --config configs/pretrain/base.yaml

The run is named by ``name``: its checkpoints live under ``<storage_path>/<name>`` and relaunching
with the same name continues from the last one (step count, optimizer, schedule, RNG state). Inside
a run, ``scaling.max_failures`` lets Ray restart a failed worker group from the last checkpoint.

The training loop below reads top to bottom: build, restore, then for each batch: masked forward,
backward (gradient accumulation with DDP's ``no_sync``), clip, step, and every so often log,
evaluate, draw a reconstruction and checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import PretrainJobConfig, flatten, public_dict, run_command
from pipeline.data import examples_dataset
from pipeline.storage import resolve
from pipeline.tracking import RunTracker, resolve_tracking_uri
from pipeline.trainer import TrainWorker, torch_trainer
from ssamba import EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel, save_checkpoint

ENCODER_FILE = "ssamba_encoder.pt"

# --------------------------------------------------------------------------------------------------
# Model and learning-rate schedule
# --------------------------------------------------------------------------------------------------


def encoder_config(config: PretrainJobConfig) -> EncoderConfig:
    m = config.model
    grid = PatchGrid(m.num_mel_bins, m.target_length, m.patch, m.patch, m.patch, m.patch)
    base = EncoderConfig.from_size(m.size, depth=m.depth, grid=grid, drop_path_rate=m.drop_path_rate,
                                   norm=m.norm, topology=m.topology)
    return base if m.embed_dim is None else EncoderConfig(**{**base.__dict__, "embed_dim": m.embed_dim})


def pretrain_config(config: PretrainJobConfig) -> PretrainConfig:
    return PretrainConfig(mask_patches=config.masking.mask_patches, mask_ratio=config.masking.mask_ratio,
                          two_pass=config.masking.two_pass)


class LearningRate:
    """Linear warm-up, then plateau (×factor after ``patience`` evaluations without a better
    validation accuracy), cosine decay to zero at ``max_steps``, or constant."""

    def __init__(self, config: PretrainJobConfig) -> None:
        self.optim, self.max_steps = config.optim, config.train.max_steps
        self.plateau_scale, self.best, self.bad_evaluations = 1.0, -math.inf, 0

    def at(self, step: int) -> float:
        warmup = min(1.0, step / self.optim.warmup_steps) if self.optim.warmup_steps else 1.0
        if self.optim.schedule == "cosine":
            progress = min(1.0, max(0.0, (step - self.optim.warmup_steps) / max(1, self.max_steps - self.optim.warmup_steps)))
            return self.optim.lr * warmup * 0.5 * (1 + math.cos(math.pi * progress))
        return self.optim.lr * warmup * self.plateau_scale

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


# --------------------------------------------------------------------------------------------------
# Training loop (runs on every Ray Train worker)
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    restored: bool = False


def _unwrap(model: torch.nn.Module) -> SSAMBAPretrainModel:
    return getattr(model, "module", model)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _restore(worker: TrainWorker, model, optimizer, schedule: LearningRate, mask_rng: random.Random) -> Progress:
    state = worker.restored_state()
    if state is None:
        return Progress()
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    mask_rng.setstate(state["mask_rng"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(step=state["step"], epoch=state["epoch"], restored=True)


def _checkpoint_state(model, optimizer, schedule: LearningRate, mask_rng: random.Random, progress: Progress,
                      config: PretrainJobConfig) -> dict:
    return {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "mask_rng": mask_rng.getstate(), "torch_rng": torch.get_rng_state(),
            "step": progress.step, "epoch": progress.epoch, "config": json.dumps(public_dict(config))}


def _evaluate(model, config: PretrainJobConfig, device: torch.device, autocast) -> dict[str, float]:
    """Masked-patch accuracy and MSE at the official validation mask count, with fixed masks."""
    shard = ray.train.get_dataset_shard("val")
    inner = _unwrap(model)
    count = min(config.masking.validation_mask_patches, inner.grid.num_patches - 1)
    rng = random.Random(1234 + ray.train.get_context().get_world_rank())
    inner.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # nce, mse, accuracy (each × clips), clips
    with torch.no_grad():
        for index, batch in enumerate(shard.iter_torch_batches(batch_size=config.train.batch_size, device=device)):
            if config.train.eval_batches is not None and index >= config.train.eval_batches:
                break
            with autocast():
                out = inner(batch["fbank"], rng, num_mask=count)
            clips = batch["fbank"].shape[0]
            for i, value in enumerate((out.nce, out.mse, out.accuracy)):
                sums[i] += float(value) * clips
            sums[3] += clips
    inner.train()
    nce, mse, accuracy, clips = _all_reduce_sum(sums, device)
    clips = max(clips, 1.0)
    return {"val_nce": nce / clips, "val_mse": mse / clips, "val_accuracy": accuracy / clips}


def _log_reconstruction(tracker: RunTracker, model, features: torch.Tensor, step: int) -> None:
    """An MLflow image of an input spectrogram, its mask and the generative head's reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inner = _unwrap(model)
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


def train_loop(loop_config: dict) -> None:
    config: PretrainJobConfig = loop_config["config"]
    worker = TrainWorker()
    rank, world, device = worker.rank, ray.train.get_context().get_world_size(), worker.device
    torch.manual_seed(config.train.seed + rank)
    mask_rng = random.Random(config.train.seed * 1000 + rank)

    model = SSAMBAPretrainModel(SSAMBAEncoder(encoder_config(config)), encoder_config(config).grid, pretrain_config(config))
    model = worker.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay)
    schedule = LearningRate(config)
    progress = _restore(worker, model, optimizer, schedule, mask_rng)
    use_bf16 = device.type == "cuda" and config.train.precision == "bf16"

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    tracker = None
    if rank == 0:
        tracker = RunTracker(loop_config["tracking_uri"], config.tracking.experiment, config.name,
                             tags={"checkpoint_location": loop_config["checkpoint_location"]},
                             parent_run_id=loop_config.get("parent_run_id"))
        if not tracker.resumed:
            tracker.log_params({**flatten(public_dict(config)), "global_batch_size": config.global_batch_size,
                                "world_size": world, "encoder_parameters": sum(p.numel() for p in _unwrap(model).encoder.parameters())})
            tracker.log_dict(public_dict(config), "config.json")
        tracker.set_tags({"resumed_from_step": str(progress.step)} if progress.restored else {})

    def checkpoint_and_report(metrics: dict) -> None:
        worker.report(metrics, lambda: _checkpoint_state(model, optimizer, schedule, mask_rng, progress, config),
                      f"step-{progress.step:08d}")

    train_shard = worker.dataset("train")
    tokens_per_clip = _unwrap(model).grid.num_patches + 1
    accum = config.train.grad_accum
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    while progress.step < config.train.max_steps:
        micro = 0
        for batch in train_shard.iter_torch_batches(batch_size=config.train.batch_size, drop_last=True, device=device,
                                                    prefetch_batches=2,
                                                    local_shuffle_buffer_size=config.data.local_shuffle_buffer):
            micro += 1
            sync = micro % accum == 0
            with (contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()):
                with autocast():
                    out = model(batch["fbank"], mask_rng)
                (out.loss / accum).backward()
            window_samples += batch["fbank"].shape[0] * world
            if not sync:
                continue
            if config.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            lr = schedule.at(progress.step + 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            if config.testing.fail_at_step == progress.step and not progress.restored and rank == world - 1:
                raise RuntimeError(f"injected failure at step {progress.step} (testing.fail_at_step)")

            step = progress.step
            if tracker is not None and (step % config.train.log_every == 0 or step == 1):
                elapsed = time.perf_counter() - window_start
                tracker.log_metrics({"loss": out.loss.item(), "nce": out.nce.item(), "mse": out.mse.item(),
                                     "accuracy": out.accuracy.item(), "lr": lr,
                                     "samples_per_s": window_samples / elapsed,
                                     "tokens_per_s": window_samples * tokens_per_clip / elapsed}, step)
                window_start, window_samples = time.perf_counter(), 0
            metrics = {"step": step, "epoch": progress.epoch, "loss": out.loss.item()}
            if step % config.train.eval_every == 0 or step == config.train.max_steps:
                if config.validation is not None:
                    validation = _evaluate(model, config, device, autocast)
                    schedule.observe(validation["val_accuracy"])
                    metrics.update(validation)
                    if tracker is not None:
                        tracker.log_metrics(validation, step)
            if tracker is not None and (step % config.train.figure_every == 0 or step == config.train.max_steps):
                _log_reconstruction(tracker, model, batch["fbank"], step)
            if step % config.train.checkpoint_every == 0 or step == config.train.max_steps:
                checkpoint_and_report(metrics)
            if step >= config.train.max_steps:
                break
        progress.epoch += 1

    if tracker is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / ENCODER_FILE
            inner = _unwrap(model)
            save_checkpoint(path, inner, inner.encoder.config, inner.config, metadata={"step": progress.step, "run": config.name})
            resolve(encoder_uri(config), config.storage).write_bytes(path.read_bytes())
            tracker.log_file(path, "model")
        tracker.log_dict(inner.encoder.config.to_dict(), "model/encoder_config.json")
        tracker.finish()


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def encoder_uri(config: PretrainJobConfig) -> str:
    """Where a finished run leaves its weights for fine-tuning (``model.checkpoint`` of a finetune job)."""
    return resolve(config.storage_path, config.storage).join(config.name, ENCODER_FILE).uri


def run(config: PretrainJobConfig, callbacks: list[ray.train.UserCallback] | None = None,
        parent_run_id: str | None = None) -> ray.train.Result:
    """Launch (or resume) the named run and wait for it. A sweep trial passes Tune's report callback
    and its parent MLflow run (the run is then nested under the sweep's)."""
    if not ray.is_initialized():
        ray.init()
    storage = resolve(config.storage_path, config.storage)
    datasets = {"train": examples_dataset(config.data, config.storage).select_columns(["fbank"])}
    if config.validation is not None:
        datasets["val"] = examples_dataset(config.validation, config.storage).select_columns(["fbank"])
    trainer = torch_trainer(
        train_loop,
        {"config": config, "tracking_uri": resolve_tracking_uri(config.tracking.tracking_uri),
         "checkpoint_location": storage.join(config.name).uri, "parent_run_id": parent_run_id},
        config.name, storage, config.scaling, datasets,
        ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        # glibc would otherwise fragment the heap with the CPU scan's large temporaries.
        worker_env={"MALLOC_MMAP_THRESHOLD_": str(16 * 1024 * 1024)},
        callbacks=callbacks,
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    def job(config: PretrainJobConfig, args) -> str:
        result = run(config)
        return "\n".join([
            f"pretraining {config.name}: finished at step {result.metrics.get('step')}",
            f"  checkpoints: {resolve(config.storage_path, config.storage).join(config.name)}",
            f"  encoder for fine-tuning: {encoder_uri(config)}",
            f"  compare runs: mlflow ui --backend-store-uri {resolve_tracking_uri(config.tracking.tracking_uri)}",
        ])

    return run_command(__doc__.splitlines()[0], PretrainJobConfig, job, argv)


if __name__ == "__main__":
    sys.exit(main())
