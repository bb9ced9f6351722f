"""Synthetic inputs for the training-input benchmarks: a featurize destination in the job's own schema
and shard names (random fbanks), and 16 kHz WAV clips of noisy tones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile

from pipeline.data.feature_store import FEATURE_SCHEMA, RAW_COLUMNS
from pipeline.data.shards import parquet_bytes, shard_name


def write_feature_store(folder: Path, shards: int, rows: int, frames: tuple[int, int] = (1024, 1024),
                        mels: int = 128, raw_columns: tuple[str, ...] = RAW_COLUMNS) -> Path:
    """``shards`` Parquet shards of ``rows`` fbanks each, of ``frames[0]``–``frames[1]`` frames (uniform),
    written as the featurize job writes them (``raw_columns=()``: every column compressed, as before)."""
    rng = np.random.default_rng(0)
    (folder / "features").mkdir(parents=True)
    for shard in range(shards):
        lengths = rng.integers(frames[0], frames[1] + 1, rows)
        table = pa.Table.from_pylist([{
            "uri": f"clip{shard}-{row}.wav", "label": str(row % 4), "split": None, "fold": None, "chunk": 0,
            "offset_s": 0.0, "duration_s": length / 100, "source_sample_rate": 16_000, "source_channels": 1,
            "n_frames": int(length), "n_mels": mels,
            "fbank": rng.normal(-5, 3, (length, mels)).astype(np.float16).tobytes(),
        } for row, length in enumerate(lengths)], schema=FEATURE_SCHEMA)
        (folder / "features" / shard_name(shard)).write_bytes(parquet_bytes(table, raw_columns))
    return folder


def write_wav_clips(folder: Path, count: int, seconds: float) -> Path:
    """``count`` mono 16 kHz WAV clips of a tone in noise, each ``seconds`` long."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16_000)) / 16_000
    folder.mkdir(parents=True)
    for index in range(count):
        tone = 0.3 * np.sin(2 * np.pi * (200 + index) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(folder / f"clip{index:05d}.wav", tone.astype(np.float32), 16_000)
    return folder
