"""A small audio collection written by the tests: good files in several formats, sample rates and
channel counts, one file of each kind the featurizer must quarantine, and Parquet audio tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
import torchaudio

from ssamba.features import waveform_to_fbank

# relative path → (format, subtype, sample rate, channels, seconds)
GOOD = {
    "good/tone_16k_mono.wav": ("WAV", "PCM_16", 16_000, 1, 1.0),
    "good/tone_44k_stereo.flac": ("FLAC", "PCM_16", 44_100, 2, 0.8),
    "good/tone_22k_mono.ogg": ("OGG", "VORBIS", 22_050, 1, 1.2),
    "good/tone_48k_mono.mp3": ("MP3", "MPEG_LAYER_III", 48_000, 1, 0.6),
    "good/noise_8k_stereo_float.wav": ("WAV", "FLOAT", 8_000, 2, 0.5),
    "good/nested/long_16k.wav": ("WAV", "PCM_16", 16_000, 1, 3.0),
}

# relative path → the reason it must be quarantined with
BAD = {
    "bad/empty.wav": "empty",
    "bad/truncated.wav": "truncated",
    "bad/text.wav": "not_audio",
    "bad/nan.wav": "non_finite",
    "bad/zero_length.wav": "zero_length",
    "bad/song.m4a": "unsupported_format",
    "bad/short.wav": "too_short",
    "bad/corrupt.flac": "corrupt",
}


def signal(sample_rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tones = [0.3 * np.sin(2 * np.pi * (220 + 110 * c + 40 * seed) * t) for c in range(channels)]
    return (np.stack(tones, axis=1) + 0.02 * rng.standard_normal((len(t), channels))).astype(np.float32)


def encode(samples: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def bad_file_bytes() -> dict[str, bytes]:
    wav = encode(signal(16_000, 1, 1.0, seed=9), 16_000, "WAV", "PCM_16")
    nan = signal(16_000, 1, 0.5, seed=10)
    nan[100:110] = np.nan
    flac = encode(signal(16_000, 1, 1.0, seed=11), 16_000, "FLAC", "PCM_16")
    return {
        "bad/empty.wav": b"",
        "bad/truncated.wav": wav[: len(wav) // 2],
        "bad/text.wav": b"this is a text file that pretends to be a wav\n" * 20,
        "bad/nan.wav": encode(nan, 16_000, "WAV", "FLOAT"),
        "bad/zero_length.wav": encode(np.zeros((0, 1), np.float32), 16_000, "WAV", "PCM_16"),
        "bad/song.m4a": b"\x00\x00\x00\x20ftypM4A " + bytes(200),
        "bad/short.wav": encode(signal(16_000, 1, 0.01, seed=12), 16_000, "WAV", "PCM_16"),
        "bad/corrupt.flac": flac[:200] + bytes(range(256)) * 20,
    }


def write_collection(root: Path) -> Path:
    """Write every good and bad file (plus a non-audio file that listing must skip) under ``root``."""
    for seed, (relative, (fmt, subtype, rate, channels, seconds)) in enumerate(GOOD.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(signal(rate, channels, seconds, seed), rate, fmt, subtype))
    for relative, data in bad_file_bytes().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "README.txt").write_text("not audio, not listed\n")
    return root


def expected_fbank(data: bytes) -> torch.Tensor:
    """The features ssamba gives for this file, decoded independently of the pipeline."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(samples.mean(axis=1))
    if rate != 16_000:
        waveform = torchaudio.functional.resample(waveform, rate, 16_000)
    return waveform_to_fbank(waveform)


def write_class_folders(root: Path, classes: int, per_class: int, seconds: float = 0.2) -> Path:
    """A class-per-folder dataset (``class0/clip000.wav`` ...), the layout that must not give one-class batches."""
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            samples = signal(16_000, 1, seconds, seed=1000 * label + index)
            (root / f"class{label}" / f"clip{index:03d}.wav").write_bytes(encode(samples, 16_000, "WAV", "PCM_16"))
    return root


def parquet_table(rows: list[dict], corrupt_group: int | None = None) -> bytes:
    """An audio table (``audio`` structs, optional ``label``) in row groups of two rows. With
    ``corrupt_group``, the page header of that group's audio bytes is overwritten, as a bad disk or a
    broken upload leaves it: the footer and the other groups still read."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=2)
    data = bytearray(buffer.getvalue())
    if corrupt_group is not None:
        offset = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(corrupt_group).column(0).data_page_offset
        data[offset : offset + 16] = b"\xff" * 16
    return bytes(data)


PITCHES = {"low": 180.0, "mid": 420.0, "high": 1000.0}  # Hz: three classes a probe can tell apart


def write_pitch_folders(root: Path, per_class: dict[str, int], seconds: float = 1.0) -> Path:
    """Class folders of noisy harmonic tones around three pitches, one folder per split
    (``train/low/clip000.wav`` ...); every clip's pitch, harmonics and noise are drawn anew."""
    for split, count in per_class.items():
        for label, pitch in PITCHES.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                rng = np.random.default_rng([sum(split.encode()), int(pitch), index])
                t = np.arange(int(16_000 * seconds * rng.uniform(0.6, 1.0))) / 16_000
                f0 = pitch * rng.uniform(0.92, 1.08)
                tone = sum(rng.uniform(0.1, 0.3) / h * np.sin(2 * np.pi * f0 * h * t) for h in (1, 2, 3))
                samples = (tone + 0.03 * rng.standard_normal(len(t))).astype(np.float32)
                (folder / f"clip{index:03d}.wav").write_bytes(encode(samples, 16_000, "WAV", "PCM_16"))
    return root


def pitch_manifest(root: Path, destination: Path, true_labels: bool = True) -> Path:
    """The pitch clips as a manifest, labelled by their pitch folder or (``true_labels=False``) by labels
    that have nothing to do with them: probe scores far from 0 and 1, which any lost, duplicated or
    misordered clip would move."""
    rows = []
    for index, path in enumerate(sorted(root.rglob("*.wav"))):
        split = "validation" if "/validation/" in str(path) else "train"
        rows.append({"uri": str(path), "label": path.parent.name if true_labels else "abc"[index % 3], "split": split})
    with destination.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return destination


def random_label_manifest(root: Path, destination: Path) -> Path:
    return pitch_manifest(root, destination, true_labels=False)
