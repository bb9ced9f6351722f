"""The launch sequence every command shares, from the command line to a connected Ray.

1. Read the command line (``--config``, ``--set``, ``--print-config``, ``--base-dir`` and the job's
   own flags) and validate the config: a wrong field exits 2 naming it.
2. Check the job's inputs (features, manifests, checkpoints, classifiers) exist: a missing one exits 2
   naming the field and the path, before Ray starts, before any MLflow run is opened or file written.
3. The job runs; it joins or starts Ray through :func:`connect_ray`, which says which cluster it is.
4. The job's report is printed; expected errors print one line and exit 2.

Entry points stay thin: each module's ``main`` hands its config class, its inputs and its job here.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import yaml
from pydantic import BaseModel

from pipeline.config import ConfigError, ExamplesConfig, InputConfig, RayConfig, S3Config, load_config, public_dict
from pipeline.config.fields import describe_fields
from pipeline.data.paths import RelativePathError, base_directory, without_userinfo
from pipeline.models.mlflow_models import MODELS_SCHEME
from pipeline.runtime.console import quiet_libraries
from pipeline.runtime.run_lock import RunLocked

ModelT = TypeVar("ModelT", bound=BaseModel)


class InputUnreachable(ConfigError):
    """The store holding an input does not answer (exit 2 before Ray, naming the store)."""


class MissingInput(ConfigError):
    """A config field names an input that is not there."""


@dataclass(frozen=True)
class Input:
    """An input a job reads: the config field naming it, its URI, and what it must be
    (``features``: a featurize destination; ``path``: a file or folder)."""

    field: str
    uri: str
    kind: str = "path"


def source_inputs(field: str, source: InputConfig | None) -> list[Input]:
    """A manifest must exist; a prefix is checked when it is listed (an empty one is an error there)."""
    return [] if source is None or source.manifest is None else [Input(f"{field}.manifest", source.manifest)]


def examples_inputs(field: str, examples: ExamplesConfig | None) -> list[Input]:
    """Training examples: a featurize destination, or the audio input of the on-the-fly mode."""
    if examples is None:
        return []
    if examples.features is not None:
        return [Input(f"{field}.features", examples.features, "features")]
    return source_inputs(f"{field}.audio", examples.audio)


def optional_input(field: str, uri: str | None) -> list[Input]:
    """A file the job loads when the field is set (a checkpoint, a classifier)."""
    return [Input(field, uri)] if uri else []


def check_inputs(inputs: list[Input], storage: S3Config) -> None:
    """Raise :class:`MissingInput` listing every input that does not exist, or :class:`InputUnreachable`
    naming the stores that do not answer (no Ray, nothing written)."""
    from pipeline.data.storage import resolve

    missing, unreachable = [], []
    for item in inputs:
        if item.uri.startswith(MODELS_SCHEME):  # MLflow resolves it when the job loads it
            continue
        location = resolve(item.uri, storage)
        if item.kind == "features":
            location = location.join("features")
        try:
            present = location.exists()
        except OSError as error:  # the store fails, not the input: say which
            unreachable.append(f"{item.field}: cannot reach {location}: {error}")
            continue
        if not present:
            hint = " (run python -m pipeline.featurize to make it)" if item.kind == "features" else ""
            missing.append(f"{item.field}: {item.uri} does not exist{hint}")
    if unreachable:
        raise InputUnreachable("storage unavailable: " + "\n  ".join(unreachable))
    if missing:
        raise MissingInput("missing input:\n  " + "\n  ".join(missing))


JOIN_TIMEOUT_S = 5.0  # a cluster that does not accept a connection in this time is named, not waited for


class ClusterUnreachable(ConfigError):
    """The Ray cluster a job would join does not answer."""


def _address_origin(settings: RayConfig) -> str:
    if settings.address not in (None, "auto"):
        return "ray.address"
    if os.environ.get("RAY_ADDRESS"):
        return "from RAY_ADDRESS"
    return "the cluster `ray start` last started on this machine"


def check_cluster_answers(address: str, origin: str) -> None:
    """Raise :class:`ClusterUnreachable` within seconds when nothing accepts connections at ``address``
    (Ray itself retries a dead cluster's GCS for minutes, deaf to Ctrl-C)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=JOIN_TIMEOUT_S):
            return
    except (OSError, ValueError) as error:
        raise ClusterUnreachable(
            f"ray.address: the Ray cluster at {address} ({origin}) does not answer ({error}). If it is gone, "
            "clear this machine's record of it with `ray stop --force`, or start a new local instance for this "
            "job with --set ray.address=local") from None


def connect_ray(settings: RayConfig) -> None:
    """Join or start Ray and say which (never join a cluster silently, nor wait on one that is gone). In
    a process that already runs Ray (a sweep trial, a test), that instance is used as it is."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    quiet_libraries()
    if ray.is_initialized():
        return
    existing = canonicalize_bootstrap_address(settings.address)  # None: a new local instance
    if existing is not None and not (settings.address or "").startswith("ray://"):
        check_cluster_answers(existing, _address_origin(settings))
    if existing is None:
        dashboard = start_local_ray(settings.num_cpus)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        print(f"ray: started a local instance with {cpus} CPUs for this job, its dashboard at {dashboard} "
              "(set ray.address to join a cluster)", flush=True)
    else:
        ray.init(address=settings.address)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        nodes = len([node for node in ray.nodes() if node["Alive"]])
        print(f"ray: joined the cluster at {existing} ({nodes} nodes, {cpus} CPUs)", flush=True)


def start_local_ray(num_cpus: int | None, **init_options) -> str:
    """Start a Ray instance on this machine with its dashboard on a free port of 127.0.0.1; return the
    dashboard's URL. Ray Train's placement-group cleaner asks the dashboard's state API whether the
    run's controller still lives, finding it through the environment or the newest cluster this
    machine started. Without a dashboard of its own, or pointed at a cluster that is gone, every
    question hangs or fails (a warning a second, and about 12 s at the end of each Train run), and a
    dashboard of another instance on the default port would answer for the wrong cluster. So the
    dashboard's address is put in the environment before the instance starts: its processes inherit
    it, and so do the workers of every job that later joins it. Ray Train's preemption watcher (an
    actor per run, for cloud nodes that can be reclaimed) is turned off the same way: this machine is
    the whole cluster."""
    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = f"http://127.0.0.1:{port}"
    os.environ.update(RAY_API_SERVER_ADDRESS=dashboard, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **init_options)
    return dashboard


def mlflow_ui_hint(tracking_uri: str, experiment: str) -> str:
    """How to look at the runs: the ``mlflow ui`` of this environment, the URL and the experiment."""
    tracking_uri = without_userinfo(tracking_uri)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = str(mlflow) if mlflow.exists() else "mlflow"
    if tracking_uri.startswith(("http://", "https://")):
        return f"runs: {tracking_uri} (experiment {experiment!r}, the Runs tab)"
    return (f"runs: {command} ui --backend-store-uri {tracking_uri}, then open http://127.0.0.1:5000 and the "
            f"experiment {experiment!r} (the Runs tab)")


def config_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, every default filled in and secrets left out."""
    return yaml.safe_dump(public_dict(config), sort_keys=False, allow_unicode=True).rstrip()


def run_command(
    description: str,
    config_model: type[ModelT],
    job: Callable[[ModelT, argparse.Namespace], str],
    argv: list[str] | None = None,
    expected_errors: tuple[type[Exception], ...] = (),
    inputs: Callable[[ModelT], list[Input]] | None = None,
    overwrite_flag: bool = False,
    accept_changes_flag: bool = False,
) -> int:
    """The shared command line of every entry point (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (in the YAML file, or --set section.field=value; values are YAML):\n"
               + describe_fields(config_model))
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted path), repeatable")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (no credentials) and exit without running")
    parser.add_argument("--base-dir", type=Path, metavar="DIR",
                        help="resolve relative local paths against DIR (default: the current directory); "
                             "under `ray job submit` pass --base-dir \"$PWD\"")
    if overwrite_flag:
        parser.add_argument("--overwrite", action="store_true", help="replace whatever the destination holds")
    if accept_changes_flag:
        parser.add_argument("--accept-config-changes", action="store_true",
                            help="resume a named run although its config changed (recorded on its MLflow run)")
    args = parser.parse_args(argv)
    try:
        with base_directory(args.base_dir):
            config = load_config(config_model, args.config, args.overrides)
            if args.print_config:
                print(config_yaml(config))
                return 0
            if inputs is not None:
                check_inputs(inputs(config), getattr(config, "storage", S3Config()))
            report = job(config, args)
    except (ConfigError, RelativePathError, RunLocked, *expected_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0
