"""What a job's driver settles about a named run before any training (:func:`named_run`, the start-up
every named job shares): the run's lock, the config the run started with, checked on every relaunch,
Ray, and the run's MLflow side (where its artifacts go, its source).

A named run (pretraining, fine-tuning, a sweep) keeps its config as ``config.json`` beside its
checkpoints, ``<storage_path>/<name>/config.json``. A relaunch under the same name compares its
config with that record before Ray starts: fields that may change when a run resumes (how long it
runs, how often it checkpoints, logs and evaluates, what it runs on) pass; any other change is
refused with the list of changed fields, unless the user accepts them (``--accept-config-changes``),
in which case the MLflow run records them (tag ``config_changes.<n>``, artifact ``config-<n>.json``)
and the record takes the new config. A field added to the schema after the run started is no change
while it has its default: a new field's default keeps the behaviour the run was trained with.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import posixpath
import socket
import subprocess
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Iterator

import pyarrow.fs as pafs
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from pipeline.config import ConfigError, TrackingConfig, flatten, public_dict
from pipeline.data.storage import Location, resolve
from pipeline.runtime import run_lock
from pipeline.runtime.launch import connect_ray
from pipeline.runtime.run_lock import LOCK_FILE
from pipeline.runtime.tracking import (
    RUN_NAME_TAG,
    artifact_location,
    ensure_experiment,
    refuse_local_store_on_cluster,
    resolve_tracking_uri,
)

CONFIG_FILE = "config.json"

# Fields (dotted paths) that may change when a run resumes. A sweep's nested job sections
# (``pretrain.``, ``probe.``, ``finetune.``) follow the same rule.
MAY_CHANGE_ON_RESUME = (
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.figure_every", "epochs", "scaling.*", "resources.*", "max_failures",
    "storage.*", "tracking.system_metrics", "tracking.register_as", "ray.*",
)
_JOB_SECTIONS = ("pretrain", "probe", "finetune")
_ABSENT = "<absent>"


class ConfigChangedError(ConfigError):
    """A relaunch whose config differs from the run's in fields that must not change on resume."""


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.field}: {json.dumps(self.before)} -> {json.dumps(self.after)}"


@dataclass(frozen=True)
class Launch:
    """A launch of a named run: its config as recorded, and the changes the user accepted."""

    config: dict
    accepted: list[Change] = field(default_factory=list)


def plain(config: BaseModel) -> dict:
    """The config as the record stores it (JSON types: tuples become lists), secrets removed."""
    return json.loads(json.dumps(public_dict(config), default=str))


def config_changes(before: dict, after: dict, defaults: dict[str, Any] | None = None) -> list[Change]:
    """Every field (dotted path) whose value differs, added or removed fields included, except fields
    missing from ``before`` that hold their value in ``defaults`` (see :func:`field_defaults`)."""
    old, new, defaults = flatten(before), flatten(after), defaults or {}
    return [Change(key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in sorted(old.keys() | new.keys())
            if old.get(key, _ABSENT) != new.get(key, _ABSENT)
            and not (key not in old and key in defaults and defaults[key] == new[key])]


def field_defaults(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The schema's default of every field of ``config`` (dotted paths, values as the record stores
    them), through its sections; fields without a default are left out."""
    defaults: dict[str, Any] = {}
    for name, schema_field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            defaults.update(field_defaults(value, f"{prefix}{name}."))
        elif not schema_field.is_required():
            default = schema_field.get_default(call_default_factory=True)
            defaults[f"{prefix}{name}"] = json.loads(json.dumps(default, default=str))
    return defaults


def may_change_on_resume(field_path: str) -> bool:
    section, _, rest = field_path.partition(".")
    path = rest if section in _JOB_SECTIONS and rest else field_path
    return any(fnmatch(path, pattern) for pattern in MAY_CHANGE_ON_RESUME)


def refusal(name: str, record_uri: str, changes: list[Change]) -> str | None:
    """The message refusing a relaunch with ``changes``, or ``None`` if every change may happen on resume."""
    refused = [change for change in changes if not may_change_on_resume(change.field)]
    if not refused:
        return None
    allowed = [change.field for change in changes if may_change_on_resume(change.field)]
    return "\n  ".join([
        f"run {name!r} exists with another config ({record_uri}); changed:",
        *map(str, refused),
        *([f"(these may change on resume: {', '.join(allowed)})"] if allowed else []),
        "Relaunch with the run's values, pick a new name, or pass --accept-config-changes to resume with "
        "these changes (recorded on the MLflow run).",
    ])


def _started(run_folder: Location) -> bool:
    """Whether the run got as far as Ray: its folder holds more than the config record (a launch that
    failed before training, e.g. on a wrong data path, leaves nothing to resume and may be fixed)."""
    entries = run_folder.filesystem.get_file_info(pafs.FileSelector(run_folder.path, allow_not_found=True))
    return any(posixpath.basename(entry.path) not in (CONFIG_FILE, LOCK_FILE) for entry in entries)


def check_config(name: str, storage: Location, config: BaseModel, accept_changes: bool = False) -> Launch:
    """Compare ``config`` with the record of a run that started (else write the record); raise
    :class:`ConfigChangedError` naming every changed field unless they may change or are accepted."""
    record = storage.join(name, CONFIG_FILE)
    current = plain(config)
    if not record.exists() or not _started(storage.join(name)):
        record.write_bytes(json.dumps(current, indent=2).encode())
        return Launch(current)
    changes = config_changes(json.loads(record.read_bytes()), current, field_defaults(config))
    message = refusal(name, record.uri, changes)
    if message is not None and not accept_changes:
        raise ConfigChangedError(message)
    if changes:
        record.write_bytes(json.dumps(current, indent=2).encode())
    return Launch(current, [change for change in changes if not may_change_on_resume(change.field)])


# --------------------------------------------------------------------------------------------------
# The MLflow side of a launch
# --------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry
        return None


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's source tags for a run launched here: entry point, user, host and the git commit when
    the driver runs in a repository (``ray job submit --working-dir`` copies have none)."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB", "host": socket.gethostname()}
    for key, value in (("mlflow.user", _user()), ("mlflow.source.git.commit", _git_commit())):
        if value:
            tags[key] = value
    return tags


def _cluster_hosts() -> int:
    import ray

    return len({node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]})


def _named_runs(client: MlflowClient, experiment_id: str, name: str) -> list:
    """The MLflow runs of a named job: the run itself, or its cross-validation folds (``<name>-fold<k>``)."""
    runs = []
    for condition in (f"= '{name}'", f"LIKE '{name}-fold%'"):
        runs += client.search_runs([experiment_id], filter_string=f"tags.{RUN_NAME_TAG} {condition}")
    return runs


def record_accepted_changes(client: MlflowClient, run, launch: Launch) -> int:
    """Tag ``config_changes.<n>`` and artifact ``config-<n>.json`` (the changes and the new config)
    on the run; returns ``n``, the run's config revision."""
    revision = int(run.data.tags.get("config_revision", "0")) + 1
    run_id = run.info.run_id
    client.set_tag(run_id, "config_revision", str(revision))
    client.set_tag(run_id, f"config_changes.{revision}", "; ".join(map(str, launch.accepted))[:5000])
    client.log_dict(run_id, {"revision": revision,
                             "changes": [{"field": c.field, "before": c.before, "after": c.after} for c in launch.accepted],
                             "config": launch.config}, f"config-{revision}.json")
    return revision


@dataclass(frozen=True)
class TrackingSetup:
    """What the driver's tracking set-up tells the run: its source tags (set by the driver) and
    whether rank 0 samples system metrics (on the machine that trains)."""

    source_tags: dict[str, str]
    system_metrics: bool


def prepare_tracking(tracking: TrackingConfig, name: str, entry_point: str, use_gpu: bool,
                   launch: Launch | None = None) -> TrackingSetup:
    """On the driver, once Ray is up: refuse a local store on a cluster of several machines, create
    the experiment with its artifact location, print where the run's artifacts go, record accepted
    config changes. Returns the run's source tags and whether its trainer samples system metrics."""
    uri = resolve_tracking_uri(tracking.tracking_uri)
    refuse_local_store_on_cluster(uri, _cluster_hosts())
    client = MlflowClient(uri)
    wanted = artifact_location(uri, tracking.artifact_location)
    experiment = ensure_experiment(client, tracking.experiment, wanted)
    if wanted is not None and experiment.artifact_location.rstrip("/") != wanted.rstrip("/"):
        print(f"note: experiment {tracking.experiment!r} was created with its artifacts at "
              f"{experiment.artifact_location}, not {wanted}; its runs keep that location "
              "(use another tracking.experiment to change it)", flush=True)
    runs = _named_runs(client, experiment.experiment_id, name)
    for run in runs:
        print(f"MLflow run {run.info.run_name}: artifacts at {run.info.artifact_uri}", flush=True)
        if run.info.status == "RUNNING":  # this launch holds the run's lock: no other launch is running it
            client.set_terminated(run.info.run_id, "KILLED")
            print(f"MLflow run {run.info.run_name} was left RUNNING by a launch that stopped without ending it; "
                  "marked KILLED (this launch resumes it)", flush=True)
    if not runs:
        print(f"MLflow run {name} (new): artifacts under {experiment.artifact_location}/<run id>/artifacts", flush=True)
    if launch is not None and launch.accepted:
        for run in runs:
            revision = record_accepted_changes(client, run, launch)
            print(f"MLflow run {run.info.run_name}: accepted config changes recorded as config-{revision}.json",
                  flush=True)
    metrics = tracking.system_metrics is True or (tracking.system_metrics == "auto" and use_gpu)
    return TrackingSetup(source_tags(entry_point), metrics)


@contextlib.contextmanager
def named_run(config: BaseModel, entry_point: str, use_gpu: bool, accept_changes: bool) -> Iterator[TrackingSetup]:
    """The start of every named job (pretraining, fine-tuning, a sweep), in one order: hold the run's lock
    (a second launch of the name is refused), check the config against the run record (a relaunch whose
    config changed is refused unless accepted), join or start Ray, and prepare MLflow tracking. ``config``
    is a job config with ``name``, ``storage_path``, ``storage``, ``ray`` and ``tracking``."""
    storage = resolve(config.storage_path, config.storage)
    with run_lock.hold(storage.join(config.name), config.name):
        launch = check_config(config.name, storage, config, accept_changes)
        connect_ray(config.ray)
        yield prepare_tracking(config.tracking, config.name, entry_point, use_gpu, launch)
