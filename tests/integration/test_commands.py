"""The commands as users run them: ``python -m pipeline.<job>`` in a subprocess that starts its own Ray
(``ray.address=local``, 2 CPUs like a small laptop or CI machine) and writes its own MLflow store."""

from __future__ import annotations

import io
import os
import re
import signal as signal_module
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from ssamba import load_checkpoint, load_classifier
from conftest import free_ports
from support.audio_files import encode, pitch_manifest, random_label_manifest, signal, write_pitch_folders
from support.task_layouts import esc50

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)
OWN_RAY = ["--set", "ray.address=local", "--set", "ray.num_cpus=2"]


def run_job(job: str, *args: str, timeout: float = 600, base_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline.<job> ARGS`` from the repository root, as the README shows it; with
    ``base_dir``, relative paths resolve there and the job starts a Ray of its own."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if base_dir is not None:
        env.update(SSAMBA_BASE_DIR=str(base_dir), RAY_ADDRESS="local")
    return subprocess.run([sys.executable, "-m", f"pipeline.{job}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def gcs_address(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


def output_of(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"


MISSING_INPUTS = {
    "pretrain": (["--config", "configs/pretrain/local-tiny.yaml"],
                 ["data.features: {base}/outputs/demo/features does not exist"]),
    "finetune": (["--config", "configs/finetune/local-esc50.yaml", "--set", "model.checkpoint=nowhere/encoder.pt"],
                 ["data_root: {base}/data/ESC-50-master does not exist",
                  "model.checkpoint: {base}/nowhere/encoder.pt does not exist"]),
    "tune": (["--config", "configs/tune/local-mask.yaml"],
             ["pretrain.data.features: {base}/outputs/demo/features does not exist",
              "pretrain.probe.data_root: {base}/data/ESC-50-master does not exist"]),
    "embed": (["--config", "configs/embed/local.yaml", "--set", "classifier=nowhere/classifier.pt"],
              ["features: {base}/outputs/demo/features does not exist",
               "model: {base}/outputs/demo/ssamba_encoder.pt does not exist",
               "classifier: {base}/nowhere/classifier.pt does not exist"]),
}


@pytest.mark.parametrize("job", sorted(MISSING_INPUTS))
def test_missing_inputs_exit_2_before_ray_naming_field_and_path(job, tmp_path):
    args, expected = MISSING_INPUTS[job]
    started = time.monotonic()
    done = run_job(job, *args, "--base-dir", str(tmp_path), timeout=120)
    assert done.returncode == 2, output_of(done)
    for line in expected:
        assert line.format(base=tmp_path) in done.stderr, output_of(done)
    assert "Traceback" not in done.stderr and "ray: " not in done.stdout  # no Ray started, one clean message
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no run record, no checkpoint folder
    assert time.monotonic() - started < 60


def test_finetune_command_trains_and_exports_a_classifier_from_class_folders(small_encoder, tmp_path):
    """The README's walkthrough: ``configs/finetune/folders.yaml`` on a folder of class folders. Run as
    ``__main__``, the job's functions must reach Ray Train by reference (they once pickled
    ``torch.classes`` by value and the command could not train at all). A batch larger than the 9
    training clips trains on the clips there are."""
    write_pitch_folders(tmp_path / "data" / "my-sounds", {"train": 3, "validation": 1})
    done = run_job("finetune", "--config", "configs/finetune/folders.yaml", "--base-dir", str(tmp_path),
                   "--set", f"model.checkpoint={small_encoder}", "--set", "epochs=1",
                   "--set", "target_length=128", "--set", "batch_size=32", *OWN_RAY)
    assert done.returncode == 0, output_of(done)
    assert "epoch 1/1 | train_loss " in done.stdout and "train_loss nan" not in done.stdout
    assert "ray: started a local instance with 2 CPUs" in done.stdout
    classifier = tmp_path / "outputs" / "finetune" / "my-sounds" / "classifier.pt"
    assert f"classifier: {classifier}" in done.stdout and classifier.is_file()
    assert sorted(load_classifier(classifier).classes) == ["high", "low", "mid"]
    assert f"--backend-store-uri sqlite:///{tmp_path}/outputs/mlflow.db" in done.stdout
    assert (tmp_path / "outputs" / "features" / "my-sounds" / "features").is_dir()


def test_a_batch_larger_than_the_training_clips_is_refused_before_ray(pretrain_features, tmp_path):
    done = run_job("pretrain", "--config", "configs/pretrain/local-tiny.yaml", "--base-dir", str(tmp_path),
                   "--set", f"data.features={pretrain_features}", "--set", f"validation.features={pretrain_features}",
                   "--set", "train.batch_size=32", timeout=120)
    assert done.returncode == 2, output_of(done)
    assert "train.batch_size: 32 per worker x 1 workers is more than the 24 training clips" in done.stderr
    assert "ray: " not in done.stdout and not (tmp_path / "outputs" / "checkpoints").exists()


def test_an_elastic_run_on_two_cpus_keeps_one_for_its_input_pipeline(pretrain_features, tmp_path):
    """``num_workers: [1, 2]`` on 2 CPUs starts (it was refused for its max) with one worker and never
    grows into the CPU its input pipeline needs, though Ray Train looks for room every second: a
    second worker would leave Ray Data no CPU and training would wait for data forever."""
    done = run_job("pretrain", "--config", "configs/pretrain/local-tiny.yaml", "--base-dir", str(tmp_path), *OWN_RAY,
                   "--set", f"data.features={pretrain_features}", "--set", "validation=null",
                   "--set", "scaling.num_workers=[1, 2]", "--set", "scaling.resize_interval_s=1",
                   "--set", "train.batch_size=4", "--set", "train.max_steps=6", "--set", "train.log_every=1",
                   timeout=420)
    assert done.returncode == 0, output_of(done)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ssamba-local").experiment_id])
    world_sizes = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size")]
    assert sorted(world_sizes) == [(step, 1) for step in range(1, 7)] and run.info.status == "FINISHED"


def asha_stops(scores_in_trial_order: dict[str, dict[int, float]], rungs: list[int],
               reduction_factor: float) -> dict[str, int]:
    """The trials asynchronous successive halving stops, and at which rung, written out from the rule
    (Li et al. 2020) rather than from Ray: trials reach the rungs one after another, and a trial whose score at
    a rung is below the ``1 - 1/reduction_factor`` quantile of the scores recorded there before it stops."""
    recorded: dict[int, list[float]] = {rung: [] for rung in rungs}
    stopped = {}
    for trial, scores in scores_in_trial_order.items():
        for rung in (rung for rung in rungs if rung in scores):
            earlier = list(recorded[rung])
            recorded[rung].append(scores[rung])
            if earlier and scores[rung] < np.percentile(earlier, 100 * (1 - 1 / reduction_factor)):
                stopped[trial] = rung
                break
    return stopped


def test_a_probe_scored_sweep_stops_the_trial_whose_probe_scores_lower(pretrain_features, tmp_path):
    """The shipped local mask sweep on a 2-CPU Ray, its search space replaced by two probe sets over the same
    clips: pitch labels first, labels unrelated to the audio second. Each trial probes its encoder every 2
    steps and reports the score; the trials run one after the other (2 CPUs), so the first sets the bar at
    ASHA's rungs (steps 2 and 4) and the second, near chance where the first is near 1, is stopped there:
    exactly what ASHA's rule stops on the scores the trials logged."""
    clips = write_pitch_folders(tmp_path / "pitches", {"train": 10, "validation": 10}, seconds=0.5)
    pitch_labels = pitch_manifest(clips, tmp_path / "pitch-labels.csv")
    unrelated = random_label_manifest(clips, tmp_path / "unrelated-labels.csv")
    done = run_job("tune", "--config", "configs/tune/local-mask.yaml", "--base-dir", str(tmp_path), *OWN_RAY,
                   "--set", f"pretrain.data.features={pretrain_features}",
                   "--set", f"pretrain.validation.features={pretrain_features}",
                   "--set", "pretrain.probe.task=manifest", "--set", f"pretrain.probe.data_root={pitch_labels}",
                   "--set", f"search.space={{probe.data_root: {{grid: [{pitch_labels}, {unrelated}]}}}}",
                   "--set", "pretrain.probe.every=2", "--set", "search.grace_period=2",
                   "--set", "pretrain.train.max_steps=8", "--set", "pretrain.train.eval_every=4",
                   "--set", "pretrain.train.checkpoint_every=4", "--set", "pretrain.train.batch_size=4", timeout=840)
    assert done.returncode == 0, output_of(done)
    assert "tune: 1 trials at a time, not 2" in done.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("ssamba-local-tune")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'local-mask-sweep'")
    assert parent.info.status == "FINISHED" and parent.data.params["metric"] == "probe_knn_accuracy"
    assert parent.data.params["best.probe.data_root"] == str(pitch_labels)
    trials = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    assert [trial.data.params["probe.data_root"] for trial in trials] == [str(pitch_labels), str(unrelated)]
    scores, stopped_at = {}, {}
    for trial in trials:
        probes = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "probe_knn_accuracy")}
        assert sorted(probes) == list(range(2, max(probes) + 1, 2))  # every probe step up to where it stopped
        assert trial.info.status == "FINISHED"
        name = trial.data.params["probe.data_root"]
        scores[name] = probes
        if trial.data.tags["sweep_trial_status"] == "stopped_early":
            stopped_at[name] = max(probes)
        else:
            assert trial.data.tags["sweep_trial_status"] == "finished" and max(probes) == 8
    assert scores[str(pitch_labels)][2] > scores[str(unrelated)][2], scores  # what the sweep is built on
    # rungs: the grace period times powers of the reduction factor, below the last step
    expected = asha_stops(scores, rungs=[2, 4], reduction_factor=2)
    assert set(stopped_at) == set(expected) == {str(unrelated)}, scores
    for name, rung in expected.items():  # a stopped trial may finish the steps under way before it ends
        assert rung <= stopped_at[name] < 8, (stopped_at, scores)


def test_local_mask_sweep_probed_after_pretraining_finishes_on_two_cpus(pretrain_features, tmp_path):
    """The shipped local mask sweep scored after pretraining (one of its mask counts: a trial is a Train
    worker, its probe and their input pipelines) on a 2-CPU Ray: Tune runs what fits instead of starving Ray
    Data; the trial nests under the sweep's MLflow run with its probe nested below it, the sweep is ranked
    by the probe's score, and the runs table lists the trial."""
    esc50(tmp_path / "data" / "ESC-50-master")
    done = run_job("tune", "--config", "configs/tune/local-mask-then-probe.yaml", "--base-dir", str(tmp_path), *OWN_RAY,
                   "--set", f"pretrain.data.features={pretrain_features}",
                   "--set", f"pretrain.validation.features={pretrain_features}",
                   "--set", "pretrain.train.max_steps=2", "--set", "pretrain.train.eval_every=2",
                   "--set", "pretrain.train.checkpoint_every=2", "--set", "pretrain.train.batch_size=4",
                   "--set", "probe.epochs=1", "--set", "probe.batch_size=4",
                   "--set", "search.space={masking.mask_patches: {grid: [32]}}", timeout=840)
    assert done.returncode == 0, output_of(done)
    assert "tune: 1 trials at a time, not 2" in done.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("ssamba-local-tune")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'local-mask-then-probe'")
    assert parent.info.status == "FINISHED" and "best.probe_val_accuracy" in parent.data.metrics
    assert parent.data.params["space.masking.mask_patches"] == "grid[32]"
    assert parent.data.params["best.masking.mask_patches"] == "32"
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [child.data.params["masking.mask_patches"] for child in children] == ["32"]
    for child in children:  # each trial: its pretraining metrics, its probe's score, the probe nested below
        assert {"loss", "val_masked_accuracy", "probe_val_accuracy"} <= set(child.data.metrics)
        assert "val_accuracy" not in child.data.metrics  # pretraining's validation is named for what it is
        (probe,) = client.search_runs([child.info.experiment_id], f"tags.mlflow.parentRunId = '{child.info.run_id}'")
        assert probe.data.params["model.freeze_encoder"] == "True"

    listed = run_job("runs", "--experiment", "ssamba-local-tune", "list", "--parent", "local-mask-then-probe", "--csv",
                     base_dir=tmp_path, timeout=120)  # the default store, resolved against the base directory
    assert listed.returncode == 0, output_of(listed)
    trials = pd.read_csv(io.StringIO(listed.stdout))
    assert list(trials["param.masking.mask_patches"]) == [32] and set(trials["status"]) == {"FINISHED"}
    assert trials["probe_val_accuracy"].notna().all() and trials["checkpoint_location"].notna().all()


def test_make_demo_then_the_embed_preset_on_what_it_wrote(ray_cluster, tmp_path):
    """``make demo`` (fewer clips and steps), then ``configs/embed/local.yaml`` unchanged: the preset
    points at what the demo writes. ``SSAMBA_BASE_DIR`` keeps the outputs out of the repository. The
    embed job joins a running cluster (the test session's) where the demo started its own."""
    demo = run_job("demo", "--clips", "12", "--steps", "2", base_dir=tmp_path)
    assert demo.returncode == 0, output_of(demo)
    encoder = tmp_path / "outputs" / "demo" / "ssamba_encoder.pt"
    assert f"copied to {encoder}" in demo.stdout and encoder.is_file()
    assert "ray: started a local instance" in demo.stdout and "ui --backend-store-uri sqlite:///" in demo.stdout

    done = run_job("embed", "--config", "configs/embed/local.yaml", "--set", f"ray.address={gcs_address(ray_cluster)}",
                   base_dir=tmp_path)
    assert "ray: joined the cluster at" in done.stdout
    assert done.returncode == 0, output_of(done)
    output = tmp_path / "outputs" / "demo" / "embeddings"
    assert f"embed: 12 rows → {output}" in done.stdout
    table = pq.read_table(output)
    assert table.num_rows == 12 and all(table.column("ok").to_pylist())
    grid = load_checkpoint(encoder).encoder_config.grid  # band means by default: each band's 64 values
    assert {len(vector) for vector in table.column("scene").to_pylist()} == {64 * grid.freq_patches}


def test_a_dead_cluster_is_named_at_once_and_a_sigterm_stops_the_wait(tmp_path):
    """A job with the default ray.address on a machine whose recorded cluster (``ray start``'s record in
    the temp folder) is gone exits 2 within seconds, naming the address and both ways out, instead of
    retrying its GCS for minutes; one pointed at an address that never answers stops on SIGTERM."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for index in range(2):
        (audio / f"clip{index}.wav").write_bytes(encode(signal(16_000, 1, 0.5, seed=index), 16_000, "WAV", "PCM_16"))
    (tmp_path / "tmp" / "ray").mkdir(parents=True)
    port = free_ports(1)[0]
    (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.featurize", "--set", f"input.uri={audio}",
               "--set", f"output={tmp_path / 'features'}"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 15, output_of(done)
    # Ray names this machine by its address, not 127.0.0.1
    assert re.search(rf"the Ray cluster at \S+:{port} \(the cluster `ray start` last started on this machine\) "
                     "does not answer", done.stderr), done.stderr
    assert "ray stop --force" in done.stderr and "--set ray.address=local" in done.stderr

    waiting = subprocess.Popen([*command, "--set", "ray.address=10.255.255.1:6379"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # Python, torch and Ray imported; connecting
    signalled = time.monotonic()
    waiting.send_signal(signal_module.SIGTERM)
    waiting.wait(timeout=30)
    assert time.monotonic() - signalled < 10 and waiting.returncode != 0
