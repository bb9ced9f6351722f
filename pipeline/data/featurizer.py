"""The featurize job's engine; ``pipeline/featurize.py`` is its command and documents the job.

Fine-tuning and the pretraining probe featurize their labelled tasks with it too (:func:`featurize_listed`).
"""


from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import AudioConfig, FeaturizeConfig, public_dict
from pipeline.data.audio import AudioError
from pipeline.data.feature_store import FEATURE_SCHEMA, FEATURES, QUARANTINE, QUARANTINE_SCHEMA, destination, featurize_source
from pipeline.data.reading import SourceReader, read_source, stop_on_storage_failure
from pipeline.data.shards import storage_errors
from pipeline.data.sources import AudioSource, list_sources
from pipeline.data.storage import Location, S3Config, resolve
from pipeline.runtime.launch import connect_ray
from ssamba.features import FbankConfig

FORMAT_VERSION = 2  # 2: sources dealt into shards in a seeded random order, recorded in the plan


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


class ShardFeaturizer:
    """The Ray Data actor: featurizes and writes one shard per row of its input batch."""

    def __init__(self, config: FeaturizeConfig) -> None:
        torch.set_num_threads(1)  # one actor per CPU: threads inside would only contend
        self.config = config
        self.reader = SourceReader(config.storage)
        self.fbank_config = config.fbank_config()
        self.output = resolve(config.output, config.storage)
        self.destination = destination(self.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files, started, finished = [], [], []
        for shard, sources_json in zip(batch["shard"], batch["sources"]):
            started.append(time.time())
            sources = [AudioSource.from_dict(item) for item in json.loads(sources_json)]
            features, quarantine = featurize_shard(sources, self.reader, self.config.audio, self.fbank_config)
            with storage_errors(self.output):
                self.destination.write_shard(int(shard), {QUARANTINE: quarantine, FEATURES: features})
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


def run(config: FeaturizeConfig, overwrite: bool = False) -> Summary:
    """Featurize everything the config names (or what is new in it); returns the destination's summary."""
    import ray

    with storage_errors(resolve(config.input.uri or config.input.manifest, config.storage)):
        sources = list_sources(config.input, config.storage)
    output = resolve(config.output, config.storage)
    settings, shards = fingerprint(config), destination(output)
    with storage_errors(output):
        shards.prepare(settings, overwrite, "features")
        plan, added, missing = shards.grow_plan(sources, config.shard_size)  # before any shard is written
        done = shards.finished_shards()
        pending = [index for index in sorted(plan) if index not in done]
        started = dt.datetime.now(dt.UTC).isoformat()
        record = {"fingerprint": settings, "config": public_dict(config), "sources": len(sources),
                  "added": len(added), "missing": len(missing), "missing_examples": missing[:100], "shards": len(plan),
                  "versions": _versions(), "started": started, "status": "running"}
        shards.write_record(record)
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
        shards.write_record(record)
    return summary
