"""`ray start --head` + `ray job submit -- python -m pipeline.pretrain ...`, as users run it, with
checkpoints in the S3 test server and metrics and the reconstruction image in MLflow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def head_node(s3_server):
    """A separate Ray head with its dashboard (the job server) on free ports, started like a user would.

    ``--block`` keeps ``ray start`` in the foreground so that terminating it stops this cluster only
    (``ray stop`` would stop every Ray process on the machine, the test session's cluster included)."""
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager, client = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=3", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:  # the job server answers once the head is up
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                break
        except urllib.error.HTTPError:  # any HTTP answer (even 401) means the server is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
    yield address, env
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=120)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_pretrains_into_s3_and_mlflow(head_node, s3_server, pretrain_features, tmp_path):
    address, env = head_node
    features = pretrain_features
    s3_server.create_bucket("jobs")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "-m", "pipeline.pretrain", "--config", "configs/pretrain/local-tiny.yaml",
        "--set", "name=submitted", "--set", "storage_path=s3://jobs/pretrain",
        "--set", f"data.features={features}", "--set", f"validation.features={features}",
        "--set", f"tracking.tracking_uri={tracking}", "--set", "train.max_steps=4", "--set", "train.figure_every=2",
        "--set", "train.batch_size=4",
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "checkpoints: s3://jobs/pretrain/submitted" in finished.stdout
    assert "compute: selective_scan: fused CPU (numba)" in finished.stdout  # rank 0's lines reach the job's output
    assert finished.stdout.count("step 1/4 | loss ") == 1 and "| ETA " in finished.stdout  # once, not twice

    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="jobs", Prefix="pretrain/submitted/")["Contents"]}
    assert any(key.endswith("step-00000004/state.pt") for key in keys)
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ssamba-local")
    (run,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'submitted'")
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] > 0
    images = {a.path for a in client.list_artifacts(run.info.run_id, "reconstruction")}
    assert "reconstruction/step-00000002.png" in images
