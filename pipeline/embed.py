"""``python -m pipeline.embed``: embeddings for a whole corpus with Ray Data batch inference.

    python -m pipeline.embed --config configs/embed/<preset>.yaml [--set key=value ...] [--overwrite]

An actor pool (CPU or GPU workers) loads the encoder once per actor through the HEAR module
(``ssamba.hear``) and embeds audio files, or the stored fbanks of a featurize run, batch by batch.
Output Parquet rows: ``uri, chunk, ok, error``, then ``scene`` (D floats) and/or ``timestamps``
(ms) and ``timestamp_embeddings`` (one D-float list per timestamp). With a ``classifier`` (a
fine-tuning job's exported ``classifier.pt``) each row also gets its ``top_k`` most probable
``labels`` and their ``probabilities``; ``embeddings: none`` then skips the encoder. A file that
is not there or cannot be decoded gets ``ok = false`` and its reason, never a failed job. A store that
keeps failing is not the files' fault: the job stops with one line naming the store instead of
marking good audio failed (re-run with ``--overwrite`` once it is back).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from pipeline import featurize
from pipeline.audio import AudioError, decode_audio
from pipeline.config import EmbedConfig
from pipeline.data import read_parquet
from pipeline.feature_store import FBANK_COLUMNS, decode_fbank
from pipeline.launch import Input, connect_ray, optional_input, run_command, source_inputs
from pipeline.models import load_classifier, load_hear_model
from pipeline.reading import SourceReader, StorageUnavailable, read_source, stop_on_storage_failure
from pipeline.sources import SourceError, list_sources
from pipeline.storage import resolve
from ssamba import hear
from ssamba.features import FbankConfig, norm_stats, normalize


# Explicit types: a batch whose files all failed must not make a column null-typed.
OUTPUT_TYPES = {
    "uri": pa.string(), "chunk": pa.int32(), "ok": pa.bool_(), "error": pa.string(),
    "scene": pa.list_(pa.float32()), "timestamps": pa.list_(pa.float32()),
    "timestamp_embeddings": pa.list_(pa.list_(pa.float32())),
    "labels": pa.list_(pa.string()), "probabilities": pa.list_(pa.float32()),
}


class EmbedError(RuntimeError):
    """The destination already holds embeddings (and ``--overwrite`` was not given), or stored features
    are not what the models take."""


class Embedder:
    """The Ray Data actor: the encoder and/or classifier loaded once per actor, rows of audio URIs or
    stored fbanks in, embeddings and top-k labels out."""

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

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list] = {"uri": [], "chunk": [], "ok": [], "error": []}
        wanted = self.config.embeddings
        if wanted in ("scene", "both"):
            out["scene"] = []
        if wanted in ("timestamp", "both"):
            out["timestamps"], out["timestamp_embeddings"] = [], []
        if self.classifier is not None:
            out["labels"], out["probabilities"] = [], []
        for row in rows:
            out["uri"].append(str(row["uri"]))
            out["chunk"].append(int(row.get("chunk", 0)))
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
        return pa.Table.from_pydict(out, schema=pa.schema([(name, OUTPUT_TYPES[name]) for name in out]))


def run(config: EmbedConfig, overwrite: bool = False) -> int:
    """Embed everything the config names; returns the number of rows written."""
    output = resolve(config.output, config.storage)
    if output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True)):
        if not overwrite:
            raise EmbedError(f"{output} is not empty; choose another output or pass --overwrite")
        output.delete_contents()
    if config.features is not None:
        check_stored_features(config)
    connect_ray(config.ray)
    if config.features is not None:
        features = resolve(config.features, config.storage).join("features")
        dataset = read_parquet(features, columns=["uri", "chunk", *FBANK_COLUMNS])
    else:
        dataset = ray.data.from_items([{"uri": source.uri} for source in list_sources(config.input, config.storage)])
    workers = config.num_workers or max(1, int(ray.cluster_resources().get("GPU" if config.use_gpu else "CPU", 1)))
    embedded = dataset.map_batches(
        Embedder, fn_constructor_kwargs={"config": config}, batch_size=config.batch_size,
        num_cpus=0 if config.use_gpu else 1, num_gpus=1 if config.use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    )
    with stop_on_storage_failure("re-run with --overwrite once it is back"):
        embedded.write_parquet(output.path, filesystem=output.filesystem)
    return read_parquet(output, columns=["uri"]).count()


def check_stored_features(config: EmbedConfig) -> None:
    """Stored fbanks are embedded as they are: the settings the featurize run recorded must be those the
    encoder and the classifier take (checked before any cluster work)."""
    try:
        stored = featurize.recorded_fbank(config.features, config.storage)
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
    def job(config: EmbedConfig, args) -> str:
        rows = run(config, overwrite=args.overwrite)
        return f"embed: {rows} rows → {resolve(config.output, config.storage)}"

    return run_command(__doc__.splitlines()[0], EmbedConfig, job, argv, (SourceError, EmbedError, StorageUnavailable), inputs=inputs,
                       overwrite_flag=True)


if __name__ == "__main__":
    from pipeline.embed import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
