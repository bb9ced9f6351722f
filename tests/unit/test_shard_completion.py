"""When a featurize shard counts as done: its completion record matches its objects, or (written before
records existed) both Parquet footers read. Local destinations, no services."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import feature_store, featurize
from pipeline.storage import resolve


def tables(rows: int) -> tuple[pa.Table, pa.Table]:
    features = pa.Table.from_pylist([{"uri": f"/a/{i}.wav", "fbank": bytes(64 * i)} for i in range(rows)],
                                    schema=feature_store.FEATURE_SCHEMA)
    return features, pa.Table.from_pylist([{"uri": "/a/bad.wav", "reason": "empty", "detail": ""}],
                                          schema=feature_store.QUARANTINE_SCHEMA)


def truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_a_shard_counts_when_its_record_matches_its_objects(tmp_path):
    output = resolve(str(tmp_path))
    for shard in (0, 1, 2):
        featurize.write_shard(output, shard, *tables(5))
    record = json.loads((tmp_path / "done" / "part-00000.json").read_text())
    assert record["features"]["rows"] == 5 and record["quarantine"]["rows"] == 1
    assert record["features"]["bytes"] == (tmp_path / "features" / "part-00000.parquet").stat().st_size
    assert featurize._finished_shards(output) == {0, 1, 2}

    truncate(tmp_path / "features" / "part-00001.parquet")
    (tmp_path / "quarantine" / "part-00002.parquet").unlink()
    (tmp_path / "done" / "part-00007.json").write_text("{}")  # a record without objects
    assert featurize._finished_shards(output) == {0}


def test_shards_written_before_records_count_when_their_footers_read(tmp_path):
    output = resolve(str(tmp_path))
    for shard in (0, 1):
        featurize.write_shard(output, shard, *tables(3))
    for record in (tmp_path / "done").iterdir():
        record.unlink()
    truncate(tmp_path / "features" / "part-00001.parquet")
    assert featurize._finished_shards(output) == {0}
    assert sorted(path.name for path in (tmp_path / "done").iterdir()) == ["part-00000.json"]  # adopted once
    assert json.loads((tmp_path / "done" / "part-00000.json").read_text())["features"]["rows"] == 3
    assert featurize._finished_shards(output) == {0}


def test_partial_files_are_hidden_from_readers_and_removed(tmp_path):
    output = resolve(str(tmp_path))
    featurize.write_shard(output, 0, *tables(2))
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".partial")]
    hidden = tmp_path / "features" / ".part-00001.parquet.partial"  # what a killed write leaves now
    hidden.write_bytes(b"PAR1 half a file")
    assert pq.read_table(tmp_path / "features").num_rows == 2  # readers skip dot files
    legacy = tmp_path / "features" / "part-00099.parquet.partial"  # what it left before
    legacy.write_bytes(b"junk")
    featurize._remove_partials(output)
    assert not hidden.exists() and not legacy.exists()
    assert featurize._finished_shards(output) == {0}
