"""Corpus formats and growing corpora on the real S3 server: WebDataset tar shards, Parquet audio
tables, and re-runs over an input that gained and lost files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from support.audio_files import bad_file_bytes, encode, expected_fbank, parquet_table, signal
from conftest import ACCESS_KEY, SECRET_KEY
from pipeline import featurize
from pipeline.data import feature_store
from pipeline.config import FeaturizeConfig, load_config
from pipeline.data.storage import resolve
from pipeline.data.shards import DestinationConflict, shard_name

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def s3_config(s3_server, *overrides: str) -> FeaturizeConfig:
    return load_config(FeaturizeConfig, None, [
        f"storage.endpoint_url={s3_server.endpoint}", f"storage.access_key_id={ACCESS_KEY}",
        f"storage.secret_access_key={SECRET_KEY}", "num_workers=2", *overrides])


def wav(seconds: float, seed: int) -> bytes:
    return encode(signal(16_000, 1, seconds, seed), 16_000, "WAV", "PCM_16")


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def stored(output, name: str) -> list[dict]:
    return pq.read_table(output.join(name).path, filesystem=output.filesystem).to_pylist()


def test_webdataset_tar_and_parquet_audio_are_featurized_member_by_member(s3_server, ray_cluster):
    bad = bad_file_bytes()
    flac = encode(signal(44_100, 2, 0.7, seed=3), 44_100, "FLAC", "PCM_16")
    tar_members = {
        "a.flac": flac, "a.cls": b"dog\n",
        "sub/b.wav": wav(0.5, 4), "sub/b.json": json.dumps({"label": "cat", "id": 7}).encode(),
        "c.wav": bad["bad/text.wav"], "c.cls": b"dog",
        "d.wav": bad["bad/truncated.wav"],
        "e.txt": b"not audio, skipped",
    }
    table_rows = [
        {"audio": {"bytes": wav(0.4, 5), "path": "r0.wav"}, "label": "rain"},
        {"audio": {"bytes": b"", "path": "r1.wav"}, "label": "rain"},
        {"audio": {"bytes": wav(0.3, 6), "path": "r2.wav"}, "label": "wind"},
        {"audio": {"bytes": bad["bad/nan.wav"], "path": "r3.wav"}, "label": "wind"},
        {"audio": {"bytes": wav(0.6, 7), "path": "r4.wav"}, "label": "sea"},
    ]
    s3_server.create_bucket("corpora")
    client = s3_server.client()
    client.put_object(Bucket="corpora", Key="mixed/shard-000000.tar", Body=tar_bytes(tar_members))
    client.put_object(Bucket="corpora", Key="mixed/table/train-00000.parquet", Body=parquet_table(table_rows))
    config = s3_config(s3_server, "input.uri=s3://corpora/mixed", "output=s3://corpora/features", "shard_size=3")

    summary = featurize.run(config)

    tar_uri, table_uri = "s3://corpora/mixed/shard-000000.tar", "s3://corpora/mixed/table/train-00000.parquet"
    assert (summary.files, summary.rows) == (5, 5)
    assert summary.quarantined == {"not_audio": 1, "truncated": 1, "empty": 1, "non_finite": 1}
    assert summary.added == 9 and summary.shards_written == 3
    output = resolve(config.output, config.storage)
    rows = {row["uri"]: row for row in stored(output, "features")}
    assert {uri: row["label"] for uri, row in rows.items()} == {
        f"{tar_uri}#a.flac": "dog", f"{tar_uri}#sub/b.wav": "cat",
        f"{table_uri}#0": "rain", f"{table_uri}#2": "wind", f"{table_uri}#4": "sea"}
    assert {row["uri"]: row["reason"] for row in stored(output, "quarantine")} == {
        f"{tar_uri}#c.wav": "not_audio", f"{tar_uri}#d.wav": "truncated",
        f"{table_uri}#1": "empty", f"{table_uri}#3": "non_finite"}
    for uri, data in [(f"{tar_uri}#a.flac", flac), (f"{table_uri}#4", table_rows[4]["audio"]["bytes"])]:
        row = rows[uri]
        features = np.frombuffer(row["fbank"], dtype=np.float16).reshape(row["n_frames"], row["n_mels"])
        torch.testing.assert_close(torch.from_numpy(features.astype(np.float32)), expected_fbank(data),
                                   atol=2e-2, rtol=2e-3)
    assert rows[f"{tar_uri}#a.flac"]["source_channels"] == 2

    record = json.loads(output.join(feature_store.RUN_RECORD).read_bytes())
    assert record["status"] == "complete" and record["sources"] == 9

    # A manifest may name members, relative to its own folder. A table with a corrupt row group
    # quarantines that group's rows (the store serves the bytes: not an outage) and reads the rest.
    client.put_object(Bucket="corpora", Key="mixed/damaged.parquet", Body=parquet_table(table_rows, corrupt_group=1))
    manifest = ('{"uri": "shard-000000.tar#sub/b.wav", "label": "owl"}\n'
                '{"uri": "table/train-00000.parquet#3", "label": "wind"}\n'
                '{"uri": "damaged.parquet#0"}\n{"uri": "damaged.parquet#2"}\n')
    client.put_object(Bucket="corpora", Key="mixed/manifest.jsonl", Body=manifest.encode())
    listed = s3_config(s3_server, "input.manifest=s3://corpora/mixed/manifest.jsonl",
                       "output=s3://corpora/from-manifest")
    summary = featurize.run(listed)
    assert (summary.files, summary.quarantined) == (2, {"non_finite": 1, "corrupt": 1})
    features = stored(resolve(listed.output, listed.storage), "features")
    assert sorted((row["uri"], row["label"]) for row in features) == [
        ("s3://corpora/mixed/damaged.parquet#0", None), (f"{tar_uri}#sub/b.wav", "owl")]
    [corrupt] = [row for row in stored(resolve(listed.output, listed.storage), "quarantine")
                 if row["reason"] == "corrupt"]
    assert corrupt["uri"] == "s3://corpora/mixed/damaged.parquet#2" and "row group 1" in corrupt["detail"]


def test_a_grown_input_featurizes_only_its_new_files(s3_server, ray_cluster):
    s3_server.create_bucket("growing")
    client = s3_server.client()
    for index in range(6):
        client.put_object(Bucket="growing", Key=f"audio/clip{index}.wav", Body=wav(0.2, index))
    config = s3_config(s3_server, "input.uri=s3://growing/audio", "output=s3://growing/features", "shard_size=4")
    first = featurize.run(config)
    assert (first.added, first.shards_written, first.files) == (6, 2, 6)
    output = resolve(config.output, config.storage)
    before = {info.path: info.mtime for info in output.filesystem.get_file_info(
        pafs.FileSelector(output.join("features").path))}

    for index in range(6, 9):
        client.put_object(Bucket="growing", Key=f"audio/clip{index}.wav", Body=wav(0.2, index))
    client.delete_object(Bucket="growing", Key="audio/clip2.wav")
    grown = featurize.run(config)

    assert grown.added == 3 and (grown.shards_written, grown.shards_skipped) == (1, 2)
    assert grown.missing == ["s3://growing/audio/clip2.wav"]  # reported; its features are kept
    assert grown.files == 9 and "1 sources of earlier runs are no longer in the input" in grown.table()
    new_rows = pq.read_table(output.join("features", shard_name(2)).path,
                             filesystem=output.filesystem).column("uri").to_pylist()
    assert sorted(new_rows) == [f"s3://growing/audio/clip{index}.wav" for index in range(6, 9)]
    after = {info.path: info.mtime for info in output.filesystem.get_file_info(
        pafs.FileSelector(output.join("features").path))}
    assert {path: after[path] for path in before} == before  # the earlier shards were not rewritten

    again = featurize.run(config)  # nothing new: nothing to do
    assert (again.added, again.shards_written, again.shards_skipped) == (0, 0, 3)

    # Other settings over the same destination are still refused.
    with pytest.raises(DestinationConflict, match="--overwrite"):
        featurize.run(config.model_copy(update={"num_mel_bins": 64}))
    with pytest.raises(DestinationConflict, match="--overwrite"):
        featurize.run(config.model_copy(update={"shard_size": 5}))


def test_a_container_that_cannot_be_opened_is_quarantined_as_one_row_and_the_rest_featurized(tmp_path):
    """``python -m pipeline.featurize`` over a folder of Parquet audio tables, one of them with a footer that
    does not decode: the job exits 0, every good row is stored, and the damaged table is one quarantine row
    with its reason (its rows cannot be named)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"audio": {"bytes": wav(0.4, seed), "path": f"r{seed}.wav"}, "label": "rain"} for seed in range(3)]
    (corpus / "good-0.parquet").write_bytes(parquet_table(rows[:2]))
    (corpus / "good-1.parquet").write_bytes(parquet_table(rows[2:]))
    damaged = parquet_table(rows)
    (corpus / "damaged.parquet").write_bytes(damaged[:-20] + b"\0" * 20)  # the footer and its length overwritten
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.featurize", "--set", f"input.uri={corpus}",
                           "--set", f"output={tmp_path / 'features'}", "--set", "ray.address=local",
                           "--set", "ray.num_cpus=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    features = pq.read_table(tmp_path / "features" / "features").to_pylist()
    assert sorted(row["uri"] for row in features) == [
        f"{corpus}/good-0.parquet#0", f"{corpus}/good-0.parquet#1", f"{corpus}/good-1.parquet#0"]
    (quarantined,) = pq.read_table(tmp_path / "features" / "quarantine").to_pylist()
    assert quarantined["uri"] == f"{corpus}/damaged.parquet" and quarantined["reason"] == "corrupt"
    assert "cannot decode its footer" in quarantined["detail"]
    assert "quarantined 1 files" in done.stdout
