"""What every Ray Train job here shares: building the ``TorchTrainer`` and reporting a checkpoint.

Checkpoints live under ``<storage_path>/<name>`` (local or S3): a run relaunched with the same name
resumes from them, and ``scaling.max_failures`` restarts a failed worker group from the last one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import ray.data
import ray.train
import ray.train.torch
import torch

from pipeline.config import ScalingSection
from pipeline.storage import Location

STATE_FILE = "state.pt"


def torch_trainer(
    train_loop: Callable[[dict], None],
    loop_config: dict,
    name: str,
    storage: Location,
    scaling: ScalingSection,
    datasets: dict[str, ray.data.Dataset],
    checkpoint_config: ray.train.CheckpointConfig,
    worker_env: dict[str, str] | None = None,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer whose every dataset is split across the workers."""
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path if storage.is_s3 else storage.uri,  # S3: the path goes with its filesystem
            storage_filesystem=storage.filesystem if storage.is_s3 else None,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=checkpoint_config,
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
    )


def report(metrics: dict, state: Callable[[], dict] | None, checkpoint_dir_name: str) -> None:
    """``ray.train.report`` on every rank (it is a barrier); rank 0 passes ``state()`` as the checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if state is not None and ray.train.get_context().get_world_rank() == 0:
            torch.save(state(), Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)


def restored_state() -> dict | None:
    """The state saved by :func:`report` in the run's last checkpoint, if the run has one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
