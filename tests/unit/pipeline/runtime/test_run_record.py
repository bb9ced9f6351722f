"""A named run's record: config comparison on relaunch, which fields may change on resume, accepted
changes on the MLflow run, source tags. Real files and a real SQLite MLflow store; no Ray (the relaunch
refusal must come before Ray starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support import REPO
from pipeline.config import ConfigError, PretrainJobConfig, load_config
from pipeline.data.storage import resolve
from pipeline.runtime.run_record import (
    CONFIG_FILE,
    Change,
    ConfigChangedError,
    Launch,
    check_config,
    config_changes,
    may_change_on_resume,
    plain,
    record_accepted_changes,
    source_tags,
)
from pipeline.runtime.tracking import (
    RunTracker,
    resolve_tracking_uri,
)



PRESET = "configs/pretrain/local-tiny.yaml"


def job(tmp_path, *overrides: str) -> PretrainJobConfig:
    return load_config(PretrainJobConfig, REPO / PRESET, [f"storage_path={tmp_path / 'ckpt'}", *overrides])


def test_config_changes_list_every_changed_field_and_only_those():
    before = {"optim": {"lr": 0.001, "betas": [0.9, 0.99]}, "train": {"max_steps": 10}, "name": "a"}
    after = {"optim": {"lr": 0.01, "betas": [0.9, 0.99]}, "train": {"max_steps": 20, "seed": 1}, "name": "a"}
    assert config_changes(before, after) == [Change("optim.lr", 0.001, 0.01), Change("train.max_steps", 10, 20),
                                             Change("train.seed", "<absent>", 1)]
    assert config_changes(before, before) == []


def test_which_fields_may_change_on_resume():
    for field in ("train.max_steps", "train.checkpoint_every", "train.log_every", "train.eval_every",
                  "scaling.num_workers", "scaling.use_gpu", "epochs", "pretrain.train.max_steps", "probe.scaling.num_workers",
                  "resources.gpu", "max_failures"):
        assert may_change_on_resume(field), field
    for field in ("optim.lr", "model.embed_dim", "masking.mask_patches", "data.features", "train.batch_size",
                  "train.grad_accum", "pretrain.optim.lr", "search.num_samples", "tracking.experiment"):
        assert not may_change_on_resume(field), field


def test_a_relaunch_keeps_its_config_and_refuses_changes_unless_accepted(tmp_path):
    storage = resolve(str(tmp_path / "ckpt"))
    first = job(tmp_path)
    assert check_config(first.name, storage, first) == Launch(plain(first))
    record = tmp_path / "ckpt" / first.name / CONFIG_FILE
    assert json.loads(record.read_text()) == plain(first)
    fixed = job(tmp_path, "data.features=/elsewhere")  # the first launch never reached training: nothing to keep
    assert check_config(fixed.name, storage, fixed) == Launch(plain(fixed))
    assert check_config(first.name, storage, first) == Launch(plain(first))
    (record.parent / "step-00000020").mkdir()  # the run has started: its config is kept from now on

    longer = job(tmp_path, "train.max_steps=120", "train.checkpoint_every=40", "scaling.cpus_per_worker=2")
    assert check_config(longer.name, storage, longer).accepted == []  # resumes; the record follows
    wider = job(tmp_path, "train.max_steps=120", "train.checkpoint_every=40", "scaling.cpus_per_worker=2",
                "scaling.num_workers=2")  # the default global batch would double with the workers
    with pytest.raises(ConfigChangedError, match=r"train.global_batch_size: 8 -> 16"):
        check_config(wider.name, storage, wider)

    changed = job(tmp_path, "train.max_steps=120", "optim.lr=0.01", "masking.mask_patches=40")
    with pytest.raises(ConfigChangedError) as refused:
        check_config(changed.name, storage, changed)
    message = str(refused.value)
    assert "optim.lr: 0.001 -> 0.01" in message and "masking.mask_patches: 48 -> 40" in message
    assert "--accept-config-changes" in message and "train.max_steps" not in message.split("(these")[0]
    assert json.loads(record.read_text())["optim"]["lr"] == 0.001  # a refusal changes nothing

    accepted = check_config(changed.name, storage, changed, accept_changes=True)
    assert [change.field for change in accepted.accepted] == ["masking.mask_patches", "optim.lr"]
    assert json.loads(record.read_text())["optim"]["lr"] == 0.01
    assert check_config(changed.name, storage, changed).accepted == []  # the record took the new config


def test_a_run_recorded_before_a_field_existed_resumes_while_the_field_has_its_default(tmp_path):
    """An upgrade adds a field (here the teacher-student ``objective.target_norm``): relaunching a run
    recorded without it resumes at the default, and refuses another value naming the field."""
    storage = resolve(str(tmp_path / "ckpt"))
    run = job(tmp_path, "objective.kind=teacher_student")
    older = plain(run)
    del older["objective"]["target_norm"], older["train"]["seed"]
    record = tmp_path / "ckpt" / run.name / CONFIG_FILE
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(older))
    (record.parent / "step-00000020").mkdir()
    assert check_config(run.name, storage, run) == Launch(plain(run))
    record.write_text(json.dumps(older))
    other = job(tmp_path, "objective.kind=teacher_student", "objective.target_norm=layer")
    with pytest.raises(ConfigChangedError, match=r'objective.target_norm: "<absent>" -> "layer"'):
        check_config(other.name, storage, other)


def test_accepted_changes_are_recorded_on_the_mlflow_run(tmp_path):
    uri = resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = RunTracker(uri, "exp", "run-a")
    client = MlflowClient(uri)
    launch = Launch({"optim": {"lr": 0.01}}, [Change("optim.lr", 0.001, 0.01)])
    assert record_accepted_changes(client, client.get_run(tracker.run_id), launch) == 1
    assert record_accepted_changes(client, client.get_run(tracker.run_id), launch) == 2
    run = client.get_run(tracker.run_id)
    assert run.data.tags["config_revision"] == "2" and run.data.tags["config_changes.1"] == "optim.lr: 0.001 -> 0.01"
    saved = json.loads(Path(client.download_artifacts(tracker.run_id, "config-2.json", str(tmp_path))).read_text())
    assert saved["changes"] == [{"field": "optim.lr", "before": 0.001, "after": 0.01}]
    assert saved["config"] == {"optim": {"lr": 0.01}}
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())  # beside the store
    # A model-training experiment: MLflow 3's UI opens it on its runs, not on GenAI traces.
    assert client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_changed_lr_exits_non_zero_before_ray_starts(tmp_path):
    features = [f"data.features={tmp_path / 'demo'}", f"validation.features={tmp_path / 'demo'}"]
    original = job(tmp_path, "name=lr-run", *features)
    check_config(original.name, resolve(original.storage_path), original)  # what the first launch recorded
    (tmp_path / "ckpt" / "lr-run" / "step-00000020").mkdir()  # ... before its first checkpoint
    (tmp_path / "demo" / "features").mkdir(parents=True)  # the inputs exist: the config check decides
    # Nothing listens at this Ray address: reaching ray.init would fail with a connection error instead.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pipeline.pretrain", "--config", PRESET, "--set", "name=lr-run",
                           "--set", f"storage_path={tmp_path / 'ckpt'}", "--set", "optim.lr=0.01",
                           "--set", "train.max_steps=100", "--set", features[0], "--set", features[1]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "optim.lr: 0.001 -> 0.01" in done.stderr and "(these may change on resume: train.max_steps)" in done.stderr
    assert "ray" not in done.stderr.replace("--accept-config-changes", "").lower().replace("lr-run", "")


def test_source_tags_name_the_entry_point_user_host_and_commit():
    tags = source_tags("pipeline.pretrain")
    assert tags["mlflow.source.name"] == "pipeline.pretrain" and tags["host"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if Path.cwd() == REPO:
        assert tags["mlflow.source.git.commit"] == commit


def test_a_resumed_run_may_change_its_scaling_but_not_its_global_batch(tmp_path):
    storage = resolve(str(tmp_path / "ckpt"))
    first = job(tmp_path, "scaling.num_workers=2")  # global batch 8 x 2 x 1 = 16
    check_config(first.name, storage, first)
    (tmp_path / "ckpt" / first.name / "step-00000020").mkdir()
    elastic = job(tmp_path, "scaling.num_workers=[1, 2]", "scaling.resize_interval_s=5")
    assert elastic.train.global_batch_size == 16
    assert check_config(elastic.name, storage, elastic).accepted == []
    grown = job(tmp_path, "scaling.num_workers=[1, 2]", "train.grad_accum=2")  # default 8 x 2 x 2 = 32
    with pytest.raises(ConfigChangedError, match=r"train.global_batch_size: 16 -> 32"):
        check_config(grown.name, storage, grown)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 16 is not a whole number .* on 3 workers"):
        job(tmp_path, "scaling.num_workers=[1, 4]", "train.global_batch_size=16")  # 3 x 8 does not divide 16
    kept = job(tmp_path, "scaling.num_workers=[1, 2]", "train.global_batch_size=16", "scaling.max_failures=3")
    assert check_config(kept.name, storage, kept).accepted == []


def test_sweep_restores_and_fine_tuning_follow_the_same_rule(tmp_path):
    from pipeline.config import FinetuneJobConfig
    from pipeline.config.sweep import TuneJobConfig

    storage = resolve(str(tmp_path / "tune"))
    sweep = load_config(TuneJobConfig, REPO / "configs/tune/local-mask.yaml", [f"storage_path={tmp_path / 'tune'}"])
    check_config(sweep.name, storage, sweep)
    (tmp_path / "tune" / sweep.name / "tuner.pkl").write_bytes(b"")  # the sweep has started
    longer = load_config(TuneJobConfig, REPO / "configs/tune/local-mask.yaml",
                         [f"storage_path={tmp_path / 'tune'}", "pretrain.train.max_steps=500", "max_failures=2"])
    assert check_config(longer.name, storage, longer).accepted == []
    other = load_config(TuneJobConfig, REPO / "configs/tune/local-mask.yaml",
                        [f"storage_path={tmp_path / 'tune'}", "pretrain.optim.lr=0.5", "search.num_samples=3"])
    with pytest.raises(ConfigChangedError, match=r"pretrain.optim.lr(.|\n)*search.num_samples"):
        check_config(other.name, storage, other)

    finetune = load_config(FinetuneJobConfig, REPO / "configs/finetune/esc50.yaml", [f"storage_path={tmp_path / 'ft'}"])
    check_config(finetune.name, resolve(finetune.storage_path), finetune)
    (tmp_path / "ft" / finetune.name / "epoch-0000").mkdir()
    more = load_config(FinetuneJobConfig, REPO / "configs/finetune/esc50.yaml",
                       [f"storage_path={tmp_path / 'ft'}", "epochs=80", "optim.head_lr_multiplier=3"])
    with pytest.raises(ConfigChangedError, match="optim.head_lr_multiplier") as refused:
        check_config(more.name, resolve(more.storage_path), more)
    assert "(these may change on resume: epochs)" in str(refused.value)


def test_a_saved_sweep_without_its_run_record_is_not_restored(tmp_path):
    from pipeline import tune
    from pipeline.config.sweep import TuneJobConfig

    config = load_config(TuneJobConfig, REPO / "configs/tune/finetune_esc50.yaml", [f"storage_path={tmp_path}"])
    storage = resolve(str(tmp_path))
    tune.refuse_unrecorded_sweep(config, storage)  # nothing saved: a new sweep
    (tmp_path / config.name).mkdir()
    (tmp_path / config.name / tune.SAVED_SWEEP).write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"name: .* holds a saved sweep \(tuner.pkl\) but no run record"):
        tune.refuse_unrecorded_sweep(config, storage)
    check_config(config.name, storage, config)  # the record a launch of this project writes
    tune.refuse_unrecorded_sweep(config, storage)
