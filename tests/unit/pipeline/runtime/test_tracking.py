"""MLflow tracking of a named run: its status follows how the job ends, params logged once, artifact
locations, and a local store refused on a cluster of several machines. A real SQLite MLflow store."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from support import REPO
from pipeline.config import PretrainJobConfig, load_config
from pipeline.runtime.tracking import (
    RunTracker,
    TrackingSetupError,
    artifact_location,
    refuse_local_store_on_cluster,
    resolve_tracking_uri,
    run_status,
)



PRESET = "configs/pretrain/local-tiny.yaml"


def _tracker(tmp_path, name: str) -> RunTracker:
    return RunTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "lifecycle", name)


def _status(tracker: RunTracker) -> str:
    return tracker.client.get_run(tracker.run_id).info.status


def _exit_inside_run_status(tracker: RunTracker, exits: list[BaseException]) -> None:
    try:
        with run_status(tracker):
            sys.exit(0)
    except BaseException as exiting:
        exits.append(exiting)


def test_run_status_follows_how_the_block_ends(tmp_path):
    finished = _tracker(tmp_path, "finished")
    with run_status(finished):
        assert _status(finished) == "RUNNING"
    assert _status(finished) == "FINISHED"

    failed = _tracker(tmp_path, "failed")
    with pytest.raises(ValueError), run_status(failed):
        raise ValueError("boom")
    assert _status(failed) == "FAILED"

    killed = _tracker(tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt), run_status(killed):
        raise KeyboardInterrupt
    assert _status(killed) == "KILLED"

    terminated = _tracker(tmp_path, "terminated")
    handler_before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's own once an earlier test started Ray
    with pytest.raises(KeyboardInterrupt), run_status(terminated):
        os.kill(os.getpid(), signal.SIGTERM)
    assert _status(terminated) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the block's handler is gone with the block

    aborted = _tracker(tmp_path, "aborted")  # Ray Train's Ctrl-C handler exits with status 0
    with pytest.raises(KeyboardInterrupt), run_status(aborted):
        raise SystemExit(0)
    assert _status(aborted) == "KILLED"

    stopped = _tracker(tmp_path, "stopped")  # Tune stops a trial's thread with sys.exit(0) at its next report
    exits: list[BaseException] = []
    trial_thread = threading.Thread(target=_exit_inside_run_status, args=(stopped, exits))
    trial_thread.start()
    trial_thread.join()
    assert [type(e) for e in exits] == [SystemExit] and _status(stopped) == "RUNNING"  # the sweep closes it

    decided = _tracker(tmp_path, "decided")
    with run_status(decided) as outcome:
        outcome.status = "FAILED"
    assert _status(decided) == "FAILED"

    reopened = _tracker(tmp_path, "killed")  # a relaunch resumes the run by name
    assert reopened.run_id == killed.run_id and _status(reopened) == "RUNNING"


def test_attached_tracker_logs_params_once(tmp_path):
    tracker = _tracker(tmp_path, "params")
    worker_side = RunTracker.attach(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.run_id)
    assert not worker_side.has_params()
    worker_side.log_params({"a": 1})
    assert worker_side.has_params() and _status(worker_side) == "RUNNING"


def test_artifact_location_is_beside_the_store_or_the_servers_or_configured(tmp_path):
    store = resolve_tracking_uri(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    assert artifact_location(store, None) == (tmp_path / "db" / "mlartifacts").as_uri()
    assert artifact_location(store, "s3://bucket/mlflow") == "s3://bucket/mlflow"
    assert artifact_location("http://mlflow.mlflow.svc:5000", None) is None  # the server's artifact proxy
    with pytest.raises(TrackingSetupError, match="tracking.artifact_location"):
        artifact_location("postgresql://db/mlflow", None)
    assert load_config(PretrainJobConfig, REPO / PRESET, ["tracking.artifact_location=rel/art"]).tracking.artifact_location \
        == (Path.cwd() / "rel" / "art").as_posix()


def test_a_local_store_is_refused_on_a_cluster_of_several_machines():
    refuse_local_store_on_cluster("sqlite:////data/mlflow.db", hosts=1)
    refuse_local_store_on_cluster("http://mlflow:5000", hosts=3)
    with pytest.raises(TrackingSetupError, match=r"spans 2 machines.*mlflow server.*cluster/README.md"):
        refuse_local_store_on_cluster("sqlite:////data/mlflow.db", hosts=2)
