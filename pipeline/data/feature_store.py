"""The stored feature format: what a featurize destination holds, and how an fbank is written and read.

One place owns it so that the featurize job, the training input, the embed job and the classifier
export agree: a row per source (or chunk of long audio) with its provenance and the raw, unnormalised
Kaldi log-mel fbank as ``STORED_PRECISION`` bytes, ``n_frames × n_mels``, row-major; the rows sit in
the shards of a :class:`~pipeline.data.shards.ShardedDestination` (``features/``, ``quarantine/``, records in
``done/``) with the run record ``_run.json`` (the featurize settings and, once finished, a summary).
"""

from __future__ import annotations

import json
import warnings
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import AudioConfig
from pipeline.data.audio import decode_audio, split_long_audio
from pipeline.data.shards import ShardedDestination
from pipeline.data.storage import Location, S3Config, resolve
from ssamba.features import FbankConfig, waveform_to_fbank

STORED_PRECISION = "float16"  # half the bytes of float32; fbank values (about -15..25) keep ~3 decimals
STORED_DTYPE = getattr(torch, STORED_PRECISION)

FEATURE_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.string()), ("split", pa.string()), ("fold", pa.int32()),
    ("chunk", pa.int32()), ("offset_s", pa.float64()), ("duration_s", pa.float64()),
    ("source_sample_rate", pa.int32()), ("source_channels", pa.int32()),
    ("n_frames", pa.int32()), ("n_mels", pa.int32()), ("fbank", pa.binary()),
])
QUARANTINE_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
FBANK_COLUMNS = ["n_frames", "n_mels", "fbank"]  # what decoding a row needs
# Stored without compression or dictionary: zstd shrinks float16 log-mels by about a tenth, and
# decompressing them cost ten times the rest of reading a shard (0.46 against 0.03 ms a 10-s clip,
# benchmarks/ingest.py), paid by every training epoch. Stores written with zstd still read.
RAW_COLUMNS = ("fbank",)
RUN_RECORD = "_run.json"
FEATURES, QUARANTINE, DONE = "features", "quarantine", "done"  # folders of the destination


def destination(output: Location) -> ShardedDestination:
    """A featurize destination: per shard a features and a quarantine object, then its record in ``done/``."""
    return ShardedDestination(output, (QUARANTINE, FEATURES), DONE, RUN_RECORD, RAW_COLUMNS)


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




def encode_fbank(features: torch.Tensor) -> dict:
    """The columns of one ``(frames, mels)`` fbank as stored."""
    return {"n_frames": features.shape[0], "n_mels": features.shape[1],
            "fbank": features.to(STORED_DTYPE).numpy().tobytes()}


def _stored_half(data: bytes, frames: int, mels: int) -> torch.Tensor:
    """The first ``frames`` frames of a stored fbank as a float16 ``(frames, mels)`` tensor over its bytes
    (no copy). Converting it to float32 is left to torch, which uses the CPU's half-precision
    instructions: numpy's conversion took ten times as long (0.34 against 0.035 ms a 10-s clip) and was
    most of the training input's time."""
    with warnings.catch_warnings():  # the bytes are read-only, and only ever read here
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        return torch.frombuffer(data, dtype=STORED_DTYPE, count=frames * mels).view(frames, mels)


def decode_fbank(data: bytes, n_frames: int, n_mels: int) -> torch.Tensor:
    """A stored fbank back as a float32 ``(frames, mels)`` tensor."""
    return _stored_half(data, int(n_frames), int(n_mels)).float()


def decode_cropped(data: Sequence[bytes], n_frames: Sequence[int], n_mels: Sequence[int],
                   target_length: int, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Stored fbanks → one ``(batch, target_length, mels)`` array of ``dtype``: each clip's first
    ``target_length`` frames, zero-padded at the end (``ssamba.features.crop_or_pad``). Only the kept frames
    are copied (and converted), each straight into its place: no per-clip tensor, no second copy to stack.
    ``STORED_DTYPE`` keeps the stored values as they are, at half the bytes of float32."""
    mels = {int(count) for count in n_mels}
    if len(mels) > 1:
        raise ValueError(f"one batch of stored fbanks holds several mel-bin counts: {sorted(mels)}")
    batch = torch.zeros((len(data), target_length, mels.pop() if mels else 0), dtype=dtype)
    for row, (stored, frames) in enumerate(zip(data, n_frames)):
        kept = min(int(frames), target_length)
        if kept:
            batch[row, :kept] = _stored_half(stored, kept, batch.shape[2])
    return batch.numpy()


def featurize_source(data: bytes, uri: str, audio: AudioConfig, fbank_config: FbankConfig) -> list[dict]:
    """Feature columns of one source (several rows when long audio is chunked). Raises :class:`AudioError`."""
    decoded = decode_audio(data, uri, audio.sample_rate, audio.min_seconds)
    rows = []
    pieces = split_long_audio(decoded.waveform, decoded.sample_rate, audio.max_seconds, audio.long_audio, audio.min_seconds)
    for chunk, (offset, piece) in enumerate(pieces):
        features = waveform_to_fbank(torch.from_numpy(piece), fbank_config)
        rows.append({
            "chunk": chunk, "offset_s": offset, "duration_s": len(piece) / decoded.sample_rate,
            "source_sample_rate": decoded.source_sample_rate, "source_channels": decoded.source_channels,
            **encode_fbank(features),
        })
    return rows
