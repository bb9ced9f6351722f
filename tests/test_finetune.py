"""Fine-tuning and linear probing end to end on generated ESC-50 and Speech Commands layouts."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import finetune
from pipeline.config import FinetuneJobConfig, load_config
from pipeline.sources import SourceError
from ssamba import EncoderConfig, PatchGrid, SSAMBAEncoder, save_checkpoint
from test_tasks import esc50, speech_commands

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory):
    torch.manual_seed(0)
    config = EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(target_length=128))
    path = tmp_path_factory.mktemp("finetune") / "encoder.pt"
    save_checkpoint(path, SSAMBAEncoder(config), config)
    return str(path)


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


def test_wrong_layout_fails_before_training(ray_cluster, small_encoder, tmp_path):
    config = job(tmp_path, small_encoder, "task=esc50", f"data_root={tmp_path}")
    with pytest.raises(SourceError, match="missing file 'meta/esc50.csv'"):
        finetune.run(config)
