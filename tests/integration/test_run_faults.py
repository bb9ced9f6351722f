"""Named runs under faults, on the real S3 test server and MLflow: a second launch of a running run, a
launch that died leaving its lock and its MLflow run RUNNING, and a corrupt newest checkpoint."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import run_lock
from pipeline.storage import resolve
from test_commands import output_of, run_job

pytestmark = pytest.mark.timeout(600)


def pretrain_args(features: str, tmp_path, name: str, ray_address: str, *extra: str) -> list[str]:
    """The command line of a local-tiny run checkpointing into the S3 test server, on the test
    session's Ray cluster (``ray_address``; faults, not starting Ray, are under test here)."""
    return ["--config", "configs/pretrain/local-tiny.yaml", "--base-dir", str(tmp_path), "--set", f"name={name}",
            "--set", "storage_path=s3://runs/pretrain", "--set", f"data.features={features}",
            "--set", f"validation.features={features}", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
            "--set", f"ray.address={ray_address}", *extra]


def address_of(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


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


def test_a_relaunch_after_a_killed_driver_ends_its_stale_run_and_resumes(ray_cluster, s3_server, pretrain_features,
                                                                         tmp_path):
    """What a SIGKILLed driver leaves: its lock, no longer beating, and its MLflow run RUNNING."""
    s3_server.create_bucket("runs")
    tracking = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    (tmp_path / "outputs").mkdir()
    client = MlflowClient(tracking)
    experiment = client.create_experiment("ssamba-local", artifact_location=(tmp_path / "outputs" / "art").as_uri())
    stale = client.create_run(experiment, run_name="killed", tags={"ray_run_name": "killed"})
    dead = {"token": "x", "host": "gone", "pid": 1, "started": time.time() - 900, "heartbeat": time.time() - 600}
    resolve("s3://runs/pretrain/killed").join(run_lock.LOCK_FILE).write_bytes(json.dumps(dead).encode())

    done = run_job("pretrain", *pretrain_args(pretrain_features, tmp_path, "killed", address_of(ray_cluster),
                                              "--set", "train.max_steps=2", "--set", "validation=null"))
    assert done.returncode == 0, output_of(done)
    assert "run killed: its last launch stopped without ending (launched on gone (pid 1)" in done.stdout
    assert "MLflow run killed was left RUNNING by a launch that stopped without ending it; marked KILLED" in done.stdout
    (run,) = client.search_runs([experiment], "tags.ray_run_name = 'killed'")
    assert run.info.run_id == stale.info.run_id and run.info.status == "FINISHED"  # resumed, then ended
    assert not resolve("s3://runs/pretrain/killed").join(run_lock.LOCK_FILE).exists()


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(ray_cluster, s3_server,
                                                                                        pretrain_features, tmp_path):
    """A relaunch resumes from the object store: from the newest checkpoint that loads, in the same
    MLflow run."""
    s3_server.create_bucket("runs")
    args = pretrain_args(pretrain_features, tmp_path, "cut", address_of(ray_cluster), "--set", "train.eval_every=2",
                         "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2")
    first = run_job("pretrain", *args, "--set", "train.max_steps=4")
    assert first.returncode == 0, output_of(first)
    newest = resolve("s3://runs/pretrain/cut").join("step-00000004", "state.pt")
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # what a killed upload leaves

    second = run_job("pretrain", *args, "--set", "train.max_steps=6")
    assert second.returncode == 0, output_of(second)
    assert "resuming from s3://runs/pretrain/cut/step-00000002: skipped checkpoints" in second.stdout
    assert f"{newest.uri}: " in second.stdout  # names the file and why
    assert "finished at step 6" in second.stdout and "step 5/6 | loss" in second.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ssamba-local").experiment_id])  # one run, resumed
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_masked_accuracy")) == [2, 4, 4, 6]
