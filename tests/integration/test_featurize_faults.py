"""The featurize and embed commands (and pretraining's on-the-fly input) under faults, each run as its own
process: a store that goes away during the job, and a destination left with a truncated shard and a
partial file. The jobs join the session's Ray cluster; on-the-fly pretraining starts its own on 2 CPUs,
the size at which its input once waited forever for a CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from support.audio_files import GOOD, write_class_folders, write_collection
from conftest import ACCESS_KEY, SECRET_KEY, WeedServer
from pipeline import featurize
from pipeline.config import FeaturizeConfig, load_config

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def job_env(ray_cluster):
    """The environment of a job process: it joins the session's Ray cluster (``RAY_ADDRESS``) as a job
    submitted to a running cluster does, its Ray temp dir private (a job that starts its own Ray, with
    ``ray.address=local``, keeps its sockets there); the store's keys as AWS variables, never on the
    command line."""
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # unix socket paths must stay short
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, RAY_TMPDIR=ray_tmp,
               RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def job_process(module: str, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *[arg for item in overrides for arg in ("--set", item)]]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def featurize_process(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return job_process("pipeline.featurize", env, *overrides)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def wait_readable(weed: WeedServer, bucket: str, key: str) -> None:
    """A restarted store opens its S3 port before its volumes are back: wait for an object."""
    client, deadline = weed.s3.client(), time.monotonic() + 60
    while True:
        try:
            client.get_object(Bucket=bucket, Key=key)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(600)
def test_a_store_outage_fails_featurize_and_embed_and_marks_no_audio_bad(tmp_path, job_env):
    audio = write_collection(tmp_path / "audio") / "good"
    names = sorted(path.relative_to(audio).as_posix() for path in audio.rglob("*") if path.is_file())
    assert len(names) == len(GOOD)
    weed = WeedServer(Path(tempfile.mkdtemp(prefix="weed", dir=tmp_path))).start()
    try:
        weed.s3.create_bucket("raw")
        weed.s3.upload_folder(audio, "raw", "corpus")
        uris = [f"s3://raw/corpus/{name}" for name in names]
        absent = "s3://raw/corpus/absent.wav"  # not there: bad input, unlike a store that is down
        manifest = tmp_path / "manifest.csv"  # local: listing works while the store is down
        manifest.write_text("uri\n" + "".join(f"{uri}\n" for uri in [*uris, absent]))
        output = tmp_path / "features"
        settings = [f"input.manifest={manifest}", f"output={output}", "shard_size=3", "num_workers=2",
                    f"storage.endpoint_url={weed.endpoint}", "storage.max_attempts=2",
                    "storage.connect_timeout_s=1", "storage.request_timeout_s=2"]
        weed.s3.client().put_object(Bucket="raw", Key="manifest.csv", Body=manifest.read_bytes())
        weed.stop()

        listing = featurize_process(job_env, "input.uri=s3://raw/corpus", f"output={tmp_path / 'listed'}", *settings[3:])
        assert listing.returncode == 2, listing.stderr[-3000:]
        assert len(error_lines(listing)) == 1 and weed.endpoint in error_lines(listing)[0]
        stored_list = featurize_process(job_env, "input.manifest=s3://raw/manifest.csv", f"output={tmp_path / 'listed'}",
                                        *settings[3:])  # a manifest the failing store holds: not a bad manifest
        assert stored_list.returncode == 2, stored_list.stderr[-3000:]
        [message] = error_lines(stored_list)
        assert message.startswith("error: storage unavailable: input.manifest: cannot reach s3://raw/manifest.csv"), message
        assert weed.endpoint in message

        down = featurize_process(job_env, *settings)
        assert down.returncode == 2, down.stderr[-3000:]
        [message] = error_lines(down)
        assert message.startswith("error: storage unavailable") and weed.endpoint in message, message
        for folder in ("features", "quarantine", "done"):
            assert not list((output / folder).glob("*")), f"{folder}: a failed shard wrote something"

        embeddings = tmp_path / "embeddings"  # the embed job reads the same audio the same way
        embed = job_process("pipeline.embed", job_env, f"input.manifest={manifest}", f"output={embeddings}",
                            *settings[3:])
        assert embed.returncode == 2, embed.stderr[-3000:]
        [message] = error_lines(embed)
        assert message.startswith("error: storage unavailable") and weed.endpoint in message, message
        assert "re-run once it is back" in message and not list(embeddings.rglob("part-*")), "good audio marked failed"

        pretrain = subprocess.run(  # on-the-fly training input reads the same way: it stops, naming the store
            [sys.executable, "-m", "pipeline.pretrain", "--config", "configs/pretrain/local-tiny.yaml", *[
                arg for setting in (f"data.audio.manifest={manifest}", "data.features=null", "validation=null",
                                    f"storage_path={tmp_path / 'checkpoints'}", "scaling.max_failures=0",
                                    f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.batch_size=2",
                                    "train.max_steps=2", "ray.address=local", "ray.num_cpus=2", *settings[4:])
                for arg in ("--set", setting)]], env=job_env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert pretrain.returncode == 2, pretrain.stdout[-2000:] + pretrain.stderr[-3000:]
        [message] = error_lines(pretrain)
        assert message.startswith("error: storage unavailable") and weed.endpoint in message, message
        assert "resumes from its last checkpoint" in message, message

        weed.start()
        wait_readable(weed, "raw", f"corpus/{names[0]}")
        again = featurize_process(job_env, *settings)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "3 written, 0 already done" in again.stdout, again.stdout
        assert sorted(pq.read_table(output / "features").column("uri").to_pylist()) == uris
        quarantined = pq.read_table(output / "quarantine").to_pylist()
        assert [(row["uri"], row["reason"]) for row in quarantined] == [(absent, "unreadable")]
        resumed = job_process("pipeline.embed", job_env, f"input.manifest={manifest}", f"output={embeddings}",
                              *settings[3:])  # the same command, once the store is back: no --overwrite
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        rows = pq.read_table(embeddings).to_pylist()
        assert sorted(row["uri"] for row in rows) == sorted([*uris, absent])
        assert [row["uri"] for row in rows if not row["ok"]] == [absent]
    finally:
        weed.stop()


def test_resume_redoes_a_truncated_shard_and_removes_partial_files(ray_cluster, tmp_path, job_env):
    audio = write_class_folders(tmp_path / "audio", classes=2, per_class=4)
    uris = sorted(str(path) for path in audio.rglob("*.wav"))
    output = tmp_path / "features"
    settings = [f"input.uri={audio}", f"output={output}", "shard_size=3"]
    first = featurize.run(load_config(FeaturizeConfig, None, settings))
    assert (first.files, first.shards_written) == (8, 3)

    truncated = output / "features" / "part-00001.parquet"
    os.truncate(truncated, truncated.stat().st_size // 2)
    partial = output / "features" / "part-00099.parquet.partial"  # what a killed write used to leave
    partial.write_bytes(b"PAR1" + bytes(100))

    again = featurize_process(job_env, *settings)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 written, 2 already done" in again.stdout, again.stdout
    assert not partial.exists()
    assert sorted(pq.read_table(output / "features").column("uri").to_pylist()) == uris
