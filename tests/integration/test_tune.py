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
from pipeline.config import ConfigError, PretrainJobConfig, load_config
from pipeline.config.sweep import TuneJobConfig, with_values
from pipeline.storage import resolve
from support.task_layouts import esc50

pytestmark = pytest.mark.timeout(900)

MASK_PRESET = "configs/tune/local-mask.yaml"
THEN_PROBE_PRESET = "configs/tune/local-mask-then-probe.yaml"
FINETUNE_PRESET = "configs/tune/local-finetune.yaml"


# ------------------------------------------------------------------------------------------------
# Config: validated before any Ray work
# ------------------------------------------------------------------------------------------------


def test_presets_read_their_base_configs_and_apply_changes():
    config = load_config(TuneJobConfig, MASK_PRESET)
    assert config.pretrain.model.embed_dim == 64  # from configs/pretrain/local-tiny.yaml
    assert config.pretrain.train.max_steps == 40  # changed by the sweep preset
    assert config.pretrain.train.batch_size == 8  # kept from the base
    overridden = load_config(TuneJobConfig, MASK_PRESET, ["pretrain.train.max_steps=7"])
    assert overridden.pretrain.train.max_steps == 7


@pytest.mark.parametrize("preset, override, message", [
    (MASK_PRESET, "search.space={optim.lr: {loguniform: [0.0, 0.1]}}", "bounds must be positive"),
    (MASK_PRESET, "search.space={masking.mask_patchez: {grid: [32]}}", r"search.space.masking.mask_patchez = 32: .*no such field"),
    (MASK_PRESET, "search.space={masking.mask_patches: {grid: [32, 500]}}", r"search.space.masking.mask_patches = 500: .*must be below"),
    (MASK_PRESET, "search.space={train.max_steps: {randint: [0, 5]}}", r"search.space.train.max_steps = 0: .*train.max_steps"),
    (MASK_PRESET, "pretrain.base=configs/pretrain/missing.yaml", "pretrain.base: cannot read config"),
    (MASK_PRESET, "sweep=finetune", "fine-tuning sweep needs finetune"),
    (MASK_PRESET, "metric=val_masked_accuracy", "metric: val_masked_accuracy is not reported by pretrain.probe"),
    (MASK_PRESET, "pretrain.probe.every=15", r"pretrain.train.checkpoint_every \(20\) must be a multiple of pretrain.probe.every"),
    (MASK_PRESET, "probe={task: esc50, name: p, storage_path: x, data_root: y, features: z}", "give exactly one"),
    (THEN_PROBE_PRESET, "search.scheduler=asha", "scored after pretraining is scored once"),
    (THEN_PROBE_PRESET, "probe=null", "give exactly one"),
])
def test_invalid_sweeps_fail_naming_the_field(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TuneJobConfig, preset, [override])


def test_invalid_sweep_exits_with_the_field_named(capsys):
    assert sweeps.main(["--config", MASK_PRESET, "--set", "search.num_samples=0"]) == 2
    assert "search.num_samples" in capsys.readouterr().err


def test_with_values_sets_dotted_fields_and_revalidates():
    base = load_config(PretrainJobConfig, "configs/pretrain/local-tiny.yaml")
    changed = with_values(base, {"optim.lr": 0.5, "masking.mask_patches": None, "masking.mask_ratio": 0.75})
    assert changed.optim.lr == 0.5 and changed.optim.schedule == base.optim.schedule
    assert changed.masking.mask_ratio == 0.75 and changed.masking.mask_patches is None
    with pytest.raises(ValueError, match="give exactly one of mask_patches and mask_ratio"):
        with_values(base, {"masking.mask_ratio": 0.75})  # the preset sets a count: clear it to sweep ratios
    assert with_values(base, {"tracking.tracking_uri": "sqlite:////tmp/x.db"}).tracking.tracking_uri == "sqlite:////tmp/x.db"
    with pytest.raises(ValueError, match="optim.lr"):
        with_values(base, {"optim.lr": -1})
    with pytest.raises(ValueError, match="'name' is not a config section"):
        with_values(base, {"name.x": 1})


def test_optuna_proposes_valid_recipes_from_the_space(tmp_path):
    config = load_config(TuneJobConfig, "configs/tune/finetune_esc50.yaml", [f"storage_path={tmp_path}"])
    root = resolve(config.storage_path, config.storage)
    settings = sweeps.build_tuner(config, root, sweeps.finetune_trial, config.search.max_concurrent_trials)[0]._local_tuner
    searcher = settings._tune_config.search_alg
    assert type(searcher).__name__ == "OptunaSearch" and settings._tune_config.max_concurrent_trials == 8
    assert searcher.set_search_properties("val_accuracy", "max", settings._param_space)
    for trial in range(4):
        values = searcher.suggest(f"t{trial}")
        assert set(values) == set(config.search.space) and 1e-5 <= values["optim.lr"] <= 5e-4
        assert with_values(config.finetune, values).batch_size in (24, 48)


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
