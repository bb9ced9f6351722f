"""``python -m pipeline.embed``: embeddings for a whole corpus with Ray Data batch inference.

    python -m pipeline.embed --config configs/embed/<preset>.yaml [--set key=value ...] [--overwrite]

An actor pool (CPU or GPU workers) loads the encoder once per actor through the HEAR module
(``ssamba.hear``) and embeds audio files, or the stored fbanks of a featurize run, batch by batch.
Output Parquet rows: ``uri, chunk, ok, error``, then ``scene`` (D floats) and/or ``timestamps``
(ms) and ``timestamp_embeddings`` (one D-float list per timestamp). With a ``classifier`` (a
fine-tuning job's exported ``classifier.pt``) each row also gets its ``top_k`` most probable
``labels`` and their ``probabilities``; ``embeddings: none`` then skips the encoder. A file that
is not there or cannot be decoded gets ``ok = false`` and its reason, never a failed job.

The output is written shard by shard (``pipeline.data.shards``): audio files are dealt into shards of
``shard_size`` before any work (stored features keep their featurize shards), and each shard's rows are
written, then its completion record. A job stopped partway (an outage, Ctrl-C, a SIGKILL, a lost node)
is resumed by running it again: it embeds only the shards without a complete record and says how many
it reused; ``--overwrite`` starts over. A store that keeps failing is not the files' fault: the job
stops with one line naming the store instead of marking good audio failed.

Output under the destination (readers of the folder, such as ``pandas.read_parquet``, skip the ``_``
entries)::

    embeddings/part-00000.parquet   the rows above
    _done/part-00000.json           rows and bytes of the shard's object, written last
    _plan.parquet                   audio input: which file went to which shard
    _embed.json                     config (no credentials), settings fingerprint, status
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.config import EmbedConfig, public_dict
from pipeline.data import feature_store
from pipeline.data.audio import AudioError, decode_audio
from pipeline.data.feature_store import FBANK_COLUMNS, FEATURES, decode_fbank
from pipeline.data.reading import SourceReader, StorageUnavailable, read_source, stop_on_storage_failure
from pipeline.data.shards import DestinationConflict, ShardedDestination, shard_name, storage_errors
from pipeline.data.sources import SourceError, list_sources
from pipeline.data.storage import Location, resolve
from pipeline.models.loaders import load_classifier, load_hear_model
from pipeline.runtime.launch import Input, connect_ray, optional_input, run_command, source_inputs
from ssamba import hear
from ssamba.features import FbankConfig, norm_stats, normalize

# Explicit types: a batch whose files all failed must not make a column null-typed.
OUTPUT_TYPES = {
    "uri": pa.string(), "chunk": pa.int32(), "ok": pa.bool_(), "error": pa.string(),
    "scene": pa.list_(pa.float32()), "timestamps": pa.list_(pa.float32()),
    "timestamp_embeddings": pa.list_(pa.list_(pa.float32())),
    "labels": pa.list_(pa.string()), "probabilities": pa.list_(pa.float32()),
}


FORMAT_VERSION = 1
EMBEDDINGS, DONE, RUN_RECORD = "embeddings", "_done", "_embed.json"  # the destination's entries


class EmbedError(RuntimeError):
    """Stored features are not what the models take."""


class Embedder:
    """The encoder and/or classifier, loaded once per actor: rows of audio URIs or stored fbanks in,
    embeddings and top-k labels out."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self.device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = None if config.embeddings == "none" else \
            load_hear_model(config.model, config.storage, pooling=config.pooling).to(self.device)
        self.classifier = None if config.classifier is None else load_classifier(config.classifier, config.storage).to(self.device)
        self.reader = SourceReader(config.storage)

    def _read(self, row: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(waveform at audio.sample_rate, None)`` of an audio source, or ``(None, raw log-mel)`` of a
        row stored by the featurize job."""
        if "fbank" in row:
            return None, decode_fbank(row["fbank"], row["n_frames"], row["n_mels"])
        decoded = decode_audio(read_source(self.reader, row["uri"]), row["uri"], self.config.audio.sample_rate,
                               self.config.audio.min_seconds)
        return torch.from_numpy(decoded.waveform), None

    def _embeddings(self, waveform: torch.Tensor | None, raw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if raw is not None:
            features = normalize(raw, norm_stats("audioset"))
        else:
            features = hear.model_inputs(waveform[None], self.model)[0]
        embeddings, timestamps = hear.timestamp_embeddings_from_features(features[None].to(self.device), self.model)
        return embeddings[0].cpu(), timestamps[0].cpu()

    def _probabilities(self, waveform: torch.Tensor | None, raw: torch.Tensor | None) -> torch.Tensor:
        if raw is not None:
            return self.classifier.predict_fbank(raw[None])[0].cpu()
        return self.classifier.predict(waveform, self.config.audio.sample_rate)

    def embed(self, rows: list[dict]) -> pa.Table:
        """The output rows of input rows (``uri`` and, for stored features, ``chunk`` and the fbank columns)."""
        out: dict[str, list] = {name: [] for name in output_columns(self.config)}
        for row in rows:
            out["uri"].append(str(row["uri"]))
            out["chunk"].append(int(row.get("chunk") or 0))
            embeddings = timestamps = top = None
            try:
                waveform, raw = self._read(row)
                if self.model is not None:
                    embeddings, timestamps = self._embeddings(waveform, raw)
                if self.classifier is not None:
                    top = self.classifier.top_k(self._probabilities(waveform, raw), self.config.top_k)
                error = None
            except (AudioError, OSError) as failure:
                error = str(failure)
            out["ok"].append(error is None)
            out["error"].append(error)
            if "scene" in out:
                out["scene"].append(None if error else embeddings.mean(dim=0).numpy().tolist())
            if "timestamps" in out:
                out["timestamps"].append(None if error else timestamps.numpy().tolist())
                out["timestamp_embeddings"].append(None if error else embeddings.numpy().tolist())
            if "labels" in out:
                out["labels"].append(None if error else [label for label, _ in top])
                out["probabilities"].append(None if error else [probability for _, probability in top])
        return pa.Table.from_pydict(out, schema=output_schema(self.config))


def output_columns(config: EmbedConfig) -> list[str]:
    columns = ["uri", "chunk", "ok", "error"]
    if config.embeddings in ("scene", "both"):
        columns.append("scene")
    if config.embeddings in ("timestamp", "both"):
        columns += ["timestamps", "timestamp_embeddings"]
    if config.classifier is not None:
        columns += ["labels", "probabilities"]
    return columns


def output_schema(config: EmbedConfig) -> pa.Schema:
    return pa.schema([(name, OUTPUT_TYPES[name]) for name in output_columns(config)])


def destination(output: Location) -> ShardedDestination:
    return ShardedDestination(output, (EMBEDDINGS,), DONE, RUN_RECORD)


class ShardEmbedder:
    """The Ray Data actor: embeds and writes one shard per row of its input batch (``work``: the shard's
    audio URIs as JSON, or the number of the stored features shard it embeds)."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config, self.embedder = config, Embedder(config)
        self.destination = destination(resolve(config.output, config.storage))
        self.features = resolve(config.features, config.storage).join(FEATURES) if config.features else None

    def _rows(self, work: str) -> list[dict]:
        if self.features is None:
            return [{"uri": uri} for uri in json.loads(work)]
        location = self.features.join(shard_name(int(work)))
        with storage_errors(location):
            data = location.read_bytes()
        return pq.read_table(io.BytesIO(data), columns=["uri", "chunk", *FBANK_COLUMNS]).to_pylist()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows_written = []
        for shard, work in zip(batch["shard"], batch["work"]):
            rows, size = self._rows(str(work)), self.config.batch_size
            table = pa.concat_tables([self.embedder.embed(rows[start:start + size])
                                      for start in range(0, len(rows), size)] or [output_schema(self.config).empty_table()])
            with storage_errors(self.destination.output):
                self.destination.write_shard(int(shard), {EMBEDDINGS: table})
            rows_written.append(table.num_rows)
        return {"shard": batch["shard"], "rows": np.array(rows_written)}


@dataclass
class Summary:
    destination: str
    rows: int = 0
    failed: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    rows_reused: int = 0

    def line(self) -> str:
        failed = f", {self.failed} not embedded (their error column says why)" if self.failed else ""
        reused = f", {self.rows_reused} rows reused from {self.shards_reused} finished shards" if self.shards_reused else ""
        return f"embed: {self.rows} rows → {self.destination}{failed} ({self.shards_written} shards written{reused})"


def fingerprint(config: EmbedConfig) -> str:
    """Identifies what the destination holds: every setting that shapes its rows or its shards."""
    payload = {"format": FORMAT_VERSION, **config.model_dump(
        mode="json", include={"input", "features", "model", "classifier", "embeddings", "pooling", "top_k", "audio",
                              "shard_size"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _shard_work(config: EmbedConfig, shards: ShardedDestination) -> dict[int, str]:
    """``{shard: work}`` of everything the destination must hold: audio files dealt into shards (a grown
    input adds shards), or the complete shards of the stored features."""
    if config.features is not None:
        features = feature_store.destination(resolve(config.features, config.storage))
        with storage_errors(features.output):
            return {shard: str(shard) for shard in sorted(features.finished_shards())}
    with storage_errors(resolve(config.input.uri or config.input.manifest, config.storage)):
        sources = list_sources(config.input, config.storage)
    plan, _, _ = shards.grow_plan(sources, config.shard_size)
    return {shard: json.dumps([source.uri for source in members]) for shard, members in plan.items()}


def run(config: EmbedConfig, overwrite: bool = False) -> Summary:
    """Embed everything the config names that the destination does not hold yet; returns its summary."""
    if config.features is not None:
        check_stored_features(config)
    output = resolve(config.output, config.storage)
    shards, settings = destination(output), fingerprint(config)
    with storage_errors(output):
        shards.prepare(settings, overwrite, "embeddings")
        work = _shard_work(config, shards)
        done = shards.finished_shards() & set(work)
        pending = [shard for shard in sorted(work) if shard not in done]
        shards.write_record({"fingerprint": settings, "config": public_dict(config), "shards": len(work),
                             "status": "running"})
    print(f"embed: {len(work)} shards → {output} ({len(pending)} to do, {len(done)} already done)", flush=True)
    if pending:
        connect_ray(config.ray)
        workers = config.num_workers or max(1, int(ray.cluster_resources().get("GPU" if config.use_gpu else "CPU", 1)))
        rows = [{"shard": shard, "work": work[shard]} for shard in pending]
        with stop_on_storage_failure("the shards not written are done by a re-run once it is back"):
            ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                ShardEmbedder, fn_constructor_kwargs={"config": config}, batch_size=1,
                num_cpus=0 if config.use_gpu else 1, num_gpus=1 if config.use_gpu else 0,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(workers, len(rows))),
            ).materialize()
    with storage_errors(output):
        summary = _summarize(output, work, done)
        shards.write_record({**shards.read_record(), "status": "complete", "summary": asdict(summary)})
    return summary


def _summarize(output: Location, work: dict[int, str], reused: set[int]) -> Summary:
    location = output.join(EMBEDDINGS)
    table = pq.read_table(location.path, filesystem=location.filesystem, columns=["ok"])
    reused_rows = sum(destination(output).shard_rows(shard, EMBEDDINGS) for shard in reused)
    failed = table.num_rows - sum(table.column("ok").to_pylist())
    return Summary(str(output), table.num_rows, failed, len(work) - len(reused), len(reused), reused_rows)


def check_stored_features(config: EmbedConfig) -> None:
    """Stored fbanks are embedded as they are: the settings the featurize run recorded must be those the
    encoder and the classifier take (checked before any cluster work)."""
    try:
        stored = feature_store.recorded_fbank(config.features, config.storage)
    except FileNotFoundError as error:
        raise EmbedError(f"features: {error}") from None
    takes = {}
    if config.embeddings != "none":
        takes["model"] = load_hear_model(config.model, config.storage).fbank_config
    if config.classifier is not None:
        takes["classifier"] = load_classifier(config.classifier, config.storage).features.fbank
    for field, wanted in takes.items():
        if wanted != stored:
            raise EmbedError(f"features: {config.features} hold fbanks of {_describe(stored)}, but {field} takes "
                             f"{_describe(wanted)}: featurize with matching audio.sample_rate and num_mel_bins, "
                             "or embed the audio itself (input)")


def _describe(settings: FbankConfig) -> str:
    return f"{settings.num_mel_bins} mel bins at {settings.sample_rate} Hz"


def inputs(config: EmbedConfig) -> list[Input]:
    """What must exist before the job starts: its audio or features, the encoder and the classifier."""
    features = [Input("features", config.features, "features")] if config.features else []
    return [*features, *source_inputs("input", config.input), *optional_input("model", config.model),
            *optional_input("classifier", config.classifier)]


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], EmbedConfig,
                       lambda config, args: run(config, overwrite=args.overwrite).line(), argv,
                       (SourceError, EmbedError, DestinationConflict, StorageUnavailable), inputs=inputs,
                       overwrite_flag=True)


if __name__ == "__main__":
    from pipeline.embed import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
