"""Ray Tune sweeps on real services: config validation before any cluster work, a 2-trial mask sweep
(pretraining + linear probe per trial), a 2-trial ASHA fine-tuning sweep, the MLflow parent/child
structure, and a relaunch that resumes a sweep whose trial failed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tune as sweeps
from pipeline.config import load_config
from pipeline.config.sweep import TuneJobConfig
from support.task_layouts import esc50

pytestmark = pytest.mark.timeout(900)

MASK_PRESET = "configs/tune/local-mask.yaml"
THEN_PROBE_PRESET = "configs/tune/local-mask-then-probe.yaml"
FINETUNE_PRESET = "configs/tune/local-finetune.yaml"


# ------------------------------------------------------------------------------------------------
# Sweeps on the local Ray cluster
# ------------------------------------------------------------------------------------------------


def children_of(client: MlflowClient, experiment: str, parent_name: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.ray_run_name = '{parent_name}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def trials_table(client: MlflowClient, run_id: str, folder) -> pd.DataFrame:
    """The sweep's ``trials.json`` table artifact, as the MLflow UI shows it."""
    saved = json.loads(Path(client.download_artifacts(run_id, "trials.json", str(folder))).read_text())
    return pd.DataFrame(saved["data"], columns=saved["columns"])


def footer_reader_actors() -> int:
    """Actors of Ray Data's second Parquet reader this cluster has started, ended ones included."""
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "FooterReader")], limit=10_000, raise_on_missing_output=False))


def esc50_sweep(tmp_path, encoder: str, name: str, *overrides: str) -> tuple[TuneJobConfig, str]:
    """The local fine-tuning sweep on a generated ESC-50 (fold 1, 3 epochs) from ``encoder``, and its store."""
    root = esc50(tmp_path / "esc50")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return load_config(TuneJobConfig, FINETUNE_PRESET, [
        f"name={name}", f"storage_path={tmp_path / 'tune'}", f"tracking.tracking_uri={tracking}",
        f"finetune.storage_path={tmp_path / 'finetune'}", "finetune.task=esc50", f"finetune.data_root={root}",
        f"finetune.features={tmp_path / 'features'}", "finetune.folds=[1]", "finetune.norm=esc50", "finetune.loss=ce",
        f"finetune.model.checkpoint={encoder}", "finetune.target_length=64", "finetune.epochs=3", *overrides,
    ]), tracking


def test_asha_finetune_sweep_resumes_after_its_trials_fail(ray_cluster, small_encoder, tmp_path):
    """Trials are processes of their own: they read the feature store with the pipeline's Parquet
    reader too (they once started footer-reading actors every epoch, 100 CPU-seconds of this test)."""
    footer_readers = footer_reader_actors()
    config, tracking = esc50_sweep(tmp_path, small_encoder, "recipes",
                                   "search.grace_period=2",  # ASHA's only rung is at epoch 2: both trials fail first
                                   "finetune.testing.fail_at_epoch=2")  # every trial fails once, after epoch 1
    first = sweeps.run(config)
    assert first["trials"] == 2 and first["errors"] == 2
    client = MlflowClient(tracking)
    parent, _ = children_of(client, "ssamba-local-tune", "recipes")
    assert parent.info.status == "FAILED" and not any(p.startswith("best.") for p in parent.data.params)  # not final

    second = sweeps.run(config)  # the same sweep again: restored, the failed trials continue
    assert second["trials"] == 2 and second["errors"] == 0 and second["metric"] == "val_accuracy"

    parent, children = children_of(client, "ssamba-local-tune", "recipes")
    assert parent.info.status == "FINISHED" and parent.data.tags["restored"] == "True"
    assert parent.data.params["space.optim.lr"] == "loguniform[0.0001, 0.01]"
    table = trials_table(client, parent.info.run_id, tmp_path)
    assert len(children) == 2 and set(table["status"]) == {"finished"}
    for child in children:
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert epochs == list(range(1, len(epochs) + 1))  # epoch 1 ran once: resumed, not restarted
        assert len(epochs) in (2, 3)  # ASHA may stop the weaker trial at its rung
        expected = "finished" if len(epochs) == 3 else "stopped_early"
        assert child.info.status == "FINISHED" and child.data.tags["sweep_trial_status"] == expected
        row = table[table["run_name"] == child.data.tags["ray_run_name"]].iloc[0]
        assert float(child.data.params["optim.lr"]) == pytest.approx(row["optim.lr"])
        assert child.data.params["batch_size"] == str(row["batch_size"])
    assert footer_reader_actors() == footer_readers
    best = table.loc[table["val_accuracy"].idxmax()]
    assert parent.data.metrics["best.val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert float(parent.data.params["best.optim.lr"]) == pytest.approx(best["optim.lr"])


def test_a_restored_finetune_trial_skips_a_truncated_newest_checkpoint(ray_cluster, small_encoder, tmp_path):
    """One trial fails after its epoch-2 checkpoint; that checkpoint is then cut short (a killed upload).
    The restored sweep resumes the trial from epoch 1, retrains epoch 2 and finishes."""
    config, tracking = esc50_sweep(tmp_path, small_encoder, "truncated", "search.space={optim.lr: {grid: [0.001]}}",
                                   "search.num_samples=1", "search.scheduler=fifo", "finetune.testing.fail_at_epoch=3")
    assert sweeps.run(config)["errors"] == 1
    (trial_folder,) = [path for path in (tmp_path / "tune" / "truncated").iterdir() if path.is_dir()]
    checkpoints = sorted(trial_folder.glob("checkpoint_*"))
    assert len(checkpoints) == 2  # epochs 1 and 2
    state = checkpoints[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    second = sweeps.run(config)
    assert second["errors"] == 0
    client = MlflowClient(tracking)
    _, (child,) = children_of(client, "ssamba-local-tune", "truncated")
    epochs = [m.step for m in sorted(client.get_metric_history(child.info.run_id, "val_accuracy"),
                                     key=lambda m: m.timestamp)]
    assert epochs == [1, 2, 2, 3]  # epoch 2 again, from the checkpoint of epoch 1
