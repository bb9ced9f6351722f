"""Fine-tuning and linear probing end to end on generated ESC-50, Speech Commands and AudioSet layouts."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import finetune
from pipeline.config import ConfigError, FinetuneJobConfig, load_config
from pipeline.sources import SourceError
from support.task_layouts import audioset, esc50, speech_commands

pytestmark = pytest.mark.timeout(600)


def job(tmp_path, encoder: str, *overrides: str) -> FinetuneJobConfig:
    return load_config(FinetuneJobConfig, None, [
        "name=ft", f"storage_path={tmp_path / 'ckpt'}", f"features={tmp_path / 'features'}",
        f"model.checkpoint={encoder}", "target_length=64", "batch_size=4", "epochs=2",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def test_linear_probe_on_esc50_folds(ray_cluster, small_encoder, tmp_path):
    root = esc50(tmp_path / "esc50")
    config = job(tmp_path, small_encoder, "task=esc50", f"data_root={root}", "folds=[1, 2]",
                 "model.freeze_encoder=true", "optim.lr=0.01")
    summary = finetune.run(config)
    assert set(summary["folds"]) == {"fold1", "fold2"} and 0.0 <= summary["mean_accuracy"] <= 1.0
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("ssamba-finetune")
    (run,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'ft-fold1'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
    kept = [p.name for p in (tmp_path / "ckpt" / "ft-fold1").iterdir() if p.name.startswith("epoch-")]
    assert len(kept) == 1  # only the best epoch's checkpoint is kept


def test_full_finetuning_on_speech_commands(ray_cluster, small_encoder, tmp_path):
    root = speech_commands(tmp_path / "sc", 35)
    config = job(tmp_path, small_encoder, "task=speechcommands_v2", f"data_root={root}", "name=sc")
    summary = finetune.run(config)
    assert summary["best_epoch"] in (0, 1) and summary["test_accuracy"] is not None


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
    assert [m.step for m in history] == [0, 1] and all(0.0 <= m.value <= 1.0 for m in history)
    assert summary["validation_mAP"] == max(m.value for m in history)  # the selected epoch is the best one


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
