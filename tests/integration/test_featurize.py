"""The featurize job end to end on real services: SeaweedFS over HTTP, a local Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from support.audio_files import BAD, GOOD, expected_fbank
from conftest import ACCESS_KEY, SECRET_KEY
from pipeline import featurize
from pipeline.config import FeaturizeConfig, load_config
from pipeline.data.storage import resolve
from pipeline.data.shards import DestinationConflict

pytestmark = pytest.mark.timeout(300)


def read_output(output, name: str):
    return pq.read_table(output.join(name).path, filesystem=output.filesystem).to_pylist()


def check_output(config: FeaturizeConfig, files: dict[str, bytes], uri_of) -> None:
    output = resolve(config.output, config.storage)
    features = read_output(output, "features")
    quarantine = read_output(output, "quarantine")
    assert sorted(row["uri"] for row in features) == sorted(uri_of(name) for name in GOOD)
    assert {row["uri"]: row["reason"] for row in quarantine} == {uri_of(name): reason for name, reason in BAD.items()}
    by_uri = {row["uri"]: row for row in features}
    for name in GOOD:
        row = by_uri[uri_of(name)]
        stored = torch.from_numpy(np.frombuffer(row["fbank"], dtype=np.float16).reshape(row["n_frames"], row["n_mels"]).copy())
        expected = expected_fbank(files[name])
        assert stored.shape == expected.shape
        torch.testing.assert_close(stored.float(), expected, atol=2e-2, rtol=2e-3)
        assert row["duration_s"] == pytest.approx(GOOD[name][4], abs=0.06)
        assert row["source_sample_rate"] == GOOD[name][2] and row["source_channels"] == GOOD[name][3]


def test_featurize_from_s3_quarantines_bad_files_and_resumes(s3_server, ray_cluster, collection):
    root, files = collection
    s3_server.create_bucket("raw")
    s3_server.create_bucket("features")
    s3_server.upload_folder(root, "raw", "corpus")
    config = load_config(FeaturizeConfig, None, [
        "input.uri=s3://raw/corpus", "output=s3://features/v1", "shard_size=4", "num_workers=2",
        f"storage.endpoint_url={s3_server.endpoint}",
        f"storage.access_key_id={ACCESS_KEY}", f"storage.secret_access_key={SECRET_KEY}",
    ])
    summary = featurize.run(config)
    assert summary.files == len(GOOD) and summary.rows == len(GOOD)
    assert summary.quarantined == {reason: 1 for reason in BAD.values()}
    assert summary.shards_written == 4  # 14 files in shards of 4
    check_output(config, files, lambda name: f"s3://raw/corpus/{name}")

    record_text = s3_server.client().get_object(Bucket="features", Key="v1/_run.json")["Body"].read().decode()
    record = json.loads(record_text)
    assert record["status"] == "complete" and record["summary"]["files"] == len(GOOD)
    assert SECRET_KEY not in record_text and ACCESS_KEY not in record_text  # credentials never stored
    assert record["versions"]["ray"] and record["config"]["shard_size"] == 4

    # A re-run resumes: a lost shard is redone, finished ones are skipped, nothing is duplicated.
    s3_server.client().delete_object(Bucket="features", Key="v1/features/part-00001.parquet")
    again = featurize.run(config)
    assert (again.shards_written, again.shards_skipped) == (1, 3)
    assert again.rows == summary.rows and again.quarantined == summary.quarantined
    check_output(config, files, lambda name: f"s3://raw/corpus/{name}")

    # Another configuration into the same destination is refused, unless overwriting.
    other = config.model_copy(update={"shard_size": 5})
    with pytest.raises(DestinationConflict, match="--overwrite"):
        featurize.run(other)
    replaced = featurize.run(other, overwrite=True)
    assert replaced.shards_written == 3 and replaced.rows == len(GOOD)


def test_featurize_local_folder_and_manifest_with_chunking(ray_cluster, collection, tmp_path):
    root, files = collection
    config = load_config(FeaturizeConfig, None, [f"input.uri={root}", f"output={tmp_path / 'local'}", "shard_size=8"])
    featurize.run(config)
    check_output(config, files, lambda name: str(root / name))

    manifest = root / "manifest.csv"
    manifest.write_text("uri,label,split,fold\n"
                        "good/tone_16k_mono.wav,dog,train,1\n"
                        "good/nested/long_16k.wav,rain,test,2\n"
                        "bad/text.wav,dog,train,3\n")
    config = load_config(FeaturizeConfig, None, [
        f"input.manifest={manifest}", f"output={tmp_path / 'manifest'}", "audio.max_seconds=1.0",
        "audio.long_audio=chunk",
    ])
    summary = featurize.run(config)
    assert summary.files == 2 and summary.rows == 4 and summary.quarantined == {"not_audio": 1}
    rows = read_output(resolve(config.output), "features")
    long_rows = sorted((r for r in rows if r["uri"].endswith("long_16k.wav")), key=lambda r: r["chunk"])
    assert [(r["chunk"], r["offset_s"], r["label"], r["split"], r["fold"]) for r in long_rows] == [
        (0, 0.0, "rain", "test", 2), (1, 1.0, "rain", "test", 2), (2, 2.0, "rain", "test", 2)]
    assert all(r["n_frames"] == 98 for r in long_rows)  # 1 s → 98 frames
