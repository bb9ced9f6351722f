"""Pretraining on a Ray cluster of several nodes on one machine (Ray's ``cluster_utils.Cluster``: a
head and worker nodes, each with its own raylet): DDP across two nodes that survives losing one of
them to a replacement, restarting from its checkpoint in the S3 test server, and an elastic run that grows from 1 to 2 workers with its global batch held.

Workers reserve 2 CPUs; the head has 3 and every other node 2, so each node holds one worker and the
head keeps a CPU for Ray Data. The driver is ``python -m pipeline.pretrain`` pointed at the cluster
(this process keeps its own Ray session for the fixtures). A run waits at a known step
(``testing.hold_at_step``) until the test has changed the cluster, and the test changes it once the
controller has recorded the checkpoint of that step: nothing depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import forget_cluster_record, free_ports
from pipeline.data.storage import resolve

pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("multinode")]  # one cluster fixture

REPO = Path(__file__).resolve().parents[2]
HEAD_CPUS, NODE_CPUS, WORKER_CPUS = 3, 2, 2
HOLD_STEP, MAX_STEPS = 2, 4


@contextlib.contextmanager
def session_kv_kept():
    """Starting a node points Ray's process-wide internal-KV client at that node's GCS. Put this
    process's own session back afterwards: a client left pointing at a head the test later removes
    ends the whole process (exit 1, no traceback) 60 s after that GCS is gone, the first time anything
    here (Ray Train's local mode, for one) reads the KV."""
    from ray.experimental import internal_kv

    session_client = internal_kv.internal_kv_get_gcs_client()
    try:
        yield
    finally:
        if session_client is None:
            internal_kv._internal_kv_reset()
        else:
            internal_kv._initialize_internal_kv(session_client)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head node; tests add and remove the other nodes. Torn down node by node (``Cluster.shutdown``
    would also reset this process's Ray session state). Started after the S3 test server, whose
    address and keys its nodes inherit from the environment."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # unix socket paths must stay short
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    (dashboard,) = free_ports(1)
    # The head's processes (Ray Train's placement-group cleaner among them) ask this dashboard's state
    # API about the run, not whichever cluster this machine started last; its raylet passes this on.
    with session_kv_kept(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard}")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": HEAD_CPUS, "temp_dir": temp_dir, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard})
    yield cluster
    head_port = int(cluster.head_node.gcs_address.rsplit(":", 1)[1])
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    cluster.remove_node(cluster.head_node)
    shutil.rmtree(temp_dir, ignore_errors=True)
    forget_cluster_record(head_port)


def add_node(cluster) -> None:
    with session_kv_kept():
        cluster.add_node(num_cpus=NODE_CPUS)


def with_worker_nodes(cluster, count: int) -> None:
    for node in list(cluster.worker_nodes)[count:]:
        cluster.remove_node(node)
    while len(cluster.worker_nodes) < count:
        add_node(cluster)


class Driver:
    """``python -m pipeline.pretrain`` against the cluster, its output in a file to show on failure."""

    def __init__(self, cluster, tmp_path: Path, features: str, name: str, storage: str, *settings: str) -> None:
        self.name, self.storage, self.tracking = name, resolve(storage), f"sqlite:///{tmp_path / 'mlflow.db'}"
        overrides = [f"name={name}", f"storage_path={storage}", f"data.features={features}",
                     f"validation.features={features}", "train.eval_batches=1", f"tracking.tracking_uri={self.tracking}",
                     "train.batch_size=4", f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={HOLD_STEP}",
                     "train.log_every=1", "train.figure_every=100",
                     f"scaling.cpus_per_worker={WORKER_CPUS}", f"testing.hold_at_step={HOLD_STEP}",
                     "testing.hold_s=240", *settings]
        command = [sys.executable, "-m", "pipeline.pretrain", "--config", "configs/pretrain/local-tiny.yaml",
                   *[arg for override in overrides for arg in ("--set", override)]]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
        self.log = tmp_path / "driver.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()[-6000:]

    def wait_for_checkpoint(self, step: int, timeout: float = 240) -> None:
        """Until Ray Train's controller has recorded the checkpoint of ``step`` (its snapshot in storage)."""
        snapshot = self.storage.join(self.name, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + timeout
        while not (snapshot.exists() and f"step-{step:08d}" in snapshot.read_bytes().decode()):
            assert self.process.poll() is None, f"the driver exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout:g} s:\n{self.output()}"
            time.sleep(0.5)

    def finish(self, timeout: float = 300) -> None:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the run did not finish within {timeout:g} s:\n{self.output()}")
        assert code == 0, self.output()

    def run(self):
        """The run's one MLflow run and a function giving a metric's history as (step, value) pairs."""
        client = MlflowClient(self.tracking)
        experiment = client.get_experiment_by_name("ssamba-local")
        runs = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{self.name}'")
        assert len(runs) == 1
        run = runs[0]

        def history(metric: str) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))

        return run, history

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_ddp_across_two_nodes_survives_losing_one_and_restarts_from_s3(cluster, s3_server, pretrain_features, tmp_path):
    """Losing a node kills its worker: Ray Train restarts the group from the last checkpoint, read back
    from the object store, on the replacement node."""
    with_worker_nodes(cluster, 1)
    s3_server.create_bucket("multinode")
    driver = Driver(cluster, tmp_path, pretrain_features, "two-nodes", "s3://multinode/runs", "scaling.num_workers=2",
                    "scaling.max_failures=2",
                    f"train.eval_every={HOLD_STEP}")  # evaluates before the loss and after the replacement
    try:
        driver.wait_for_checkpoint(HOLD_STEP)
        (lost,) = cluster.worker_nodes
        cluster.remove_node(lost)  # kills the worker on it: Ray Train restarts the group from the checkpoint
        add_node(cluster)  # where the restarted group's second worker goes
        driver.finish()
    finally:
        driver.stop()
    run, history = driver.run()
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(HOLD_STEP)
    assert [step for step, _ in history("loss")] == [1, 2, 3, 4]  # each step logged once, across the restart
    assert history("nodes") == [(step, 2) for step in range(1, 5)]  # before the loss and after the replacement
    assert history("world_size") == [(step, 2) for step in range(1, 5)]
    assert [step for step, _ in history("val_masked_accuracy")] == [HOLD_STEP, MAX_STEPS]
    assert driver.storage.join("two-nodes", f"step-{MAX_STEPS:08d}", "state.pt").exists()
    assert run.data.tags["checkpoint_location"] == "s3://multinode/runs/two-nodes"
    assert run.data.params["train.global_batch_size"] == "8"
    assert "system/cpu_utilization_percentage" not in run.data.metrics  # auto: off on the CPU
    # The artifacts sit beside the store, not in a worker's working directory inside Ray's session.
    assert run.info.artifact_uri == (tmp_path / "mlartifacts" / run.info.run_id / "artifacts").as_uri()
    assert (tmp_path / "mlartifacts" / run.info.run_id / "artifacts" / "model" / "ssamba_encoder.pt").stat().st_size > 0


def test_an_elastic_run_grows_to_a_new_node_and_keeps_its_global_batch(cluster, pretrain_features, tmp_path):
    with_worker_nodes(cluster, 0)  # room for one worker: the run starts with it
    driver = Driver(cluster, tmp_path, pretrain_features, "elastic", str(tmp_path / "ckpt"), "scaling.num_workers=[1, 2]",
                    "scaling.resize_interval_s=1", "validation=null")
    try:
        driver.wait_for_checkpoint(HOLD_STEP)
        add_node(cluster)  # room for a second worker: Ray Train resizes at its next look
        driver.finish()
    finally:
        driver.stop()
    run, history = driver.run()
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(HOLD_STEP)
    assert [step for step, _ in history("loss")] == [1, 2, 3, 4]
    assert history("world_size") == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert history("grad_accum") == [(1, 2), (2, 2), (3, 1), (4, 1)]  # 4 per worker x 1 x 2 = 4 x 2 x 1
    assert run.data.params["train.global_batch_size"] == "8" and not history("global_batch_size")
