"""Fine-tuning and linear probing end to end on generated ESC-50, Speech Commands and AudioSet layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from mlflow.tracking import MlflowClient

from pipeline import finetune
from pipeline.config import ConfigError, ExamplesConfig, FinetuneJobConfig, load_config
from pipeline.data.examples import to_examples
from pipeline.data.sources import SourceError
from pipeline.data.layouts import read_task
from ssamba import AudioClassifier, load_classifier
from support.task_layouts import audioset, esc50, speech_commands

pytestmark = pytest.mark.timeout(600)


def job(tmp_path, encoder: str, *overrides: str) -> FinetuneJobConfig:
    return load_config(FinetuneJobConfig, None, [
        "name=ft", f"storage_path={tmp_path / 'ckpt'}", f"features={tmp_path / 'features'}",
        f"model.checkpoint={encoder}", "target_length=64", "batch_size=4", "epochs=2",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def artifacts(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder or None)}


def selected_model(config: FinetuneJobConfig, folder, classes: list[str], epoch: int) -> AudioClassifier:
    """The model as training left it at the selected epoch: its kept checkpoint, rebuilt the way training
    built it. Ray Train keeps the best epoch's checkpoint and, to resume from, the latest one."""
    kept = {p.name for p in folder.iterdir() if p.name.startswith("epoch-")}
    assert f"epoch-{epoch:04d}" in kept and kept <= {f"epoch-{epoch:04d}", f"epoch-{config.epochs:04d}"}
    model = finetune.build_classifier(config, len(classes))
    model.load_state_dict(torch.load(folder / f"epoch-{epoch:04d}" / "state.pt", weights_only=True)["model"])
    return model.eval()


def test_linear_probe_on_esc50_folds(ray_cluster, small_encoder, tmp_path, monkeypatch):
    root = esc50(tmp_path / "esc50")
    config = job(tmp_path, small_encoder, "task=esc50", f"data_root={root}", "folds=[1, 2]",
                 "model.freeze_encoder=true", "optim.lr=0.01", "tracking.register_as=esc50-probe")
    summary = finetune.run(config)
    assert set(summary["folds"]) == {"fold1", "fold2"} and 0.0 <= summary["mean_accuracy"] <= 1.0

    # MLflow: a parent run with the folds' mean and std; per fold the selected epoch's scores.
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("ssamba-finetune")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'ft'")
    folds = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags["ray_run_name"] for run in folds) == ["ft-fold1", "ft-fold2"]
    best = [run.data.metrics["best_val_accuracy"] for run in folds]
    assert sorted(best) == sorted(summary["folds"].values())
    assert parent.data.metrics["best_val_accuracy_mean"] == pytest.approx(np.mean(best))
    assert parent.data.metrics["best_val_accuracy_std"] == pytest.approx(np.std(best))
    assert parent.info.status == "FINISHED" and parent.data.params["model.freeze_encoder"] == "True"
    (run,) = [run for run in folds if run.data.tags["ray_run_name"] == "ft-fold1"]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]  # epochs count from 1
    assert run.data.metrics["best_val_accuracy"] == max(m.value for m in history)
    assert {"per_class_val.json", "confusion_val.png", "model"} <= artifacts(client, run.info.run_id)
    assert artifacts(client, run.info.run_id, "model") == {"model/classifier.pt", "model/MODEL_CARD.md"}

    # The exported classifier predicts what the selected model does, from the audio alone.
    data = read_task("esc50", str(root), config.storage)
    classifier = load_classifier(tmp_path / "ckpt" / "ft-fold1" / "classifier.pt")
    assert classifier.classes == data.classes and not classifier.multi_label
    card = json.loads(classifier.metadata["model_card"])
    assert card["labels"] == data.classes and card["run_id"] == run.info.run_id
    assert card["selected_by"]["val_accuracy"] == pytest.approx(run.data.metrics["best_val_accuracy"])
    assert (tmp_path / "ckpt" / "ft-fold1" / "MODEL_CARD.md").read_text().startswith("# SSAMBA classifier: ft-fold1")
    assert run.data.tags["classifier_location"] == str(tmp_path / "ckpt" / "ft-fold1" / "classifier.pt")
    model = selected_model(config, tmp_path / "ckpt" / "ft-fold1", data.classes, classifier.metadata["epoch"])
    stored = pq.read_table(tmp_path / "features" / "features").to_pydict()
    examples = to_examples(stored, ExamplesConfig(features=str(tmp_path / "features"), target_length=64, norm=config.norm))
    trained = dict(zip(examples["uri"], examples["fbank"]))
    correct = 0
    for source in data.fold(1):
        waveform, rate = soundfile.read(source.uri, dtype="float32")
        probabilities = classifier.predict(torch.from_numpy(waveform), rate)
        with torch.no_grad():
            expected = model(torch.from_numpy(trained[source.uri])[None])[0].softmax(dim=-1)
        torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-5)
        correct += classifier.classes[int(probabilities.argmax())] == source.targets[0]
    assert correct / len(data.fold(1)) == pytest.approx(summary["folds"]["fold1"])

    # Each fold's classifier is an MLflow model of its run and a version of the registered name,
    # tagged with the metric that selected it; pipeline.models.loaders reads it from a models:/ URI.
    versions = {v.run_id: v for v in client.search_model_versions("name = 'esc50-probe'")}
    assert set(versions) == {run.info.run_id for run in folds}
    assert float(versions[run.info.run_id].tags["val_accuracy"]) == pytest.approx(run.data.metrics["best_val_accuracy"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.tracking_uri)
    from pipeline.models.loaders import load_classifier as load_by_uri

    by_uri = load_by_uri(f"models:/esc50-probe/{versions[run.info.run_id].version}")
    waveform, rate = soundfile.read(data.fold(1)[0].uri, dtype="float32")
    torch.testing.assert_close(by_uri.predict(torch.from_numpy(waveform), rate),
                               classifier.predict(torch.from_numpy(waveform), rate))


def test_full_finetuning_on_speech_commands(ray_cluster, small_encoder, tmp_path):
    root = speech_commands(tmp_path / "sc", 35)
    config = job(tmp_path, small_encoder, "task=speechcommands_v2", f"data_root={root}", "name=sc")
    summary = finetune.run(config)
    assert summary["best_epoch"] in (1, 2) and summary["test_accuracy"] is not None
    client = MlflowClient(config.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ssamba-finetune").experiment_id],
                                "tags.ray_run_name = 'sc'")
    assert run.data.metrics["test_accuracy_at_best"] == summary["test_accuracy"]
    assert {"per_class_val.json", "per_class_test.json", "confusion_test.png"} <= artifacts(client, run.info.run_id)


def test_multi_label_finetuning_on_audioset_selects_by_map(ray_cluster, small_encoder, tmp_path):
    root = audioset(tmp_path / "as")
    config = job(tmp_path, small_encoder, "task=audioset20k", f"data_root={root}", "name=as", "loss=bce",
                 "augment.mixup=0.5", "batch_size=2", "scaling.num_workers=2")
    summary = finetune.run(config)
    assert 0.0 <= summary["validation_mAP"] <= 1.0 and summary["test_mAP"] is None
    assert summary["missing_audio"] == {"train": 0, "validation": 1}
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("ssamba-finetune")
    (run,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'as'")
    history = client.get_metric_history(run.info.run_id, "val_mAP")
    assert [m.step for m in history] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in history)
    assert summary["validation_mAP"] == max(m.value for m in history)  # the selected epoch is the best one
    assert run.data.metrics["best_val_mAP"] == summary["validation_mAP"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_class_val.json", str(tmp_path))).read_text())
    assert table["columns"] == ["class", "positives", "average_precision"] and len(table["data"]) == 3
    assert "confusion_val.png" not in artifacts(client, run.info.run_id)  # multi-label: per-class AP instead
    classifier = load_classifier(tmp_path / "ckpt" / "as" / "classifier.pt")
    assert classifier.multi_label and classifier.activation == "sigmoid"


def test_recipes_select_on_their_task_metric():
    assert finetune.validation_metric(load_config(FinetuneJobConfig, "configs/finetune/audioset20k.yaml")) == "val_mAP"
    for preset in ("esc50", "speechcommands_v1", "speechcommands_v2", "manifest"):
        assert finetune.validation_metric(load_config(FinetuneJobConfig, f"configs/finetune/{preset}.yaml")) == "val_accuracy"
    with pytest.raises(ConfigError, match="augment.mixup"):
        load_config(FinetuneJobConfig, "configs/finetune/esc50.yaml", ["augment.mixup=1.5"])


def test_wrong_layout_fails_before_training(ray_cluster, small_encoder, tmp_path):
    config = job(tmp_path, small_encoder, "task=esc50", f"data_root={tmp_path}")
    with pytest.raises(SourceError, match="missing file 'meta/esc50.csv'"):
        finetune.run(config)
