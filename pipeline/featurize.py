"""``python -m pipeline.featurize``: decode audio from object storage and store its fbank features.

    python -m pipeline.featurize --config configs/featurize/<preset>.yaml [--set key=value ...] [--overwrite]

The sorted input files are cut into shards of ``shard_size`` files. A Ray Data actor pool
featurizes one shard per call: it reads each file, decodes it (mono, 16 kHz, DC removed) and
computes the raw Kaldi log-mel fbank with ``ssamba.features``, then writes the shard as one Parquet
object of features and one of quarantined files (path + reason). A shard is written whole or not
at all, which makes a re-run safe: it resumes by skipping the shards already present, and refuses
a destination that holds another input's features unless ``--overwrite`` is given. Nothing is ever
written twice.

Output under the destination::

    features/part-00000.parquet     uri, label, split, fold, chunk, offset_s, duration_s,
                                    source_sample_rate, source_channels, n_frames, n_mels,
                                    fbank (float16 bytes, n_frames × n_mels, row-major)
    quarantine/part-00000.parquet   uri, reason, detail
    _run.json                       config (no credentials), input fingerprint, counts, versions
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.audio import AudioError, decode_audio, split_long_audio
from pipeline.config import AudioConfig, FeaturizeConfig, S3Config, public_dict, run_command
from pipeline.sources import AudioSource, SourceError, list_sources
from pipeline.storage import Location, resolve
from ssamba.features import FbankConfig, fbank, remove_dc

FORMAT_VERSION = 1
RUN_RECORD = "_run.json"

FEATURE_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.string()), ("split", pa.string()), ("fold", pa.int32()),
    ("chunk", pa.int32()), ("offset_s", pa.float64()), ("duration_s", pa.float64()),
    ("source_sample_rate", pa.int32()), ("source_channels", pa.int32()),
    ("n_frames", pa.int32()), ("n_mels", pa.int32()), ("fbank", pa.binary()),
])
QUARANTINE_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class FeaturizeError(RuntimeError):
    """The job cannot start (destination conflict) or could not finish."""


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


# --------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------


class SourceReader:
    """Reads source files, one filesystem per URI scheme/bucket, built lazily and reused."""

    def __init__(self, storage: S3Config) -> None:
        self.storage = storage
        self._roots: dict[str, Location] = {}

    def read(self, uri: str) -> bytes:
        root_key = uri.split("/", 3)[2] if uri.startswith("s3://") else ""
        if root_key not in self._roots:
            self._roots[root_key] = resolve(f"s3://{root_key}" if root_key else "/", self.storage)
        root = self._roots[root_key]
        path = uri[len("s3://"):] if root_key else resolve(uri).path
        with root.filesystem.open_input_stream(path) as stream:
            return stream.read()


def featurize_source(data: bytes, source: AudioSource, audio: AudioConfig, fbank_config: FbankConfig) -> list[dict]:
    """Feature rows of one file (several when long audio is chunked). Raises :class:`AudioError`."""
    decoded = decode_audio(data, source.uri, audio.sample_rate, audio.min_seconds)
    rows = []
    pieces = split_long_audio(decoded.waveform, decoded.sample_rate, audio.max_seconds, audio.long_audio, audio.min_seconds)
    for chunk, (offset, piece) in enumerate(pieces):
        features = fbank(remove_dc(torch.from_numpy(piece)), fbank_config)
        rows.append({
            **source.to_dict(), "chunk": chunk, "offset_s": offset, "duration_s": len(piece) / decoded.sample_rate,
            "source_sample_rate": decoded.source_sample_rate, "source_channels": decoded.source_channels,
            "n_frames": features.shape[0], "n_mels": features.shape[1],
            "fbank": features.to(torch.float16).numpy().tobytes(),
        })
    return rows


def featurize_shard(sources: list[AudioSource], reader: SourceReader, audio: AudioConfig,
                    fbank_config: FbankConfig) -> tuple[pa.Table, pa.Table]:
    """Features and quarantine tables of one shard; a bad file becomes a quarantine row, never an error."""
    features, quarantine = [], []
    for source in sources:
        try:
            data = reader.read(source.uri)
        except OSError as error:
            quarantine.append({"uri": source.uri, "reason": "unreadable", "detail": str(error)[:500]})
            continue
        try:
            features.extend(featurize_source(data, source, audio, fbank_config))
        except AudioError as error:
            quarantine.append({"uri": source.uri, "reason": error.reason, "detail": error.detail[:500]})
    return (pa.Table.from_pylist(features, schema=FEATURE_SCHEMA),
            pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class ShardFeaturizer:
    """The Ray Data actor: featurizes and writes one shard per row of its input batch."""

    def __init__(self, config: FeaturizeConfig) -> None:
        torch.set_num_threads(1)  # one actor per CPU: threads inside would only contend
        self.config = config
        self.reader = SourceReader(config.storage)
        self.fbank_config = FbankConfig(sample_rate=config.audio.sample_rate, num_mel_bins=config.num_mel_bins)
        self.output = resolve(config.output, config.storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files, started, finished = [], [], []
        for shard, sources_json in zip(batch["shard"], batch["sources"]):
            started.append(time.time())
            sources = [AudioSource.from_dict(item) for item in json.loads(sources_json)]
            features, quarantine = featurize_shard(sources, self.reader, self.config.audio, self.fbank_config)
            # Quarantine first: the features object is the shard's completion marker.
            self.output.join("quarantine", shard_name(int(shard))).write_bytes(_parquet_bytes(quarantine))
            self.output.join("features", shard_name(int(shard))).write_bytes(_parquet_bytes(features))
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
    files_per_second: float | None = None  # this run, from the first shard started to the last written

    def to_dict(self) -> dict:
        return {"files": self.files, "rows": self.rows, "hours": self.hours, "quarantined": self.quarantined,
                "shards_written": self.shards_written, "shards_skipped": self.shards_skipped,
                "files_per_second": self.files_per_second}

    def table(self) -> str:
        lines = [
            f"featurize summary for {self.destination}",
            f"  shards      {self.shards_written} written, {self.shards_skipped} already done"
            + (f" ({self.files_per_second:.1f} files/s)" if self.files_per_second else ""),
            f"  processed   {self.files} files → {self.rows} rows, {self.hours:.3f} h of audio",
            f"  quarantined {sum(self.quarantined.values())} files",
        ]
        lines += [f"    {reason:<20} {count}" for reason, count in sorted(self.quarantined.items())]
        return "\n".join(lines)


def fingerprint(sources: list[AudioSource], config: FeaturizeConfig) -> str:
    """Identifies what a destination holds: the inputs and every setting that shapes the output."""
    payload = {
        "format": FORMAT_VERSION, "shard_size": config.shard_size, "num_mel_bins": config.num_mel_bins,
        "audio": config.audio.model_dump(), "sources": [source.to_dict() for source in sources],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import ray
    import soundfile

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pa.__version__, "soundfile": soundfile.__version__,
            "libsndfile": soundfile.__libsndfile_version__}


def _prepare_destination(output: Location, input_fingerprint: str, overwrite: bool) -> None:
    """Resume into a destination holding this very input, refuse any other unless ``overwrite``."""
    record_location = output.join(RUN_RECORD)
    if overwrite:
        output.delete_contents()
        return
    if record_location.exists():
        record = json.loads(record_location.read_bytes())
        if record.get("fingerprint") != input_fingerprint:
            raise FeaturizeError(
                f"{output} holds features of a different input or configuration; "
                "choose another output or pass --overwrite to replace them"
            )
    elif output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True)):
        raise FeaturizeError(f"{output} is not empty and holds no featurize run; pass --overwrite to replace it")


def _finished_shards(output: Location) -> set[int]:
    listing = output.filesystem.get_file_info(pafs.FileSelector(output.join("features").path, allow_not_found=True))
    return {int(info.base_name[5:10]) for info in listing if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")}


def summarize(output: Location) -> Summary:
    """Counts over everything the destination holds (including shards of earlier, resumed runs)."""
    summary = Summary(destination=str(output))
    features = pq.read_table(output.join("features").path, filesystem=output.filesystem,
                             columns=["uri", "duration_s"], schema=FEATURE_SCHEMA)
    quarantine = pq.read_table(output.join("quarantine").path, filesystem=output.filesystem,
                               columns=["reason"], schema=QUARANTINE_SCHEMA)
    summary.rows = features.num_rows
    summary.files = len(set(features.column("uri").to_pylist()))
    summary.hours = float(sum(features.column("duration_s").to_pylist())) / 3600
    for reason in quarantine.column("reason").to_pylist():
        summary.quarantined[reason] = summary.quarantined.get(reason, 0) + 1
    return summary


def run(config: FeaturizeConfig, overwrite: bool = False) -> Summary:
    """Featurize everything the config names; returns the destination's summary."""
    import ray

    sources = list_sources(config.input, config.storage)
    output = resolve(config.output, config.storage)
    input_fingerprint = fingerprint(sources, config)
    _prepare_destination(output, input_fingerprint, overwrite)
    shards = [sources[start : start + config.shard_size] for start in range(0, len(sources), config.shard_size)]
    done = _finished_shards(output)
    pending = [index for index in range(len(shards)) if index not in done]
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    record = {"fingerprint": input_fingerprint, "config": public_dict(config), "sources": len(sources),
              "shards": len(shards), "versions": _versions(), "started": started, "status": "running"}
    output.join(RUN_RECORD).write_bytes(json.dumps(record, indent=2).encode())
    print(f"featurize: {len(sources)} files in {len(shards)} shards → {output} "
          f"({len(pending)} to do, {len(shards) - len(pending)} already done)")

    if pending:
        if not ray.is_initialized():
            ray.init(address=config.ray_address)
        workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = [{"shard": index, "sources": json.dumps([s.to_dict() for s in shards[index]])} for index in pending]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        done_shards = dataset.map_batches(
            ShardFeaturizer, fn_constructor_kwargs={"config": config}, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
        ).take_all()

    summary = summarize(output)
    summary.shards_written, summary.shards_skipped = len(pending), len(shards) - len(pending)
    if pending:
        busy = max(r["finished"] for r in done_shards) - min(r["started"] for r in done_shards)
        summary.files_per_second = sum(int(r["files"]) for r in done_shards) / max(busy, 1e-9)
    record.update(status="complete", finished=dt.datetime.now(dt.timezone.utc).isoformat(), summary=summary.to_dict())
    output.join(RUN_RECORD).write_bytes(json.dumps(record, indent=2).encode())
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], FeaturizeConfig,
                       lambda config, args: run(config, overwrite=args.overwrite).table(),
                       argv, (SourceError, FeaturizeError), overwrite_flag=True)


if __name__ == "__main__":
    sys.exit(main())
