"""`ray start --head` + `ray job submit -- python -m pipeline.pretrain ...`, as users run it, with
checkpoints in the S3 test server and metrics and the reconstruction image in MLflow."""

from __future__ import annotations

import contextlib
import os
import shlex
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

from conftest import forget_cluster_record, free_ports

REPO = Path(__file__).resolve().parents[2]
# Never beside the multinode tests' cluster: with it running, this head's job server never found its
# agent ("No available agent to submit job", for three minutes), reproduced with the two modules alone.
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("multinode")]


def signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(process.pid, signum)


@pytest.fixture
def head_node(s3_server):
    """A separate Ray head with its dashboard (the job server) on free ports, started like a user would.

    ``--block`` keeps ``ray start`` in the foreground, in a process group of its own with the
    processes it starts: signalling that group stops this cluster only (``ray stop`` would stop every
    Ray process on the machine, the test session's cluster included)."""
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager, client = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Ray Train's placement-group cleaner finds the state API here, not through the newest cluster of the machine.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=3", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
                signal_group(head, signal.SIGKILL)
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
    yield address, env
    signal_group(head, signal.SIGTERM)  # the dashboard and agents stop at once ...
    time.sleep(3)
    signal_group(head, signal.SIGKILL)  # ... the GCS and the raylet would take about 30 s more
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)
    forget_cluster_record(gcs)


def readme_job_submit(address: str, submitter: Path) -> list[str]:
    """The README's ``ray job submit`` example as written, pointed at the test's head node."""
    (line,) = [line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("ray job submit ") and "pipeline.pretrain" in line]
    words = shlex.split(line.replace("$PWD", str(submitter)))
    words[0] = str(Path(sys.executable).with_name("ray"))
    words[words.index("--address") + 1] = address
    words[words.index("--working-dir") + 1] = str(REPO)
    return words


def test_readme_job_submit_pretrains_into_s3_and_mlflow(head_node, s3_server, pretrain_features, tmp_path):
    """The README's command from another directory: relative paths (the preset's features, the default
    MLflow store) resolve against the submitter's directory, not Ray's copy of the working directory."""
    address, env = head_node
    submitter = tmp_path / "project"
    (submitter / "outputs" / "demo").mkdir(parents=True)
    shutil.copytree(pretrain_features, submitter / "outputs" / "demo" / "features")
    s3_server.create_bucket("jobs")
    command = [*readme_job_submit(address, submitter),
               "--set", "name=submitted", "--set", "storage_path=s3://jobs/pretrain", "--set", "train.max_steps=4",
               "--set", "train.figure_every=2", "--set", "train.batch_size=4"]
    assert command.count("--base-dir") == 1
    finished = subprocess.run(command, env=env, cwd=submitter, capture_output=True, text=True, timeout=540)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "checkpoints: s3://jobs/pretrain/submitted" in finished.stdout
    assert "ray: joined the cluster at" in finished.stdout
    assert "compute: selective_scan: fused CPU (numba)" in finished.stdout  # rank 0's lines reach the job's output
    assert finished.stdout.count("step 1/4 | loss ") == 1 and "| ETA " in finished.stdout  # once, not twice

    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="jobs", Prefix="pretrain/submitted/")["Contents"]}
    assert any(key.endswith("step-00000004/state.pt") for key in keys)
    client = MlflowClient(f"sqlite:///{submitter / 'outputs' / 'mlflow.db'}")  # the default store, the submitter's
    experiment = client.get_experiment_by_name("ssamba-local")
    (run,) = client.search_runs([experiment.experiment_id], "tags.ray_run_name = 'submitted'")
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] > 0
    images = {a.path for a in client.list_artifacts(run.info.run_id, "reconstruction")}
    assert "reconstruction/step-00000002.png" in images

    # Without --base-dir the relative paths would land in Ray's temporary copy: refused, saying what to do.
    unanchored = [word for word in command if word not in ("--base-dir", str(submitter))]
    refused = subprocess.run(unanchored, env=env, cwd=submitter, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "data.features: 'outputs/demo/features' is a relative path" in refused.stdout + refused.stderr
    assert '--base-dir "$PWD"' in refused.stdout + refused.stderr
