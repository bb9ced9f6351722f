"""``python -m pipeline.featurize``: decode audio from object storage and store its fbank features.

    python -m pipeline.featurize --config configs/featurize/<preset>.yaml [--set key=value ...] [--overwrite]

Sources are loose audio files, WebDataset tar members or Parquet audio rows (``pipeline.sources``).
They are dealt into shards of ``shard_size`` in a seeded random order, so every shard is a mix of the
whole input (class folders and per-speaker tars do not end up one per shard), yet the same input
always gives the same shards. The assignment is stored (``_plan.parquet``) before any work. A Ray
Data actor pool featurizes one shard per call: it reads each source, decodes it (mono, 16 kHz, DC
removed) and computes the raw Kaldi log-mel fbank with ``ssamba.features``, then writes the shard as
one Parquet object of features, one of quarantined sources (URI + reason) and, last, a completion
record with both objects' row counts and sizes. A re-run resumes: it skips the shards whose record
matches their objects and redoes the others (a lost or truncated object, an interrupted write), after
deleting the ``*.partial`` files that interrupted local writes leave.

Only a source that is not there or cannot be decoded is quarantined. A store that fails (unreachable,
timing out, throttling, refusing the credentials) is retried a few times, then the job stops with one
line naming it; the shards it could not read are not written, so a re-run once the store is back
does them.

A re-run over a grown input (new files under the same prefix or manifest) deals only the new sources
into new shards and reports how many were added; sources that disappeared are reported and their
features kept. A destination written with other settings (fbank, audio, shard size) or from another
input location is refused unless ``--overwrite`` is given. Nothing is ever written twice.

Output under the destination::

    features/part-00000.parquet     uri, label, split, fold, chunk, offset_s, duration_s,
                                    source_sample_rate, source_channels, n_frames, n_mels,
                                    fbank (float16 bytes, n_frames × n_mels, row-major)
    quarantine/part-00000.parquet   uri, reason, detail
    done/part-00000.json            rows and bytes of both objects, written last: the shard is complete
                                    (a shard without one, from before records existed, counts when both
                                    Parquet footers read; its record is written then)
    _plan.parquet                   shard, source (JSON): which source went to which shard
    _run.json                       config (no credentials), settings fingerprint, counts, versions
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import platform
import random
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.audio import AudioError
from pipeline.config import AudioConfig, FeaturizeConfig, public_dict
from pipeline.feature_store import FEATURE_SCHEMA, QUARANTINE_SCHEMA
from pipeline.launch import connect_ray, run_command, source_inputs
from pipeline.reading import SourceReader, StorageUnavailable, featurize_source, read_source, split_uri, stop_on_storage_failure
from pipeline.sources import AudioSource, SourceError, list_sources
from pipeline.storage import PARTIAL_SUFFIX, Location, S3Config, resolve
from ssamba.features import FbankConfig

FORMAT_VERSION = 2  # 2: sources dealt into shards in a seeded random order, recorded in the plan
RUN_RECORD, PLAN = "_run.json", "_plan.parquet"
FEATURES, QUARANTINE, DONE = "features", "quarantine", "done"  # folders of the destination
IO_THREADS = 16  # concurrent small requests when checking finished shards
SHARD_SEED = 0x55A3BA  # fixed: the same input always gives the same shards
MEMBER_RUN = 64  # consecutive members of one container stay together (one row group read, not 64)

PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("source", pa.string())])


class FeaturizeError(RuntimeError):
    """The job cannot start (destination conflict) or could not finish."""


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


def _read_plan(output: Location) -> dict[int, list[AudioSource]]:
    location = output.join(PLAN)
    if not location.exists():
        return {}
    plan: dict[int, list[AudioSource]] = {}
    for row in pq.read_table(io.BytesIO(location.read_bytes())).to_pylist():
        plan.setdefault(row["shard"], []).append(AudioSource.from_dict(json.loads(row["source"])))
    return plan


def _write_plan(output: Location, plan: dict[int, list[AudioSource]]) -> None:
    rows = [{"shard": shard, "source": json.dumps(source.to_dict(), sort_keys=True)}
            for shard, sources in sorted(plan.items()) for source in sources]
    output.join(PLAN).write_bytes(_parquet_bytes(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)))


# --------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------


def featurize_shard(sources: list[AudioSource], reader: SourceReader, audio: AudioConfig,
                    fbank_config: FbankConfig) -> tuple[pa.Table, pa.Table]:
    """Features and quarantine tables of one shard; a bad source becomes a quarantine row, never an error.
    A failing store raises :class:`StorageUnavailable` (see :func:`read_source`)."""
    features, quarantine = [], []
    for source in sources:
        try:
            rows = featurize_source(read_source(reader, source.uri), source.uri, audio, fbank_config)
        except OSError as error:  # the file is not there
            quarantine.append({"uri": source.uri, "reason": "unreadable", "detail": str(error)[:500]})
            continue
        except AudioError as error:
            quarantine.append({"uri": source.uri, "reason": error.reason, "detail": error.detail[:500]})
            continue
        features += [{**source.to_dict(), **row} for row in rows]
    return (pa.Table.from_pylist(features, schema=FEATURE_SCHEMA),
            pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _write_record(output: Location, shard: int, record: dict[str, dict[str, int]]) -> None:
    output.join(DONE, record_name(shard)).write_bytes(json.dumps(record, sort_keys=True).encode())


def write_shard(output: Location, shard: int, features: pa.Table, quarantine: pa.Table) -> None:
    """The shard's quarantine and features objects, then its completion record (``{folder: {rows,
    bytes}}``). The record comes last, so a shard whose record matches its objects is complete."""
    record = {}
    for folder, table in ((QUARANTINE, quarantine), (FEATURES, features)):
        data = _parquet_bytes(table)
        output.join(folder, shard_name(shard)).write_bytes(data)
        record[folder] = {"rows": table.num_rows, "bytes": len(data)}
    _write_record(output, shard, record)


class ShardFeaturizer:
    """The Ray Data actor: featurizes and writes one shard per row of its input batch."""

    def __init__(self, config: FeaturizeConfig) -> None:
        torch.set_num_threads(1)  # one actor per CPU: threads inside would only contend
        self.config = config
        self.reader = SourceReader(config.storage)
        self.fbank_config = config.fbank_config()
        self.output = resolve(config.output, config.storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files, started, finished = [], [], []
        for shard, sources_json in zip(batch["shard"], batch["sources"]):
            started.append(time.time())
            sources = [AudioSource.from_dict(item) for item in json.loads(sources_json)]
            features, quarantine = featurize_shard(sources, self.reader, self.config.audio, self.fbank_config)
            with storage_errors(self.output):
                write_shard(self.output, int(shard), features, quarantine)
            files.append(len(sources))
            finished.append(time.time())
        return {"shard": batch["shard"], "files": np.array(files), "started": np.array(started),
                "finished": np.array(finished)}


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    destination: str
    files: int = 0
    rows: int = 0
    hours: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_skipped: int = 0
    added: int = 0  # sources new to the destination in this run (all of them on a first run)
    missing: list[str] = field(default_factory=list)  # planned earlier, no longer in the input (features kept)
    files_per_second: float | None = None  # this run, from the first shard started to the last written

    def to_dict(self) -> dict:
        return {"files": self.files, "rows": self.rows, "hours": self.hours, "quarantined": self.quarantined,
                "shards_written": self.shards_written, "shards_skipped": self.shards_skipped,
                "added": self.added, "missing": len(self.missing), "files_per_second": self.files_per_second}

    def table(self) -> str:
        lines = [
            f"featurize summary for {self.destination}",
            f"  shards      {self.shards_written} written, {self.shards_skipped} already done"
            + (f" ({self.files_per_second:.1f} files/s)" if self.files_per_second else ""),
            f"  input       {self.added} sources added this run",
            f"  processed   {self.files} files → {self.rows} rows, {self.hours:.3f} h of audio",
            f"  quarantined {sum(self.quarantined.values())} files",
        ]
        lines += [f"    {reason:<20} {count}" for reason, count in sorted(self.quarantined.items())]
        if self.missing:
            lines.append(f"  missing     {len(self.missing)} sources of earlier runs are no longer in the input; "
                         "their features are kept (--overwrite drops them), e.g.")
            lines += [f"    {uri}" for uri in self.missing[:5]]
        return "\n".join(lines)


def fingerprint(config: FeaturizeConfig) -> str:
    """Identifies how a destination was made: the input's location and every setting that shapes the
    output. The sources themselves are not in it: a grown input adds shards to the same destination."""
    payload = {
        "format": FORMAT_VERSION, "shard_size": config.shard_size, "num_mel_bins": config.num_mel_bins,
        "audio": config.audio.model_dump(), "input": config.input.model_dump(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import ray
    import soundfile

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pa.__version__, "soundfile": soundfile.__version__,
            "libsndfile": soundfile.__libsndfile_version__}


def _prepare_destination(output: Location, settings: str, overwrite: bool) -> None:
    """Resume or grow a destination made with these settings, refuse any other unless ``overwrite``."""
    record_location = output.join(RUN_RECORD)
    if overwrite:
        output.delete_contents()
        return
    if record_location.exists():
        record = json.loads(record_location.read_bytes())
        if record.get("fingerprint") != settings:
            raise FeaturizeError(
                f"{output} holds features of another input location or configuration (fbank, audio or shard "
                "settings); choose another output or pass --overwrite to replace them"
            )
    elif output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True)):
        raise FeaturizeError(f"{output} is not empty and holds no featurize run; pass --overwrite to replace it")


def _remove_partials(output: Location) -> None:
    """Delete the ``*.partial`` files that interrupted local writes left: no reader may take them for
    data (their shards have no matching record, so they are redone)."""
    selector = pafs.FileSelector(output.path, recursive=True, allow_not_found=True)
    for info in output.filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.endswith(PARTIAL_SUFFIX):
            output.filesystem.delete_file(info.path)


def _part_sizes(folder: Location, suffix: str) -> dict[int, int]:
    """``{shard: bytes}`` of the ``part-NNNNN<suffix>`` files in a folder of the destination."""
    pattern = re.compile(rf"part-(\d+){re.escape(suffix)}")
    selector = pafs.FileSelector(folder.path, allow_not_found=True)
    return {int(match.group(1)): info.size for info in folder.filesystem.get_file_info(selector)
            if (match := pattern.fullmatch(info.base_name))}


def _record_matches(output: Location, shard: int, sizes: dict[str, int]) -> bool:
    try:
        record = json.loads(output.join(DONE, record_name(shard)).read_bytes())
        return all(record[folder]["bytes"] == size for folder, size in sizes.items())
    except (ValueError, KeyError, TypeError):  # not a record we wrote
        return False


def _adopt_shard(output: Location, shard: int, sizes: dict[str, int]) -> bool:
    """Whether a shard without a record is whole (both Parquet footers read); if so its record is
    written, so the footers are read once."""
    record = {}
    for folder, size in sizes.items():
        location = output.join(folder, shard_name(shard))
        try:
            rows = pq.read_metadata(location.path, filesystem=location.filesystem).num_rows
        except pa.ArrowInvalid:  # truncated or not Parquet
            return False
        record[folder] = {"rows": rows, "bytes": size}
    _write_record(output, shard, record)
    return True


def _finished_shards(output: Location) -> set[int]:
    """Shards that are complete: both objects there, with the sizes their completion record gives. A
    shard without a record (written before records existed, or by a run stopped just before its
    record) counts when both objects' Parquet footers read. Any other shard is redone."""
    sizes = {folder: _part_sizes(output.join(folder), ".parquet") for folder in (QUARANTINE, FEATURES)}
    records = _part_sizes(output.join(DONE), ".json")
    candidates = sorted(sizes[FEATURES].keys() & sizes[QUARANTINE].keys())

    def complete(shard: int) -> bool:
        objects = {folder: by_shard[shard] for folder, by_shard in sizes.items()}
        return _record_matches(output, shard, objects) if shard in records else _adopt_shard(output, shard, objects)

    with ThreadPoolExecutor(IO_THREADS) as pool:  # one small request or two per shard: overlap them
        return {shard for shard, whole in zip(candidates, pool.map(complete, candidates)) if whole}


def recorded_summary(features: str, storage: S3Config) -> dict:
    """What a finished featurize run recorded about its destination (files, rows, hours, ...); ``{}``
    for a destination without a finished run."""
    record = resolve(features, storage).join(RUN_RECORD)
    return json.loads(record.read_bytes()).get("summary", {}) if record.exists() else {}


def recorded_fbank(features: str, storage: S3Config) -> FbankConfig:
    """The fbank settings a featurize destination's features were computed with, from its run record
    (written before the first shard); ``FileNotFoundError`` for a folder no featurize run made."""
    record = resolve(features, storage).join(RUN_RECORD)
    if not record.exists():
        raise FileNotFoundError(f"{features} has no {RUN_RECORD}: not a featurize job's destination")
    settings = json.loads(record.read_bytes())["config"]
    return FbankConfig(sample_rate=int(settings["audio"]["sample_rate"]), num_mel_bins=int(settings["num_mel_bins"]))


def featurize_listed(sources: list[AudioSource], output: str, storage: S3Config, num_mel_bins: int) -> Summary:
    """Featurize a labelled task's sources (fine-tuning, the pretraining probe): their list is written as a
    manifest beside ``output`` and featurized into it; a re-run reuses every finished shard."""
    manifest = resolve(output.rstrip("/") + ".manifest.jsonl", storage)
    manifest.write_bytes("".join(json.dumps(source.to_dict()) + "\n" for source in sources).encode())
    return run(FeaturizeConfig.model_validate({"input": {"manifest": manifest.uri}, "output": output,
                                               "storage": storage, "num_mel_bins": num_mel_bins, "shard_size": 64}))


def summarize(output: Location) -> Summary:
    """Counts over everything the destination holds (including shards of earlier, resumed runs)."""
    summary = Summary(destination=str(output))
    features = pq.read_table(output.join(FEATURES).path, filesystem=output.filesystem,
                             columns=["uri", "duration_s"], schema=FEATURE_SCHEMA)
    quarantine = pq.read_table(output.join(QUARANTINE).path, filesystem=output.filesystem,
                               columns=["reason"], schema=QUARANTINE_SCHEMA)
    summary.rows = features.num_rows
    summary.files = len(set(features.column("uri").to_pylist()))
    summary.hours = float(sum(features.column("duration_s").to_pylist())) / 3600
    for reason in quarantine.column("reason").to_pylist():
        summary.quarantined[reason] = summary.quarantined.get(reason, 0) + 1
    return summary


def _grow_plan(output: Location, sources: list[AudioSource], shard_size: int) -> tuple[dict, list[AudioSource], list[str]]:
    """The destination's plan with the sources it lacks dealt into new shards: ``(plan, added, missing)``."""
    plan = _read_plan(output)
    planned = {source.uri for shards in plan.values() for source in shards}
    current = {source.uri for source in sources}
    added = [source for source in sources if source.uri not in planned]
    missing = sorted(planned - current)
    plan.update(deal_shards(added, shard_size, first_shard=max(plan, default=-1) + 1))
    return plan, added, missing


def run(config: FeaturizeConfig, overwrite: bool = False) -> Summary:
    """Featurize everything the config names (or what is new in it); returns the destination's summary."""
    import ray

    with storage_errors(resolve(config.input.uri or config.input.manifest, config.storage)):
        sources = list_sources(config.input, config.storage)
    output = resolve(config.output, config.storage)
    settings = fingerprint(config)
    with storage_errors(output):
        _prepare_destination(output, settings, overwrite)
        _remove_partials(output)
        plan, added, missing = _grow_plan(output, sources, config.shard_size)
        if added:
            _write_plan(output, plan)  # before any shard: a resumed run deals nothing twice
        done = _finished_shards(output)
        pending = [index for index in sorted(plan) if index not in done]
        started = dt.datetime.now(dt.UTC).isoformat()
        record = {"fingerprint": settings, "config": public_dict(config), "sources": len(sources),
                  "added": len(added), "missing": len(missing), "missing_examples": missing[:100], "shards": len(plan),
                  "versions": _versions(), "started": started, "status": "running"}
        output.join(RUN_RECORD).write_bytes(json.dumps(record, indent=2).encode())
    print(f"featurize: {len(sources)} sources ({len(added)} new, {len(missing)} missing) in {len(plan)} shards "
          f"→ {output} ({len(pending)} to do, {len(plan) - len(pending)} already done)")

    if pending:
        connect_ray(config.ray)
        workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = [{"shard": index, "sources": json.dumps([s.to_dict() for s in plan[index]])} for index in pending]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        with stop_on_storage_failure("the shards not written are done by a re-run"):
            done_shards = dataset.map_batches(
                ShardFeaturizer, fn_constructor_kwargs={"config": config}, batch_size=1, num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            ).take_all()

    with storage_errors(output):
        summary = summarize(output)
        summary.shards_written, summary.shards_skipped = len(pending), len(plan) - len(pending)
        summary.added, summary.missing = len(added), missing
        if pending:
            busy = max(r["finished"] for r in done_shards) - min(r["started"] for r in done_shards)
            summary.files_per_second = sum(int(r["files"]) for r in done_shards) / max(busy, 1e-9)
        record.update(status="complete", finished=dt.datetime.now(dt.UTC).isoformat(), summary=summary.to_dict())
        output.join(RUN_RECORD).write_bytes(json.dumps(record, indent=2).encode())
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], FeaturizeConfig,
                       lambda config, args: run(config, overwrite=args.overwrite).table(),
                       argv, (SourceError, FeaturizeError, StorageUnavailable), inputs=lambda config: source_inputs("input", config.input),
                       overwrite_flag=True)


if __name__ == "__main__":
    from pipeline.featurize import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
