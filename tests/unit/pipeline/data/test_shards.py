"""When a shard of a sharded destination (a featurize run's, here) counts as done: its completion record
matches its objects, or (written before records existed) both Parquet footers read. Local destinations, no
services."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import feature_store
from pipeline.data.shards import DestinationConflict, deal_shards
from pipeline.data.sources import AudioSource
from pipeline.data.storage import resolve


def tables(rows: int) -> dict[str, pa.Table]:
    features = pa.Table.from_pylist([{"uri": f"/a/{i}.wav", "fbank": bytes(64 * i)} for i in range(rows)],
                                    schema=feature_store.FEATURE_SCHEMA)
    quarantine = pa.Table.from_pylist([{"uri": "/a/bad.wav", "reason": "empty", "detail": ""}],
                                      schema=feature_store.QUARANTINE_SCHEMA)
    return {feature_store.QUARANTINE: quarantine, feature_store.FEATURES: features}


def truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_a_shard_counts_when_its_record_matches_its_objects(tmp_path):
    output = feature_store.destination(resolve(str(tmp_path)))
    for shard in (0, 1, 2):
        output.write_shard(shard, tables(5))
    record = json.loads((tmp_path / "done" / "part-00000.json").read_text())
    assert record["features"]["rows"] == 5 and record["quarantine"]["rows"] == 1
    assert record["features"]["bytes"] == (tmp_path / "features" / "part-00000.parquet").stat().st_size
    assert output.finished_shards() == {0, 1, 2}

    truncate(tmp_path / "features" / "part-00001.parquet")
    (tmp_path / "quarantine" / "part-00002.parquet").unlink()
    (tmp_path / "done" / "part-00007.json").write_text("{}")  # a record without objects
    assert output.finished_shards() == {0}


def test_shards_written_before_records_count_when_their_footers_read(tmp_path):
    output = feature_store.destination(resolve(str(tmp_path)))
    for shard in (0, 1):
        output.write_shard(shard, tables(3))
    for record in (tmp_path / "done").iterdir():
        record.unlink()
    truncate(tmp_path / "features" / "part-00001.parquet")
    assert output.finished_shards() == {0}
    assert sorted(path.name for path in (tmp_path / "done").iterdir()) == ["part-00000.json"]  # adopted once
    assert json.loads((tmp_path / "done" / "part-00000.json").read_text())["features"]["rows"] == 3
    assert output.finished_shards() == {0}


def test_partial_files_are_hidden_from_readers_and_removed(tmp_path):
    output = feature_store.destination(resolve(str(tmp_path)))
    output.write_record({"fingerprint": "these settings"})
    output.write_shard(0, tables(2))
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".partial")]
    hidden = tmp_path / "features" / ".part-00001.parquet.partial"  # what a killed write leaves now
    hidden.write_bytes(b"PAR1 half a file")
    assert pq.read_table(tmp_path / "features").num_rows == 2  # readers skip dot files
    legacy = tmp_path / "features" / "part-00099.parquet.partial"  # what it left before
    legacy.write_bytes(b"junk")
    output.prepare("these settings", overwrite=False, made_of="features")  # a re-run with the same settings
    assert not hidden.exists() and not legacy.exists()
    assert output.finished_shards() == {0}


def test_a_destination_of_other_settings_or_of_no_run_is_refused_unless_overwritten(tmp_path):
    output = feature_store.destination(resolve(str(tmp_path)))
    output.write_record({"fingerprint": "these settings"})
    output.write_shard(0, tables(2))
    with pytest.raises(DestinationConflict, match="holds features of another input or configuration.*--overwrite"):
        output.prepare("other settings", overwrite=False, made_of="features")
    (tmp_path / feature_store.RUN_RECORD).unlink()
    with pytest.raises(DestinationConflict, match="holds no features of this job.*--overwrite"):
        output.prepare("these settings", overwrite=False, made_of="features")
    output.prepare("other settings", overwrite=True, made_of="features")
    assert not list(tmp_path.iterdir())


def test_shards_are_dealt_in_a_seeded_random_order_keeping_member_runs_together():
    files = [AudioSource(f"/data/class{label}/clip{index:02d}.wav", f"class{label}") for label in range(4) for index in range(32)]
    table = [AudioSource(f"s3://b/t.parquet#{row}") for row in range(100)]
    shards = deal_shards(list(reversed(files)) + table, shard_size=32)
    assert shards == deal_shards(files + table, shard_size=32)  # the same input, the same shards
    assert sorted(source for shard in shards.values() for source in shard) == sorted(files + table)
    assert list(shards) == list(range(8)) and all(len(shard) == 32 for shard in list(shards.values())[:-1])
    for shard in deal_shards(files, shard_size=32).values():  # no shard is one class folder
        labels = [source.label for source in shard]
        assert max(labels.count(label) for label in set(labels)) <= 0.5 * len(labels)
    order = [int(source.uri.split("#")[1]) for shard in shards.values() for source in shard if "#" in source.uri]
    positions = {row: index for index, row in enumerate(order)}
    assert [positions[row + 1] - positions[row] for row in range(63)] == [1] * 63  # rows 0-63: one run
    assert deal_shards(files, 32, first_shard=5).keys() == {5, 6, 7, 8}


def test_a_feature_shard_stores_its_fbanks_raw_and_the_rest_zstd_compressed(tmp_path):
    """Fbanks are read every epoch and barely compress: stored without compression or dictionary. The
    other columns and the quarantine table stay zstd-compressed."""
    feature_store.destination(resolve(str(tmp_path))).write_shard(0, tables(5))
    written = pq.ParquetFile(tmp_path / "features" / "part-00000.parquet").metadata.row_group(0)
    columns = {written.column(i).path_in_schema: written.column(i) for i in range(written.num_columns)}
    assert columns["fbank"].compression == "UNCOMPRESSED" and not columns["fbank"].has_dictionary_page
    assert {chunk.compression for name, chunk in columns.items() if name != "fbank"} == {"ZSTD"}
    quarantine = pq.ParquetFile(tmp_path / "quarantine" / "part-00000.parquet").metadata.row_group(0)
    assert {quarantine.column(i).compression for i in range(quarantine.num_columns)} == {"ZSTD"}
    assert pq.read_table(tmp_path / "features").equals(tables(5)[feature_store.FEATURES])
