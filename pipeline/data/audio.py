"""Decode audio bytes into a 16 kHz mono waveform, or say precisely why not.

Every failure raises :class:`AudioError` with a short machine-readable ``reason`` (one of
:data:`REASONS`) and a human ``detail``; the featurize job turns these into quarantine rows, so one
bad file never stops a job or hides the good files around it.
"""

from __future__ import annotations

import io
import posixpath
import struct
from dataclasses import dataclass

import numpy as np
import soundfile
import torch
import torchaudio

# Extensions that libsndfile cannot decode; files with them are quarantined as unsupported.
UNSUPPORTED_EXTENSIONS = frozenset({"m4a", "aac", "wma", "mp4", "amr"})

REASONS = (
    "empty",  # zero bytes
    "unreadable",  # the object could not be read from storage
    "unsupported_format",  # a format libsndfile does not decode (m4a, aac, wma, ...)
    "not_audio",  # no known audio format in the bytes
    "corrupt",  # a known format that fails to decode
    "truncated",  # fewer samples than the header promises
    "zero_length",  # a valid file with no samples
    "non_finite",  # NaN or infinite samples
    "too_short",  # shorter than the configured minimum (one 25 ms fbank window by default)
)


class AudioError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32 mono at the target rate
    sample_rate: int  # the target rate
    source_sample_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / self.sample_rate


def _extension(name: str) -> str:
    return posixpath.splitext(name)[1].lstrip(".").lower()


def _wav_is_truncated(data: bytes) -> bool:
    """A RIFF/WAVE file whose ``data`` chunk claims more bytes than the file holds. (libsndfile
    silently returns the samples that are there, so truncation must be checked on the header.)"""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        if chunk_id == b"data":
            return offset + 8 + size > len(data) and size != 0xFFFFFFFF  # 0xFFFFFFFF: streamed, unknown size
        offset += 8 + size + (size & 1)
    return False


def decode_audio(data: bytes, name: str, sample_rate: int = 16_000, min_seconds: float = 0.025) -> DecodedAudio:
    """Bytes of one file → float32 mono waveform at ``sample_rate`` (channel mean, then resampled).

    ``name`` (a path or URI) is only used for its extension and in messages."""
    if len(data) == 0:
        raise AudioError("empty", "the file has no bytes")
    extension = _extension(name)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio:
            declared_frames, source_rate, channels = audio.frames, audio.samplerate, audio.channels
            samples = audio.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        message = str(error).split(": ", 1)[-1].strip()
        if extension in UNSUPPORTED_EXTENSIONS:
            raise AudioError("unsupported_format", f".{extension} is not decodable by libsndfile") from None
        if "Format not recognised" in message:
            raise AudioError("not_audio", "no known audio format in the bytes") from None
        raise AudioError("corrupt", message or type(error).__name__) from None
    if len(samples) < declared_frames or _wav_is_truncated(data):
        raise AudioError("truncated", f"{len(samples)} frames decoded, the header promises more")
    if len(samples) == 0:
        raise AudioError("zero_length", "the file holds no samples")
    if not np.isfinite(samples).all():
        raise AudioError("non_finite", f"{int((~np.isfinite(samples)).sum())} NaN or infinite samples")
    mono = samples.mean(axis=1)
    if source_rate != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), source_rate, sample_rate).numpy()
    if len(mono) < min_seconds * sample_rate:
        raise AudioError("too_short", f"{len(mono) / sample_rate * 1000:.1f} ms, the minimum is {min_seconds * 1000:.0f} ms")
    return DecodedAudio(np.ascontiguousarray(mono, dtype=np.float32), sample_rate, source_rate, channels)


def split_long_audio(waveform: np.ndarray, sample_rate: int, max_seconds: float | None, mode: str,
                     min_seconds: float) -> list[tuple[float, np.ndarray]]:
    """``[(offset_s, piece)]``: the whole clip, its first ``max_seconds`` (``crop``), or consecutive
    ``max_seconds`` pieces (``chunk``; a last piece shorter than ``min_seconds`` is dropped)."""
    if max_seconds is None or len(waveform) <= max_seconds * sample_rate:
        return [(0.0, waveform)]
    size = int(round(max_seconds * sample_rate))
    if mode == "crop":
        return [(0.0, waveform[:size])]
    pieces = [(start / sample_rate, waveform[start : start + size]) for start in range(0, len(waveform), size)]
    return [(offset, piece) for offset, piece in pieces if len(piece) >= min_seconds * sample_rate]
