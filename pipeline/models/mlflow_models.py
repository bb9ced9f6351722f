"""Encoders and classifiers as MLflow models: listed under their run's *Logged models*, loadable with
``mlflow.pytorch.load_model``, and registered under ``tracking.register_as`` (a version per run).

MLflow's PyTorch flavour stores the module pickled (``torch.export`` cannot trace the CPU scan), so
loading it needs this project installed and runs code from the store. The project's own weights-only file travels inside the model
(``extra_files``), and :func:`download_project_file` is how ``pipeline.models.loaders`` reads a ``models:/``
URI: with ``torch.load(weights_only=True)``, never unpickling the module.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

MODELS_SCHEME = "models:/"
EXTRA_FILES = "extra_files"  # where MLflow keeps a model's extra files


def log_torch_model(tracking_uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor, name: str,
                    project_file: Path, register_as: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Log ``model`` as an MLflow model of the run (signature and input example from ``example``), with
    ``project_file`` inside; register it as a new version of ``register_as``. Returns the model's URI."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    with _tracking_of(tracking_uri, client.get_run(run_id).info.experiment_id):
        return _log(client, run_id, model, example, name, project_file, register_as, tags)


@contextlib.contextmanager
def _tracking_of(tracking_uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent API (which ``log_model`` uses) points at this store and experiment inside the
    block only: ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for the whole process
    and every process it starts."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    previous_uri = tracking_state._tracking_uri  # what was set explicitly (None: the environment decides)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _log(client, run_id: str, model: torch.nn.Module, example: torch.Tensor, name: str, project_file: Path,
         register_as: str | None, tags: dict[str, str] | None) -> str:
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(example)
    info = mlflow.pytorch.log_model(
        model, name=name, run_id=run_id, signature=infer_signature(example.numpy(), output.numpy()),
        input_example=example.numpy(), extra_files=[str(project_file)], serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], registered_model_name=register_as)
    if register_as and info.registered_model_version is not None:
        for key, value in {"run_id": run_id, **(tags or {})}.items():
            client.set_model_version_tag(register_as, str(info.registered_model_version), key, value)
    return info.model_uri


def project_file_names(uri: str) -> list[str]:
    """The names of the project's files inside an MLflow model (``ssamba_encoder.pt``, ``classifier.pt``)."""
    import mlflow.artifacts

    listed = mlflow.artifacts.list_artifacts(artifact_uri=posixpath.join(uri.rstrip("/"), EXTRA_FILES))
    return [posixpath.basename(item.path) for item in listed]


def download_project_file(uri: str, file_name: str) -> bytes:
    """The project's file inside an MLflow model (``models:/NAME/VERSION``, ``models:/<model id>``),
    from the tracking server of ``MLFLOW_TRACKING_URI``."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(posixpath.join(uri.rstrip("/"), EXTRA_FILES, file_name), dst_path=folder)
        return Path(path).read_bytes()
