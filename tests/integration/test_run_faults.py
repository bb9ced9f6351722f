"""Named runs under faults, on the real S3 test server and MLflow: a second launch of a running run, and
a launch that died uploading a checkpoint, leaving its lock, its MLflow run RUNNING and a corrupt
newest checkpoint."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.runtime import run_lock
from pipeline.data.storage import resolve
from test_commands import gcs_address, output_of, run_job

pytestmark = pytest.mark.timeout(600)


def pretrain_args(features: str, tmp_path, name: str, ray_address: str, *extra: str) -> list[str]:
    """The command line of a local-tiny run checkpointing into the S3 test server, on the test
    session's Ray cluster (``ray_address``; faults, not starting Ray, are under test here)."""
    return ["--config", "configs/pretrain/local-tiny.yaml", "--base-dir", str(tmp_path), "--set", f"name={name}",
            "--set", "storage_path=s3://runs/pretrain", "--set", f"data.features={features}",
            "--set", f"validation.features={features}", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
            "--set", f"ray.address={ray_address}", *extra]


def test_the_lock_admits_one_launch_and_frees_a_dead_ones_run(s3_server):
    s3_server.create_bucket("runs")
    folder = resolve("s3://runs/locks/a")
    with run_lock.hold(folder, "a") as previous:
        assert previous is None
        with pytest.raises(run_lock.RunLocked, match=r"run a is already running: launched on .* \(pid \d+\)"):
            with run_lock.hold(folder, "a"):
                pass
    assert not folder.join(run_lock.LOCK_FILE).exists()  # released
    dead = {"token": "x", "host": "gone", "pid": 1, "started": time.time() - 900, "heartbeat": time.time() - 600}
    folder.join(run_lock.LOCK_FILE).write_bytes(json.dumps(dead).encode())
    with run_lock.hold(folder, "a") as previous:
        assert previous["host"] == "gone"


def test_a_second_launch_of_a_running_run_exits_naming_it(s3_server, pretrain_features, tmp_path):
    s3_server.create_bucket("runs")
    with run_lock.hold(resolve("s3://runs/pretrain/busy"), "busy"):  # the first launch, running
        done = run_job("pretrain", *pretrain_args(pretrain_features, tmp_path, "busy", "local"), timeout=120)
    assert done.returncode == 2, output_of(done)
    assert "run busy is already running: launched on" in done.stderr and "ray: " not in done.stdout
    assert not (tmp_path / "outputs").exists()  # no MLflow run opened


def test_a_relaunch_after_a_killed_driver_ends_its_stale_run_and_resumes_from_the_newest_checkpoint_that_loads(
        ray_cluster, s3_server, pretrain_features, tmp_path):
    """What a driver SIGKILLed while uploading its newest checkpoint leaves: its lock, no longer
    beating, its MLflow run RUNNING and a truncated ``state.pt``. The relaunch takes the run over,
    skips the broken checkpoint and resumes from the one before, from the object store, in the same
    MLflow run."""
    s3_server.create_bucket("runs")
    args = pretrain_args(pretrain_features, tmp_path, "cut", gcs_address(ray_cluster), "--set", "train.eval_every=2",
                         "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2")
    first = run_job("pretrain", *args, "--set", "train.max_steps=4")
    assert first.returncode == 0, output_of(first)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (killed,) = client.search_runs([client.get_experiment_by_name("ssamba-local").experiment_id])
    client.update_run(killed.info.run_id, status="RUNNING")  # the killed driver never ended it
    folder = resolve("s3://runs/pretrain/cut")
    dead = {"token": "x", "host": "gone", "pid": 1, "started": time.time() - 900, "heartbeat": time.time() - 600}
    folder.join(run_lock.LOCK_FILE).write_bytes(json.dumps(dead).encode())
    newest = folder.join("step-00000004", "state.pt")
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # what a killed upload leaves

    second = run_job("pretrain", *args, "--set", "train.max_steps=6")
    assert second.returncode == 0, output_of(second)
    assert "run cut: its last launch stopped without ending (launched on gone (pid 1)" in second.stdout
    assert "MLflow run cut was left RUNNING by a launch that stopped without ending it; marked KILLED" in second.stdout
    assert "resuming from s3://runs/pretrain/cut/step-00000002: skipped checkpoints" in second.stdout
    assert f"{newest.uri}: " in second.stdout  # names the file and why
    assert "finished at step 6" in second.stdout and "step 5/6 | loss" in second.stdout
    (run,) = client.search_runs([killed.info.experiment_id])  # one run, resumed, then ended
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_masked_accuracy")) == [2, 4, 4, 6]
    assert not folder.join(run_lock.LOCK_FILE).exists()
