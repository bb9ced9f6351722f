"""Waveform → log-mel filterbank features and the SSAST/SSAMBA augmentations (docs/model.md#features).

The filterbank is a batched, device-agnostic re-implementation of the Kaldi fbank that SSAST and
SSAMBA compute with ``torchaudio.compliance.kaldi.fbank`` (docs/model.md#kaldi-fbank). Batching lets the same code
featurize many clips at once on a CPU worker or a GPU; the test suite checks it against torchaudio.

Order of operations used by the official data loader (docs/model.md#augmentations):
mixup (waveform) → fbank → crop/pad → SpecAugment → normalise → noise. Here features are stored once,
so mixup acts on batches of finished examples instead (:func:`mix_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128


# --------------------------------------------------------------------------------------------------
# Waveform handling
# --------------------------------------------------------------------------------------------------


def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """Mix a ``(channels, samples)`` waveform to ``(samples,)`` by channel mean, as the official
    AudioSet/LibriSpeech preprocessing does. A 1-D waveform is returned unchanged."""
    if waveform.dim() == 1:
        return waveform
    if waveform.dim() != 2:
        raise ValueError(f"expected (channels, samples) or (samples,), got shape {tuple(waveform.shape)}")
    return waveform.mean(dim=0)


def remove_dc(waveform: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last axis (the official loader's ``waveform - waveform.mean()``)."""
    return waveform - waveform.mean(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# Kaldi filterbank
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FbankConfig:
    """The SSAST call (docs/model.md#kaldi-fbank): 25 ms hanning frames every 10 ms, 128 mel bins from 20 Hz to
    Nyquist, pre-emphasis 0.97, per-frame DC removal, power spectrum, natural log, no dither."""

    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = NUM_MEL_BINS
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means an offset from Nyquist, as in Kaldi

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def fft_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi produces with ``snip_edges=True`` (0 when the clip is shorter than a window)."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift


def _mel_scale(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


@lru_cache(maxsize=16)
def _mel_filterbank(config: FbankConfig) -> torch.Tensor:
    """Triangular Kaldi mel filters, ``(num_mel_bins, fft_size // 2 + 1)``, float64 on the CPU.

    Triangles are linear in mel and built on FFT bin centres; the Nyquist bin gets no weight."""
    nyquist = 0.5 * config.sample_rate
    high_freq = config.high_freq if config.high_freq > 0 else nyquist + config.high_freq
    if not 0.0 <= config.low_freq < high_freq <= nyquist:
        raise ValueError(f"bad mel frequency range [{config.low_freq}, {high_freq}] for {config.sample_rate} Hz")
    num_fft_bins = config.fft_size // 2
    bin_freqs = torch.arange(num_fft_bins, dtype=torch.float64) * (config.sample_rate / config.fft_size)
    mel = _mel_scale(bin_freqs)
    mel_low = _mel_scale(torch.tensor(config.low_freq, dtype=torch.float64))
    mel_high = _mel_scale(torch.tensor(high_freq, dtype=torch.float64))
    delta = (mel_high - mel_low) / (config.num_mel_bins + 1)
    left = mel_low + delta * torch.arange(config.num_mel_bins, dtype=torch.float64)
    centre, right = left + delta, left + 2 * delta
    rising = (mel[None, :] - left[:, None]) / (centre - left)[:, None]
    falling = (right[:, None] - mel[None, :]) / (right - centre)[:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1))  # zero weight on the Nyquist bin


def fbank(waveforms: torch.Tensor, config: FbankConfig = FbankConfig()) -> torch.Tensor:
    """Log-mel filterbank of mono waveforms at ``config.sample_rate``.

    Accepts ``(samples,)`` or a batch ``(batch, samples)`` of equal-length clips and returns
    ``(frames, mel)`` or ``(batch, frames, mel)`` in the input's floating dtype. Clips shorter than
    one 25 ms window raise: Kaldi produces no frames for them.
    """
    squeeze = waveforms.dim() == 1
    batch = waveforms.unsqueeze(0) if squeeze else waveforms
    if batch.dim() != 2:
        raise ValueError(f"expected (samples,) or (batch, samples), got shape {tuple(waveforms.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"waveforms must be floating point, got {batch.dtype}")
    n_frames = config.num_frames(batch.shape[-1])
    if n_frames == 0:
        raise ValueError(
            f"audio of {batch.shape[-1]} samples is shorter than one {config.window_size}-sample window"
        )
    frames = batch.unfold(-1, config.window_size, config.window_shift)  # (B, frames, window)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi repeats sample 0
    frames = frames - config.preemphasis * previous
    window = torch.hann_window(config.window_size, periodic=False, dtype=batch.dtype, device=batch.device)
    frames = torch.nn.functional.pad(frames * window, (0, config.fft_size - config.window_size))
    power = torch.fft.rfft(frames).abs().pow(2)
    filters = _mel_filterbank(config).to(dtype=batch.dtype, device=batch.device)
    mel_energies = power @ filters.T
    log_mel = torch.log(torch.clamp(mel_energies, min=torch.finfo(batch.dtype).eps))
    return log_mel[0] if squeeze else log_mel


def waveform_to_fbank(waveform: torch.Tensor, config: FbankConfig = FbankConfig()) -> torch.Tensor:
    """The official per-clip recipe: mix to mono, remove DC over the whole clip, then the fbank."""
    return fbank(remove_dc(to_mono(waveform)), config)


# --------------------------------------------------------------------------------------------------
# Crop / pad and normalisation
# --------------------------------------------------------------------------------------------------


def crop_or_pad(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Keep the first ``target_length`` frames, or zero-pad at the end (docs/model.md#crop-and-pad; no random crop).

    Works on ``(frames, mel)`` and ``(batch, frames, mel)``."""
    n_frames = features.shape[-2]
    if n_frames >= target_length:
        return features[..., :target_length, :]
    return torch.nn.functional.pad(features, (0, 0, 0, target_length - n_frames))


@dataclass(frozen=True)
class NormStats:
    mean: float
    std: float


# Per-dataset fbank statistics of the official loader (docs/model.md#normalisation).
NORM_PRESETS: dict[str, NormStats] = {
    "audioset": NormStats(mean=-4.2677393, std=4.5689974),
    "esc50": NormStats(mean=-6.6268077, std=5.358466),
    "speechcommands": NormStats(mean=-6.845978, std=5.5654526),
    "urban8k": NormStats(mean=-5.138443946838379, std=4.229961395263672),
}


def norm_stats(preset: str) -> NormStats:
    try:
        return NORM_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown normalisation preset {preset!r}; choose from {sorted(NORM_PRESETS)}") from None


def normalize(features: torch.Tensor, stats: NormStats, in_place: bool = False) -> torch.Tensor:
    """``(x − mean) / (2·std)``: the official loader divides by twice the std. ``in_place`` overwrites
    ``features`` (same values, bit for bit): a training input normalising a fresh batch of half-megabyte
    examples spent two thirds of its time allocating and filling the two new tensors."""
    if in_place:
        return features.sub_(stats.mean).div_(2.0 * stats.std)
    return (features - stats.mean) / (2.0 * stats.std)


# --------------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------------


def _mask_along_axis(
    features: torch.Tensor, max_width: int, axis: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One band per example on ``axis`` of a ``(batch, frames, mel)`` tensor, drawn like torchaudio's
    ``mask_along_axis``: width ``w ~ U[0, max_width)``, start ``~ U[0, size − w)``."""
    batch, size = features.shape[0], features.shape[axis]
    width = torch.rand(batch, generator=generator) * max_width
    start = (torch.rand(batch, generator=generator) * (size - width)).long()
    end = (start.to(width.dtype) + width).long()
    positions = torch.arange(size)
    band = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])  # (batch, size)
    shape = [batch, 1, 1]
    shape[axis] = size
    return features.masked_fill(band.view(shape).to(features.device), 0.0)


def spec_augment(
    features: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One frequency mask and one time mask per clip, filled with 0.

    Apply it to raw log-mel features *before* normalisation, as the official loader does: masked
    cells then become ``(0 − mean) / (2·std)`` after normalising (docs/model.md#augmentations)."""
    batched = features if features.dim() == 3 else features.unsqueeze(0)
    if freq_mask > 0:
        batched = _mask_along_axis(batched, freq_mask, axis=2, generator=generator)
    if time_mask > 0:
        batched = _mask_along_axis(batched, time_mask, axis=1, generator=generator)
    return batched if features.dim() == 3 else batched[0]


def add_noise(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official noise augmentation on normalised features of one clip ``(frames, mel)``:
    add ``U[0,1) · u/10`` with ``u ~ U[0,1)`` per clip, then roll by −10…9 frames (circular)."""
    scale = torch.rand((), generator=generator) / 10.0
    noise = torch.rand(features.shape, generator=generator, dtype=features.dtype).to(features.device)
    shift = int(torch.randint(-10, 10, (), generator=generator))
    return torch.roll(features + noise * scale, shifts=shift, dims=-2)


def mix_batch(
    features: torch.Tensor, targets: torch.Tensor, probability: float, generator: np.random.Generator,
    alpha: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch mixup of examples and their float (one-/multi-hot) targets.

    Each example is, with ``probability``, mixed with another example of the batch drawn uniformly:
    ``λ·x_i + (1−λ)·x_j`` and ``λ·y_i + (1−λ)·y_j`` with λ ~ Beta(alpha, alpha) (the official 10, 10).
    The official loader mixes waveforms with partners from the whole dataset (docs/model.md#augmentations); stored
    fbanks leave the batch as the pool and the finished features as what is mixed."""
    size = features.shape[0]
    if size < 2 or probability <= 0:
        return features, targets
    partner = (np.arange(size) + generator.integers(1, size, size)) % size  # never the example itself
    lam = np.where(generator.random(size) < probability, generator.beta(alpha, alpha, size), 1.0)

    def mix(values: torch.Tensor) -> torch.Tensor:
        weight = torch.as_tensor(lam, dtype=values.dtype, device=values.device).view(-1, *[1] * (values.dim() - 1))
        return weight * values + (1.0 - weight) * values[torch.as_tensor(partner, device=values.device)]

    return mix(features), mix(targets)
