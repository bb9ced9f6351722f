"""What every training job here shares: building the ``TorchTrainer``, what the driver hands a
training loop (:class:`LoopConfig`), and the place the loop runs in — a Ray Train worker or a Ray
Tune trial — behind one protocol (:class:`Worker`).

Checkpoints of Ray Train runs live under ``<storage_path>/<name>`` (local or S3): a run relaunched
with the same name resumes from them, and ``scaling.max_failures`` restarts a failed worker group
from the last one. A Tune trial's checkpoints live with its sweep and are restored with it.
"""

from __future__ import annotations

import posixpath
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Protocol, TypeVar

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import ray.tune
import torch

from pipeline.config import ScalingSection
from pipeline.data.storage import Location
from pipeline.runtime.console import quiet_libraries

STATE_FILE = "state.pt"
_LOOP_KEY = "loop"

JobT = TypeVar("JobT")


@dataclass(frozen=True)
class LoopConfig(Generic[JobT]):
    """What the driver hands every training loop: the validated job config and the MLflow run the
    driver opened for it (the driver, not a worker, decides how the run ends)."""

    job: JobT
    tracking_uri: str
    run_id: str
    system_metrics: bool  # rank 0 samples CPU, memory and GPU use into the run

    def as_train_loop_config(self) -> dict[str, Any]:
        """Ray Train passes a dict to the loop: this config under one key."""
        return {_LOOP_KEY: self}

    @staticmethod
    def of(train_loop_config: dict[str, Any]) -> LoopConfig:
        return train_loop_config[_LOOP_KEY]


class Worker(Protocol):
    """Where a training loop runs: its rank among ``world_size`` workers, its device, its part of
    each dataset, and reports (with checkpoints) to whoever drives it."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def node_id(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def dataset(self, name: str) -> Any: ...

    def report(self, metrics: dict, state: Callable[[], dict] | None, checkpoint_dir_name: str) -> None: ...

    def restored_state(self) -> dict | None: ...


def torch_trainer(
    train_loop: Callable[[dict], None],
    loop: LoopConfig,
    name: str,
    storage: Location,
    scaling: ScalingSection,
    datasets: dict[str, ray.data.Dataset],
    checkpoint_config: ray.train.CheckpointConfig,
    worker_env: dict[str, str] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
    whole: tuple[str, ...] = (),
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer whose datasets are split across the workers, except those named in ``whole``, which
    every worker reads in full (Ray's split makes the shares equal by dropping rows, which a dataset that
    must be scored whole cannot afford). ``callbacks``: Train callbacks, e.g. Tune's ``TuneReportCallback``
    when a sweep trial drives the run.

    A run of exactly one worker splits nothing: its datasets execute in the worker itself. A split
    puts a coordinator actor between each dataset and the workers, which on a laptop costs seconds
    of start-up and CPU per dataset and run, to split the rows one way."""
    alone = scaling.worker_range == (1, 1)
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=loop.as_train_loop_config(),
        scaling_config=ray.train.ScalingConfig(**scaling.ray_scaling()),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path if storage.is_s3 else storage.uri,  # S3: the path goes with its filesystem
            storage_filesystem=storage.filesystem if storage.is_s3 else None,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=checkpoint_config,
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            callbacks=callbacks,
            # Ray Train's INFO lines (every report's repr, every checkpoint) go to its log files only.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if alone else [n for n in datasets if n not in whole]),
    )


def _saved(state: dict, folder: str) -> str:
    torch.save(state, Path(folder) / STATE_FILE)
    return folder


def load_state(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    """The state a loop saved with its report (see :meth:`TrainWorker.report`), if there is a checkpoint."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _older_checkpoints(newest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoints older than ``newest``, newest first (their folder names, a prefix and
    a zero-padded number: Ray Train's ``step-XXXXXXXX`` or ``epoch-XXXX``, a Tune trial's
    ``checkpoint_XXXXXX``, sort in the order they were written)."""
    filesystem, run_folder = newest.filesystem, posixpath.dirname(newest.path.rstrip("/"))
    names = sorted((info.base_name for info in filesystem.get_file_info(pafs.FileSelector(run_folder))
                    if info.type == pafs.FileType.Directory), reverse=True)
    latest = posixpath.basename(newest.path.rstrip("/"))
    prefix = latest.rstrip("0123456789")
    return [ray.train.Checkpoint(posixpath.join(run_folder, name), filesystem)
            for name in names if name.startswith(prefix) and name < latest]


def _where(checkpoint: ray.train.Checkpoint) -> str:
    """The checkpoint's folder as users name it: an object store's path carries its scheme."""
    scheme = checkpoint.filesystem.type_name
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def load_newest_state(checkpoint: ray.train.Checkpoint | None, announce: bool = True) -> dict | None:
    """The state of the run's newest checkpoint that loads. A checkpoint cut short (a killed upload, a
    full disk) is skipped, saying which and why, rather than blocking every relaunch of the run."""
    if checkpoint is None:
        return None
    skipped = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        try:
            state = load_state(candidate)
        except Exception as error:  # torch.load's errors for a damaged file vary (zip, pickle, EOF, OS)
            skipped.append(f"{_where(candidate)}/{STATE_FILE}: {type(error).__name__}: {str(error)[:200]}")
            continue
        if announce and skipped:  # written, not printed: Ray Train's workers print every print twice
            sys.stdout.write(f"resuming from {_where(candidate)}: skipped checkpoints that do not load:\n  "
                             + "\n  ".join(skipped) + "\n")
            sys.stdout.flush()
        return state
    raise RuntimeError("no checkpoint of the run loads:\n  " + "\n  ".join(skipped)
                       + "\nstart over under a new name, or delete the run folder to restart it")


class TrainWorker:
    """A training loop inside a Ray Train worker: DDP across the run's workers, the datasets split
    between them, reports from every rank with rank 0's checkpoint."""

    def __init__(self) -> None:
        quiet_libraries()

    @property
    def rank(self) -> int:
        return ray.train.get_context().get_world_rank()

    @property
    def world_size(self) -> int:
        return ray.train.get_context().get_world_size()

    @property
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @property
    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, state: Callable[[], dict] | None, checkpoint_dir_name: str) -> None:
        """``ray.train.report`` on every rank (it is a barrier); rank 0 passes ``state()`` as the checkpoint."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if state is not None and self.rank == 0:
                checkpoint = ray.train.Checkpoint.from_directory(_saved(state(), folder))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)

    def restored_state(self) -> dict | None:
        """The state saved by :meth:`report` in the run's newest checkpoint that loads, if the run has one."""
        return load_newest_state(ray.train.get_checkpoint(), announce=self.rank == 0)


class TuneTrial:
    """A training loop inside a Ray Tune trial: one process on the trial's resources, whole datasets,
    every report a Tune result (what ASHA decides on) with a checkpoint to restore the trial from."""

    rank = 0
    world_size = 1
    node_id = "trial"

    def __init__(self, datasets: dict[str, ray.data.Dataset]) -> None:
        quiet_libraries()
        self.datasets = datasets

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, state: Callable[[], dict] | None, checkpoint_dir_name: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = ray.tune.Checkpoint.from_directory(_saved(state(), folder)) if state is not None else None
            ray.tune.report(metrics, checkpoint=checkpoint)

    def restored_state(self) -> dict | None:
        """The state of the trial's newest checkpoint that loads (a truncated one is skipped, and named)."""
        return load_newest_state(ray.tune.get_checkpoint())
