"""A destination written shard by shard, so that a stopped job resumes where it stopped.

The featurize and embed jobs both write their output this way (docs/pipeline.md#failing-stores-and-interrupted-shards):

* a *plan* (``_plan.parquet``) deals the sources into numbered shards before any shard is written, in a
  seeded random order; a re-run keeps every planned source in its shard and deals only new sources
  into new shards, so nothing is done twice;
* each shard's Parquet objects (one per data folder) are written first, then its *completion record*
  (``{folder: {rows, bytes}}``); a shard counts as done only when its record matches its objects, so a
  shard cut off by a crash, an outage or a SIGKILL is redone, never half-kept;
* a *run record* holds the fingerprint of the settings that shape the output: a re-run with other
  settings is refused unless it overwrites.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.reading import StorageUnavailable, split_uri
from pipeline.data.sources import AudioSource
from pipeline.data.storage import PARTIAL_SUFFIX, Location

PLAN = "_plan.parquet"
PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("source", pa.string())])
IO_THREADS = 16  # concurrent small requests when checking finished shards
SHARD_SEED = 0x55A3BA  # fixed: the same input always gives the same shards
MEMBER_RUN = 64  # consecutive members of one container stay together (one row group read, not 64)


class DestinationConflict(RuntimeError):
    """The destination holds output of other settings, or something that no run of the job wrote."""


@contextlib.contextmanager
def storage_errors(location: Location) -> Iterator[None]:
    """Storage errors at ``location`` stop the job with one line that names it, not a traceback."""
    try:
        yield
    except OSError as error:
        raise StorageUnavailable(f"storage unavailable: {location}: {error}") from error


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def record_name(shard: int) -> str:
    return f"part-{shard:05d}.json"


def parquet_bytes(table: pa.Table, raw_columns: Sequence[str] = ()) -> bytes:
    """``table`` as one Parquet object, zstd-compressed, except ``raw_columns``: those are stored as they
    are, without compression or dictionary, for dense numbers that compress poorly and are read often
    (the feature store's fbanks: see :data:`pipeline.data.feature_store.RAW_COLUMNS`)."""
    raw = set(raw_columns) & set(table.column_names)
    compression = {name: "none" if name in raw else "zstd" for name in table.column_names}
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=compression,
                   use_dictionary=[name for name in table.column_names if name not in raw])
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Which source goes to which shard
# --------------------------------------------------------------------------------------------------


def _member_order(source: AudioSource) -> tuple:
    """Container members in their natural order (Parquet rows by number, tar members by name)."""
    container, member = split_uri(source.uri)
    return (container, int(member) if member and member.isdigit() else -1, member or "")


def deal_shards(sources: list[AudioSource], shard_size: int, first_shard: int = 0) -> dict[int, list[AudioSource]]:
    """Sources dealt into shards in a seeded random order of *units*: a loose file, or a run of up to
    :data:`MEMBER_RUN` consecutive members of one container. Deterministic for a given list."""
    units: list[list[AudioSource]] = []
    by_container: dict[str, list[AudioSource]] = {}
    for source in sorted(sources, key=_member_order):
        container, member = split_uri(source.uri)
        if member is None:
            units.append([source])
        else:
            by_container.setdefault(container, []).append(source)
    for members in by_container.values():
        units += [members[start : start + MEMBER_RUN] for start in range(0, len(members), MEMBER_RUN)]
    random.Random(SHARD_SEED).shuffle(units)
    ordered = [source for unit in units for source in unit]
    return {first_shard + index: ordered[start : start + shard_size]
            for index, start in enumerate(range(0, len(ordered), shard_size))}


# --------------------------------------------------------------------------------------------------
# The destination
# --------------------------------------------------------------------------------------------------


class ShardedDestination:
    """``output/<folder>/part-NNNNN.parquet`` for each data folder, ``output/<records>/part-NNNNN.json``
    for the completion records, ``output/_plan.parquet`` and the job's run record ``output/<run_record>``;
    ``raw_columns`` are written uncompressed (see :func:`parquet_bytes`)."""

    def __init__(self, output: Location, folders: tuple[str, ...], records: str, run_record: str,
                 raw_columns: tuple[str, ...] = ()) -> None:
        self.output, self.folders, self.records, self.run_record = output, folders, records, run_record
        self.raw_columns = raw_columns

    def prepare(self, fingerprint: str, overwrite: bool, made_of: str) -> None:
        """Resume or grow a destination made with these settings; refuse any other unless ``overwrite``
        (which empties it). ``made_of`` says what the job writes, for the messages."""
        record = self.output.join(self.run_record)
        if overwrite:
            self.output.delete_contents()
            return
        if record.exists():
            if json.loads(record.read_bytes()).get("fingerprint") != fingerprint:
                raise DestinationConflict(
                    f"{self.output} holds {made_of} of another input or configuration; choose another output or "
                    "pass --overwrite to replace them")
        elif self.output.filesystem.get_file_info(pafs.FileSelector(self.output.path, allow_not_found=True)):
            raise DestinationConflict(f"{self.output} is not empty and holds no {made_of} of this job; choose another "
                                      "output or pass --overwrite to replace it")
        self._remove_partials()

    def write_record(self, fields: dict) -> None:
        self.output.join(self.run_record).write_bytes(json.dumps(fields, indent=2).encode())

    def read_record(self) -> dict:
        location = self.output.join(self.run_record)
        return json.loads(location.read_bytes()) if location.exists() else {}

    # The plan ------------------------------------------------------------------------------------

    def read_plan(self) -> dict[int, list[AudioSource]]:
        location = self.output.join(PLAN)
        if not location.exists():
            return {}
        plan: dict[int, list[AudioSource]] = {}
        for row in pq.read_table(io.BytesIO(location.read_bytes())).to_pylist():
            plan.setdefault(row["shard"], []).append(AudioSource.from_dict(json.loads(row["source"])))
        return plan

    def grow_plan(self, sources: list[AudioSource], shard_size: int) -> tuple[dict[int, list[AudioSource]],
                                                                            list[AudioSource], list[str]]:
        """The plan with the sources it lacks dealt into new shards, written before any shard is:
        ``(plan, added, missing)``, missing being planned URIs no longer in ``sources``."""
        plan = self.read_plan()
        planned = {source.uri for shards in plan.values() for source in shards}
        added = [source for source in sources if source.uri not in planned]
        missing = sorted(planned - {source.uri for source in sources})
        if added:
            plan.update(deal_shards(added, shard_size, first_shard=max(plan, default=-1) + 1))
            rows = [{"shard": shard, "source": json.dumps(source.to_dict(), sort_keys=True)}
                    for shard, members in sorted(plan.items()) for source in members]
            self.output.join(PLAN).write_bytes(parquet_bytes(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)))
        return plan, added, missing

    # Shards ----------------------------------------------------------------------------------------

    def write_shard(self, shard: int, tables: dict[str, pa.Table]) -> None:
        """Each folder's object of the shard, then its completion record (``{folder: {rows, bytes}}``). The
        record comes last, so a shard whose record matches its objects is complete."""
        record = {}
        for folder, table in tables.items():
            data = parquet_bytes(table, self.raw_columns)
            self.output.join(folder, shard_name(shard)).write_bytes(data)
            record[folder] = {"rows": table.num_rows, "bytes": len(data)}
        self._write_shard_record(shard, record)

    def shard_rows(self, shard: int, folder: str) -> int:
        """The rows of a finished shard's object in ``folder``, as its completion record gives them."""
        return json.loads(self.output.join(self.records, record_name(shard)).read_bytes())[folder]["rows"]

    def _write_shard_record(self, shard: int, record: dict[str, dict[str, int]]) -> None:
        self.output.join(self.records, record_name(shard)).write_bytes(json.dumps(record, sort_keys=True).encode())

    def finished_shards(self) -> set[int]:
        """Shards that are complete: every folder's object there, with the sizes their completion record
        gives. A shard without a record (written before records existed, or by a run stopped just before
        its record) counts when every object's Parquet footer reads. Any other shard is redone."""
        sizes = {folder: self._part_sizes(folder, ".parquet") for folder in self.folders}
        records = self._part_sizes(self.records, ".json")
        candidates = sorted(set.intersection(*(set(by_shard) for by_shard in sizes.values())))

        def complete(shard: int) -> bool:
            objects = {folder: by_shard[shard] for folder, by_shard in sizes.items()}
            return self._record_matches(shard, objects) if shard in records else self._adopt_shard(shard, objects)

        with ThreadPoolExecutor(IO_THREADS) as pool:  # one small request or two per shard: overlap them
            return {shard for shard, whole in zip(candidates, pool.map(complete, candidates)) if whole}

    def _part_sizes(self, folder: str, suffix: str) -> dict[int, int]:
        """``{shard: bytes}`` of the ``part-NNNNN<suffix>`` files in a folder of the destination."""
        location = self.output.join(folder)
        pattern = re.compile(rf"part-(\d+){re.escape(suffix)}")
        selector = pafs.FileSelector(location.path, allow_not_found=True)
        return {int(match.group(1)): info.size for info in location.filesystem.get_file_info(selector)
                if (match := pattern.fullmatch(info.base_name))}

    def _record_matches(self, shard: int, sizes: dict[str, int]) -> bool:
        try:
            record = json.loads(self.output.join(self.records, record_name(shard)).read_bytes())
            return all(record[folder]["bytes"] == size for folder, size in sizes.items())
        except (ValueError, KeyError, TypeError):  # not a record we wrote
            return False

    def _adopt_shard(self, shard: int, sizes: dict[str, int]) -> bool:
        """Whether a shard without a record is whole (every Parquet footer reads); if so its record is
        written, so the footers are read once."""
        record = {}
        for folder, size in sizes.items():
            location = self.output.join(folder, shard_name(shard))
            try:
                rows = pq.read_metadata(location.path, filesystem=location.filesystem).num_rows
            except pa.ArrowInvalid:  # truncated or not Parquet
                return False
            record[folder] = {"rows": rows, "bytes": size}
        self._write_shard_record(shard, record)
        return True

    def _remove_partials(self) -> None:
        """Delete the ``*.partial`` files that interrupted local writes left: no reader may take them for
        data (their shards have no matching record, so they are redone)."""
        selector = pafs.FileSelector(self.output.path, recursive=True, allow_not_found=True)
        for info in self.output.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.endswith(PARTIAL_SUFFIX):
                self.output.filesystem.delete_file(info.path)
