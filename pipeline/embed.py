"""``python -m pipeline.embed``: embeddings for a whole corpus with Ray Data batch inference.

    python -m pipeline.embed --config configs/embed/<preset>.yaml [--set key=value ...] [--overwrite]

An actor pool (CPU or GPU workers) loads the encoder once per actor through the HEAR module
(``ssamba.hear``) and embeds audio files, or the stored fbanks of a featurize run, batch by batch.
Output Parquet rows: ``uri, chunk, ok, error``, then ``scene`` (D floats) and/or ``timestamps``
(ms) and ``timestamp_embeddings`` (one D-float list per timestamp). A file that cannot be decoded
gets ``ok = false`` and its reason, never a failed job.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from pipeline.audio import AudioError, decode_audio
from pipeline.config import EmbedConfig, run_command
from pipeline.reading import SourceReader
from pipeline.sources import SourceError, list_sources
from pipeline.storage import resolve
from ssamba import hear
from ssamba.features import norm_stats, normalize


# Explicit types: a batch whose files all failed must not make a column null-typed.
OUTPUT_TYPES = {
    "uri": pa.string(), "chunk": pa.int32(), "ok": pa.bool_(), "error": pa.string(),
    "scene": pa.list_(pa.float32()), "timestamps": pa.list_(pa.float32()),
    "timestamp_embeddings": pa.list_(pa.list_(pa.float32())),
}


class EmbedError(RuntimeError):
    """The destination already holds embeddings (and ``--overwrite`` was not given)."""


class Embedder:
    """The Ray Data actor: one encoder per actor, rows of audio URIs or stored fbanks in, embeddings out."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self.device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = self._load_model().to(self.device)
        self.reader = SourceReader(config.storage)

    def _load_model(self) -> hear.HEARModel:
        if not self.config.model.startswith("s3://"):
            return hear.load_model(self.config.model)
        with tempfile.TemporaryDirectory() as folder:  # the checkpoint is read once, then loaded from disk
            path = Path(folder) / Path(self.config.model).name
            path.write_bytes(resolve(self.config.model, self.config.storage).read_bytes())
            return hear.load_model(str(path))

    def _features(self, row: dict) -> torch.Tensor:
        if "fbank" in row:  # stored raw log-mel from the featurize job
            raw = np.frombuffer(row["fbank"], dtype=np.float16).reshape(int(row["n_frames"]), int(row["n_mels"]))
            return normalize(torch.from_numpy(raw.astype(np.float32)), norm_stats("audioset"))
        decoded = decode_audio(self.reader.read(row["uri"]), row["uri"], self.config.audio.sample_rate,
                               self.config.audio.min_seconds)
        return hear._fbank_batch(torch.from_numpy(decoded.waveform)[None], self.model)[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list] = {"uri": [], "chunk": [], "ok": [], "error": []}
        wanted = self.config.embeddings
        if wanted in ("scene", "both"):
            out["scene"] = []
        if wanted in ("timestamp", "both"):
            out["timestamps"], out["timestamp_embeddings"] = [], []
        for row in rows:
            out["uri"].append(str(row["uri"]))
            out["chunk"].append(int(row.get("chunk", 0)))
            try:
                features = self._features(row).to(self.device)
                embeddings, timestamps = hear.timestamp_embeddings_from_features(features[None], self.model)
                error = None
            except (AudioError, OSError) as failure:
                embeddings, timestamps, error = None, None, str(failure)
            out["ok"].append(error is None)
            out["error"].append(error)
            if "scene" in out:
                out["scene"].append(None if error else embeddings[0].mean(dim=0).cpu().numpy().tolist())
            if "timestamps" in out:
                out["timestamps"].append(None if error else timestamps[0].cpu().numpy().tolist())
                out["timestamp_embeddings"].append(None if error else embeddings[0].cpu().numpy().tolist())
        return pa.Table.from_pydict(out, schema=pa.schema([(name, OUTPUT_TYPES[name]) for name in out]))


def run(config: EmbedConfig, overwrite: bool = False) -> int:
    """Embed everything the config names; returns the number of rows written."""
    output = resolve(config.output, config.storage)
    if output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True)):
        if not overwrite:
            raise EmbedError(f"{output} is not empty; choose another output or pass --overwrite")
        output.delete_contents()
    if not ray.is_initialized():
        ray.init()
    if config.features is not None:
        features = resolve(config.features, config.storage).join("features")
        dataset = ray.data.read_parquet(features.path, filesystem=features.filesystem,
                                        columns=["uri", "chunk", "n_frames", "n_mels", "fbank"])
    else:
        dataset = ray.data.from_items([{"uri": source.uri} for source in list_sources(config.input, config.storage)])
    workers = config.num_workers or max(1, int(ray.cluster_resources().get("GPU" if config.use_gpu else "CPU", 1)))
    embedded = dataset.map_batches(
        Embedder, fn_constructor_kwargs={"config": config}, batch_size=config.batch_size,
        num_cpus=0 if config.use_gpu else 1, num_gpus=1 if config.use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    )
    embedded.write_parquet(output.path, filesystem=output.filesystem)
    return ray.data.read_parquet(output.path, filesystem=output.filesystem, columns=["uri"]).count()


def main(argv: list[str] | None = None) -> int:
    def job(config: EmbedConfig, args) -> str:
        rows = run(config, overwrite=args.overwrite)
        return f"embed: {rows} rows → {resolve(config.output, config.storage)}"

    return run_command(__doc__.splitlines()[0], EmbedConfig, job, argv, (SourceError, EmbedError), overwrite_flag=True)


if __name__ == "__main__":
    sys.exit(main())
