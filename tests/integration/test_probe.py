"""Downstream probes inside pretraining, as users meet them: ``python -m pipeline.pretrain`` with a probe
section logs the probe scores to MLflow at every probe step, prints them, exports the best step's encoder
with ``train.select_by``, gives two DDP workers the numbers one process computes, and refuses a probe set that
cannot score before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import numpy as np
import torch

from pipeline import pretrain
from pipeline.config import PretrainJobConfig, load_config
from pipeline.training.probing import choose_probe_set, probe_dataset, score
from ssamba import from_pretrained, load_checkpoint
from ssamba.probes import clip_embeddings
from support.audio_files import random_label_manifest, write_pitch_folders

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
PRESET = "configs/pretrain/local-tiny.yaml"


def settings(features: str, tmp_path: Path, probe_root: Path, *extra: str) -> list[str]:
    return [f"data.features={features}", f"validation.features={features}", f"storage_path={tmp_path / 'ckpt'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.batch_size=4",
            "train.figure_every=1000", f"probe.data_root={probe_root}", f"probe.features={tmp_path / 'probe-features'}",
            *extra]


def pretrain_command(args: list[str], ray_address: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    if ray_address is None:
        env.pop("RAY_ADDRESS", None)
    else:
        env["RAY_ADDRESS"] = ray_address
    command = [sys.executable, "-m", "pipeline.pretrain", "--config", PRESET, *[a for s in args for a in ("--set", s)]]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


def history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def the_run(tracking_uri: str, name: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ssamba-local")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{name}'")
    return client, run


def test_pretrain_command_probes_every_few_steps_and_exports_the_best_probe_step(ray_cluster, pretrain_features,
                                                                                  tmp_path):
    """Three pitch classes: the probe runs at steps 3, 6 and 8 (the last), its scores reach MLflow and the
    console, and with ``select_by`` the encoder of the best linear-probe step is exported, its card saying so."""
    probe_root = write_pitch_folders(tmp_path / "pitches", {"train": 6, "validation": 3})
    done = pretrain_command(settings(pretrain_features, tmp_path, probe_root, "name=probed", "train.max_steps=8",
                                     "train.checkpoint_every=4", "train.eval_every=4", "train.log_every=2",
                                     "probe.every=3", "train.select_by=probe_linear_accuracy"),
                            ray_cluster.get_runtime_context().gcs_address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, run = the_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "probed")
    knn, linear = (history(client, run.info.run_id, name) for name in ("probe_knn_accuracy", "probe_linear_accuracy"))
    assert [step for step, _ in knn] == [3, 6, 8] and [step for step, _ in linear] == [3, 6, 8]
    assert knn[-1][1] > 1 / 3 + 0.2 and linear[-1][1] > 1 / 3 + 0.2  # above chance (three classes)
    best_value = max(value for _, value in linear)
    best_step = min(step for step, value in linear if value == best_value)
    assert run.data.metrics["best_probe_linear_accuracy"] == pytest.approx(best_value)

    assert "probe at step 3: probe_knn_accuracy" in done.stdout
    assert "TrainingReport(" not in done.stdout + done.stderr  # Ray's chatter stays in its log files
    assert any("step 4/8 | loss" in line and "| probe_knn_accuracy " in line for line in done.stdout.splitlines())
    assert f"probe_linear_accuracy: {linear[-1][1]:.4f} at the end, best {best_value:.4f} at step {best_step}" in done.stdout

    exported = load_checkpoint(tmp_path / "ckpt" / "probed" / "ssamba_encoder.pt")
    assert exported.metadata["step"] == best_step
    card = json.loads(exported.metadata["model_card"])
    assert card["training"]["exported_step"] == best_step and card["training"]["steps"] == 8
    assert card["selected_by"]["probe_linear_accuracy"] == pytest.approx(best_value)
    assert "the best probe_linear_accuracy" in card["selected_by"]["chosen"]


def test_two_ddp_workers_score_what_one_process_scores_on_the_same_weights(ray_cluster, pretrain_features,
                                                                            tmp_path):
    """Two DDP workers each embed their share of the probe set and gather the rest: their scores equal
    those of one process embedding every clip with the exported encoder (a learning rate too small to move a
    float32 weight keeps the probed step's weights and the exported ones the same)."""
    probe_root = write_pitch_folders(tmp_path / "pitches", {"train": 7, "validation": 4})
    manifest = random_label_manifest(probe_root, tmp_path / "random-labels.csv")
    config = load_config(PretrainJobConfig, PRESET, settings(
        pretrain_features, tmp_path, manifest, "name=workers2", "scaling.num_workers=2", "train.max_steps=2",
        "probe.every=2", "train.checkpoint_every=2", "validation=null", "probe.task=manifest", "optim.lr=1e-30",
        "probe.batch_size=5", "probe.k=5"))
    result = pretrain.run(config)
    gathered = {name: result.metrics[name] for name in ("probe_knn_accuracy", "probe_linear_accuracy")}

    encoder = from_pretrained(tmp_path / "ckpt" / "workers2" / "ssamba_encoder.pt").eval()
    probe_set = choose_probe_set(config.probe, config.storage)
    rows = probe_dataset(config.probe, probe_set, config.data, config.storage, config.model.num_mel_bins).take_all()
    rows.sort(key=lambda row: row["index"])
    assert [row["index"] for row in rows] == list(range(len(probe_set.sources)))
    with torch.no_grad():
        encoded = encoder(torch.as_tensor(np.stack([row["fbank"] for row in rows])))
        embedded = clip_embeddings(encoded, encoder.config.grid, config.probe.pooling,
                                   torch.as_tensor(np.array([row["frames"] for row in rows])))
    targets = torch.as_tensor(np.stack([row["target"] for row in rows]))
    alone = score(config.probe, embedded, targets, torch.as_tensor(probe_set.held_out))
    assert 0.0 < alone["probe_linear_accuracy"] < 1.0 and 0.0 < alone["probe_knn_accuracy"] < 1.0
    assert gathered == pytest.approx(alone, abs=1e-3)


def test_a_probe_set_that_cannot_score_or_is_not_there_exits_2_before_ray(pretrain_features, tmp_path):
    one_class = write_pitch_folders(tmp_path / "one-class", {"train": 2, "validation": 1}, seconds=0.3)
    for split in ("train", "validation"):
        for label in ("mid", "high"):
            for path in (one_class / split / label).iterdir():
                path.unlink()
            (one_class / split / label).rmdir()
    refused = pretrain_command(settings(pretrain_features, tmp_path, one_class, "name=one-class"), None)
    assert refused.returncode == 2 and "probe.data_root:" in refused.stderr and "at least two" in refused.stderr
    missing = pretrain_command(settings(pretrain_features, tmp_path, tmp_path / "nowhere", "name=missing"), None)
    assert missing.returncode == 2 and f"probe.data_root: {tmp_path / 'nowhere'} does not exist" in missing.stderr
    assert "ray:" not in refused.stdout + missing.stdout  # refused before any Ray work
