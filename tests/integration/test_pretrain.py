"""Pretraining on Ray Train with MLflow, on real services: local mode, 2 workers with an injected
failure, a same-name relaunch that resumes, checkpoints in the S3 test server, how runs end (FAILED,
KILLED by Ctrl-C) and the progress lines the command prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import free_ports
from pipeline import pretrain
from pipeline.models import loaders as models
from pipeline.config import PretrainJobConfig, load_config
from pipeline.runtime.tracking import RunTracker
from ssamba import load_checkpoint

pytestmark = pytest.mark.timeout(600)

PRESET = "configs/pretrain/local-tiny.yaml"


def overrides(features: str, tmp_path, *extra: str) -> list[str]:
    return [f"data.features={features}", f"validation.features={features}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.batch_size=4", *extra]


def job(features: str, tmp_path, *extra: str) -> PretrainJobConfig:
    return load_config(PretrainJobConfig, PRESET, overrides(features, tmp_path, *extra))


def command_line(features: str, tmp_path, *extra: str) -> list[str]:
    return ["--config", PRESET, *[arg for override in overrides(features, tmp_path, *extra) for arg in ("--set", override)]]


def run_of(config: PretrainJobConfig):
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{config.name}'")
    assert len(runs) == 1
    return client, runs[0]


def every_artifact(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += every_artifact(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_local_mode_run_tracks_metrics_figure_and_model(pretrain_features, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    config = job(pretrain_features, tmp_path, "name=local-mode", f"storage_path={tmp_path / 'ckpt'}",
                 "scaling.num_workers=0", "train.max_steps=6", "train.eval_every=3", "train.figure_every=3",
                 "train.log_every=2", "tracking.system_metrics=true", "tracking.register_as=tiny-encoder")
    result = pretrain.run(config)
    assert result.metrics["step"] == 6 and "val_masked_accuracy" in result.metrics
    client, run = run_of(config)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "pipeline.pretrain" and run.data.tags["host"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.data.params["model.embed_dim"] == "64" and run.data.params["train.global_batch_size"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 4, 6]
    assert {"lr", "samples_per_s", "tokens_per_s", "nce", "mse", "masked_accuracy", "val_masked_accuracy"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reconstruction")}
    assert artifacts == {"reconstruction/step-00000003.png", "reconstruction/step-00000006.png"}
    model_file = client.download_artifacts(run.info.run_id, "model/ssamba_encoder.pt", str(tmp_path))
    checkpoint = load_checkpoint(model_file)
    assert checkpoint.encoder_config.embed_dim == 64 and checkpoint.metadata["step"] == 6
    checkpoint.build_pretrain_model()
    assert Path(model_file).read_bytes() == Path(pretrain.encoder_uri(config)).read_bytes()  # for fine-tuning

    # Its model card: beside the encoder, in MLflow, and as JSON inside the file, with the run's facts.
    card = json.loads(checkpoint.metadata["model_card"])
    assert card["kind"] == "encoder" and card["run_id"] == run.info.run_id and card["training"]["steps"] == 6
    assert card["data"]["rows"] == 24 and card["architecture"]["embed_dim"] == 64
    assert card["selected_by"]["val_masked_accuracy"] == pytest.approx(run.data.metrics["val_masked_accuracy"])
    page = (tmp_path / "ckpt" / "local-mode" / "MODEL_CARD.md").read_text()
    assert page.startswith("# SSAMBA encoder: local-mode") and run.info.run_id in page
    assert "model/MODEL_CARD.md" in every_artifact(client, run.info.run_id)

    # The encoder as an MLflow model of the run: listed, loadable, registered with its run.
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.name == "encoder" and logged.source_run_id == run.info.run_id
    version = client.get_model_version("tiny-encoder", "1")
    assert version.run_id == run.info.run_id and version.tags["step"] == "6"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.tracking_uri)
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model("models:/tiny-encoder/1")
    fbank = torch.randn(2, 256, 128)
    expected = checkpoint.build_encoder().eval()(fbank)
    torch.testing.assert_close(loaded.eval()(fbank), expected)
    assert models.read_model("models:/tiny-encoder/1") == Path(model_file).read_bytes()  # the weights-only file


def test_failure_without_restarts_leaves_the_run_failed_and_a_relaunch_running_again(pretrain_features, tmp_path):
    settings = ("name=fails", f"storage_path={tmp_path / 'ckpt'}", "scaling.num_workers=1", "scaling.max_failures=0",
                "train.max_steps=3", "validation=null", "train.figure_every=100", "testing.fail_at_step=2")
    with pytest.raises(Exception, match="injected failure"):  # the command exits non-zero
        pretrain.main(command_line(pretrain_features, tmp_path, *settings))
    config = job(pretrain_features, tmp_path, *settings)
    client, run = run_of(config)
    assert run.info.status == "FAILED" and run.info.end_time is not None

    RunTracker(config.tracking.tracking_uri, config.tracking.experiment, config.name)  # as a relaunch opens it
    assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_ctrl_c_leaves_the_run_killed_after_progress_lines(ray_cluster, pretrain_features, tmp_path):
    """``python -m pipeline.pretrain`` prints its compute path and progress; SIGINT ends the run KILLED."""
    settings = ("name=interrupted", f"storage_path={tmp_path / 'ckpt'}", "train.max_steps=10000", "train.log_every=1",
                "validation=null", "train.figure_every=10000", "train.checkpoint_every=10000")
    command = [sys.executable, "-m", "pipeline.pretrain", *command_line(pretrain_features, tmp_path, *settings)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in driver.stdout:
            lines.append(line)
            if "step 3/10000" in line:
                break
        assert driver.poll() is None, "".join(lines[-50:])
        driver.send_signal(signal.SIGINT)
        lines += driver.stdout.readlines()
        assert driver.wait(timeout=120) != 0
    finally:
        if driver.poll() is None:
            driver.kill()
    output = "".join(lines)
    assert "compute: selective_scan: fused CPU (numba)" in output and "world size 1 | global batch 4" in output
    progress = [line for line in lines if "step 2/10000 | loss " in line]
    assert progress and "samples/s | elapsed " in progress[0] and "| ETA " in progress[0], output[-3000:]
    client, run = run_of(job(pretrain_features, tmp_path, *settings))
    assert run.info.status == "KILLED"


def test_remote_mlflow_server_and_gradient_accumulation(pretrain_features, tmp_path, monkeypatch):
    """Tracking through a real `mlflow server` over HTTP on 127.0.0.1 (its artifacts proxied by the
    server), with accumulation of 2 micro-batches; the encoder registered there loads by its
    ``models:/`` URI."""
    port = free_ports(1)[0]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        config = job(pretrain_features, tmp_path, "name=remote", f"storage_path={tmp_path / 'ckpt'}",
                     "scaling.num_workers=0", "train.max_steps=2", "train.grad_accum=2", "train.eval_every=2",
                     f"tracking.tracking_uri={uri}", "tracking.register_as=remote-encoder")
        assert pretrain.run(config).metrics["step"] == 2
        client, run = run_of(config)
        assert run.info.status == "FINISHED" and run.data.params["train.global_batch_size"] == "8"
        assert "model/ssamba_encoder.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        (version,) = client.search_model_versions("name = 'remote-encoder'")
        assert version.run_id == run.info.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        encoder = models.from_pretrained(f"models:/remote-encoder/{version.version}")
        exported = load_checkpoint(tmp_path / "ckpt" / "remote" / "ssamba_encoder.pt").encoder_state()
        for key, value in encoder.state_dict().items():
            torch.testing.assert_close(value, exported[key], rtol=0, atol=0)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_teacher_student_objective_trains_and_exports_its_teacher_with_the_encoder(pretrain_features, tmp_path):
    """The teacher-student preset, with the reconstruction term, on a Train worker: its own metrics, a
    teacher that moved away from the student and travels in the checkpoints and the export (resuming
    loads the whole state, see test_run_faults; the teacher's state dict round trip is a unit test),
    and an encoder that loads like any other."""
    config = load_config(PretrainJobConfig, "configs/pretrain/local-tiny-teacher-student.yaml",
                         overrides(pretrain_features, tmp_path, "name=ts", f"storage_path={tmp_path / 'ckpt'}",
                                   "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                                   "train.log_every=1", "train.batch_size=4", "objective.clones=2",
                                   "objective.reconstruction_weight=1.0"))
    assert pretrain.run(config).metrics["step"] == 4
    saved = torch.load(tmp_path / "ckpt" / "ts" / "step-00000004" / "state.pt", weights_only=True)["model"]
    teacher = {key[len("teacher."):]: value for key, value in saved.items() if key.startswith("teacher.")}
    assert teacher and any(not torch.equal(value, saved["encoder." + key]) for key, value in teacher.items())

    client, run = run_of(config)
    assert run.info.status == "FINISHED"
    assert {"frame_mse", "utterance_mse", "reconstruction_mse", "target_std", "prediction_std", "val_loss",
            "val_frame_mse", "val_reconstruction_mse"} <= set(run.data.metrics)
    assert "masked_accuracy" not in run.data.metrics
    exported = load_checkpoint(pretrain.encoder_uri(config))
    assert exported.metadata["step"] == 4 and exported.encoder_config.embed_dim == 64
    rebuilt = exported.build_pretrain_model()
    assert type(rebuilt).__name__ == "SSAMBATeacherStudentModel"
    for key, value in rebuilt.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher[key], rtol=0, atol=0)
    exported.build_encoder()  # fine-tuning, embed and HEAR load it like any encoder
