"""MLflow tracking: one run per training run, resumed by name, written from rank 0 only.

The tracking URI is always explicit and absolute: the config's, else ``MLFLOW_TRACKING_URI``, else a
SQLite file under ``outputs/`` (resolved on the driver, so Ray workers, whose working directory
differs, write to the same store). A remote ``mlflow server`` URI (http://...) works unchanged; it
is what multi-node clusters need.

A run's status is decided by the process that drives it (:func:`run_status`): FINISHED when the work
returned, FAILED when it raised (for a Ray Train run: after Ray's restarts were used up), KILLED on
Ctrl-C or SIGTERM. Reopening a run to resume it sets it RUNNING again.

Artifacts go where the store is, never to a worker's working directory (Ray runs workers in its
temporary session folders): every experiment is created with an explicit artifact location,
``tracking.artifact_location`` when set, else ``mlartifacts/`` beside a local SQLite store, else
whatever an ``mlflow server`` proxies to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Experiment, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.data.paths import absolute

RUN_NAME_TAG = "ray_run_name"
MODEL_TRAINING_EXPERIMENT = {"mlflow.experimentKind": "custom_model_development"}
DEFAULT_STORE = Path("outputs") / "mlflow.db"
ARTIFACTS_BESIDE_STORE = "mlartifacts"
_MAX_PARAMS_PER_CALL = 100


class TrackingSetupError(ValueError):
    """A tracking store this job cannot use as configured; the message says how to fix it."""


def resolve_tracking_uri(configured: str | None) -> str:
    """An absolute tracking URI (see the module docstring)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        store = absolute(DEFAULT_STORE)
        store.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{absolute(uri[len('sqlite:///'):])}"
    if "://" not in uri:
        raise ValueError(f"tracking URI {uri!r}: use sqlite:///<path>.db or an http(s):// server "
                         "(MLflow 3 no longer starts a plain folder store)")
    return uri


def is_local_store(tracking_uri: str) -> bool:
    """A store only the machine holding its file can reach (SQLite or a folder)."""
    return tracking_uri.startswith(("sqlite:", "file:"))


def artifact_location(tracking_uri: str, configured: str | None) -> str | None:
    """The artifact root for experiments created by a job: the configured one, else ``mlartifacts/``
    beside a SQLite store (absolute), else ``None`` where the store decides well: an ``mlflow server``
    (its artifact proxy, ``mlflow-artifacts:``) or a folder store (artifacts inside it)."""
    if configured:
        return configured
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACTS_BESIDE_STORE).as_uri()
    if tracking_uri.startswith(("http://", "https://", "file:")):
        return None
    raise TrackingSetupError(f"tracking.artifact_location: needed with the database store {tracking_uri.split(':')[0]}:// "
                             "(e.g. s3://bucket/mlflow); or track through an `mlflow server` (http://...)")


def refuse_local_store_on_cluster(tracking_uri: str, hosts: int) -> None:
    """A SQLite or folder store lives on one machine: runs on other machines would write elsewhere."""
    if hosts > 1 and is_local_store(tracking_uri):
        raise TrackingSetupError(
            f"tracking.tracking_uri: {tracking_uri} is a local store, but the Ray cluster spans {hosts} machines; "
            "run an `mlflow server` reachable from every node and set tracking.tracking_uri (or MLFLOW_TRACKING_URI) "
            "to its http:// address (see cluster/README.md)")


def ensure_experiment(client: MlflowClient, name: str, location: str | None) -> Experiment:
    """The named experiment, created with ``location`` as its artifact root if it does not exist yet,
    as a model-training experiment (MLflow 3's UI otherwise opens it on its GenAI traces view)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        client.create_experiment(name, artifact_location=location, tags=MODEL_TRAINING_EXPERIMENT)
        found = client.get_experiment_by_name(name)
    return found


class RunTracker:
    """The MLflow run of one named training run. Reopens the run with the same name (tag
    ``ray_run_name``) when a run resumes, so one training run is one MLflow run."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, source_tags: dict[str, str] | None = None,
                 system_metrics: bool = False) -> None:
        self.tracking_uri, self.client = tracking_uri, MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found or ensure_experiment(self.client, experiment, artifact_location(tracking_uri, None))).experiment_id
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.{RUN_NAME_TAG} = '{run_name}'",
                                           max_results=1)
        self.resumed = bool(existing)
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        self.set_tags(source_tags or {})  # the latest launch's source, also on resume
        self._monitor = self._system_metrics(tracking_uri) if system_metrics else None

    def _system_metrics(self, tracking_uri: str):
        """MLflow's sampler of CPU, memory, disk, network and (NVIDIA) GPU use, as ``system/*`` metrics."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed, tracking_uri=tracking_uri)
        monitor.start()
        return monitor

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str, system_metrics: bool = False) -> RunTracker:
        """The run another process opened (a worker writing to its driver's run); its status stays as
        is. ``system_metrics`` samples this process's machine (the one that trains) into the run."""
        tracker = cls.__new__(cls)
        tracker.tracking_uri, tracker.client, tracker.run_id, tracker.resumed = tracking_uri, MlflowClient(tracking_uri), run_id, True
        tracker._monitor = tracker._system_metrics(tracking_uri) if system_metrics else None
        return tracker

    def has_params(self) -> bool:
        return bool(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_table(self, table, file_name: str) -> None:
        """A pandas DataFrame as ``{"columns": [...], "data": [...]}`` JSON, replaced on every call
        (MLflow's own ``log_table`` appends to an existing table: a resumed run would repeat rows)."""
        self.log_bytes(table.to_json(orient="split", index=False).encode(), file_name)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_bytes(self, data: bytes, file_name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / file_name
            path.write_bytes(data)
            self.log_file(path, artifact_path)

    def log_model(self, model, example, name: str, project_file: Path, register_as: str | None,
                  tags: dict[str, str]) -> str:
        """``model`` as an MLflow model of this run, registered as ``register_as`` (see ``pipeline.models.mlflow_models``)."""
        from pipeline.models.mlflow_models import log_torch_model

        return log_torch_model(self.tracking_uri, self.run_id, model, example, name, project_file, register_as, tags)

    def source_commit(self) -> str | None:
        """The git commit the run's latest launch came from (the driver's source tag), if known."""
        return self.client.get_run(self.run_id).data.tags.get("mlflow.source.git.commit")

    def stop_system_metrics(self) -> None:
        """Stop sampling system metrics (the training process is done with this run)."""
        if getattr(self, "_monitor", None) is not None:
            self._monitor.finish()
            self._monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        self.stop_system_metrics()
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.from_string(status)))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs (``ray job stop``, ``kill``)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class RunOutcome:
    """How a block that returned ended its run: FINISHED unless the block decides otherwise (a sweep
    whose trials failed returns its summary but ends FAILED)."""

    status: str = "FINISHED"


@contextlib.contextmanager
def run_status(tracker: RunTracker) -> Iterator[RunOutcome]:
    """End ``tracker``'s run by how the block ends: as its :class:`RunOutcome` says when it returns,
    KILLED on Ctrl-C or SIGTERM (the driver then exits non-zero), FAILED on any other exception
    (which propagates). A Tune trial stopped by its scheduler leaves the run to the sweep."""
    outcome = RunOutcome()
    with _sigterm_raises():
        try:
            yield outcome
        except KeyboardInterrupt:
            tracker.finish("KILLED")
            raise
        except SystemExit as exiting:
            if threading.current_thread() is not threading.main_thread():
                # A Tune trial's thread: Tune ends a trial its scheduler stopped (ASHA) with sys.exit(0)
                # at its next report, possibly after the sweep has closed the run. The sweep, which
                # knows how the trial ended, gives the run its status.
                raise
            # Ray Train's own Ctrl-C handler aborts the run, then exits the driver with status 0.
            tracker.finish("KILLED")
            raise KeyboardInterrupt("interrupted while training") from exiting
        except BaseException:
            tracker.finish("FAILED")
            raise
    tracker.finish(outcome.status)
