"""Features against torchaudio's Kaldi fbank (the SSAST call) and the augmentation contracts."""

import numpy as np
import pytest
import torch
import torchaudio

from ssamba import features as F


def ssast_fbank(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The official call (docs/model.md#kaldi-fbank), on a (1, samples) waveform with its mean removed."""
    return torchaudio.compliance.kaldi.fbank(
        waveform - waveform.mean(), htk_compat=True, sample_frequency=sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )


@pytest.mark.parametrize("num_samples", [400, 401, 16_000, 33_333])
@pytest.mark.parametrize("sample_rate", [16_000, 8_000])
def test_fbank_matches_torchaudio_kaldi(num_samples, sample_rate):
    generator = torch.Generator().manual_seed(num_samples + sample_rate)
    t = torch.arange(num_samples) / sample_rate
    waveform = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(num_samples, generator=generator)
    expected = ssast_fbank(waveform[None], sample_rate)
    actual = F.waveform_to_fbank(waveform, F.FbankConfig(sample_rate=sample_rate))
    assert actual.shape == expected.shape == (1 + (num_samples - int(0.025 * sample_rate)) // int(0.01 * sample_rate), 128)
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


def test_fbank_frame_counts_follow_spec():
    config = F.FbankConfig()
    assert [config.num_frames(n) for n in (160_000, 80_000, 16_000, 399)] == [998, 498, 98, 0]


def test_batched_fbank_equals_per_clip():
    waveforms = torch.randn(3, 8000, generator=torch.Generator().manual_seed(0))
    batched = F.fbank(waveforms)
    for i in range(3):
        torch.testing.assert_close(batched[i], F.fbank(waveforms[i]))


def test_fbank_rejects_too_short_and_integer_audio():
    with pytest.raises(ValueError, match="shorter than one"):
        F.fbank(torch.zeros(399))
    with pytest.raises(TypeError):
        F.fbank(torch.zeros(1000, dtype=torch.int16))


def test_silence_gives_floor_not_nan():
    out = F.fbank(torch.zeros(16_000))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full_like(out, np.log(torch.finfo(torch.float32).eps)))


def test_to_mono_averages_channels_and_remove_dc():
    stereo = torch.stack([torch.ones(10), 3 * torch.ones(10)])
    assert torch.equal(F.to_mono(stereo), 2 * torch.ones(10))
    centred = F.remove_dc(torch.arange(5.0))
    assert torch.allclose(centred, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))


def test_crop_keeps_first_frames_and_pad_appends_zeros():
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(F.crop_or_pad(x, 4), x[:4])
    padded = F.crop_or_pad(x, 8)
    assert torch.equal(padded[:6], x) and torch.equal(padded[6:], torch.zeros(2, 2))
    assert F.crop_or_pad(torch.zeros(2, 6, 2), 3).shape == (2, 3, 2)


def test_normalize_uses_twice_the_std():
    stats = F.norm_stats("audioset")
    assert stats == F.NormStats(-4.2677393, 4.5689974)
    assert F.normalize(torch.tensor([stats.mean + 2 * stats.std]), stats).item() == pytest.approx(1.0)
    assert F.norm_stats("speechcommands").mean == pytest.approx(-6.845978)
    with pytest.raises(ValueError, match="unknown normalisation preset"):
        F.norm_stats("librispeech")


def test_normalize_in_place_gives_the_same_bits_in_the_tensor_it_was_given():
    stats = F.norm_stats("audioset")
    features = torch.randn(3, 40, 128, dtype=torch.float64).float() * 5 - 4
    expected = F.normalize(features, stats)
    result = F.normalize(features, stats, in_place=True)
    assert result.data_ptr() == features.data_ptr() and torch.equal(result, expected)


def test_spec_augment_masks_one_band_per_axis_with_zeros():
    features = torch.full((4, 100, 128), 5.0)
    out = F.spec_augment(features, freq_mask=48, time_mask=30, generator=torch.Generator().manual_seed(1))
    for clip in out:
        masked_bins = (clip == 0).all(dim=0).nonzero().flatten()
        masked_frames = (clip == 0).all(dim=1).nonzero().flatten()
        for band, limit in ((masked_bins, 48), (masked_frames, 30)):
            assert len(band) < limit
            if len(band):
                assert torch.equal(band, torch.arange(band[0], band[0] + len(band)))  # contiguous
        # Every zero lies in the frequency band or the time band; everything else is untouched.
        zero = clip == 0
        in_band = torch.zeros_like(zero)
        in_band[:, masked_bins] = True
        in_band[masked_frames, :] = True
        assert torch.equal(zero, in_band)
    assert not torch.equal(out[0] == 0, out[1] == 0)  # independent per clip


def test_spec_augment_before_normalisation_fills_with_normalised_zero():
    stats = F.norm_stats("audioset")
    out = F.normalize(F.spec_augment(torch.full((8, 50, 128), -4.0), 64, 0, torch.Generator().manual_seed(3)), stats)
    expected = sorted([(-4.0 - stats.mean) / (2 * stats.std), -stats.mean / (2 * stats.std)])
    assert torch.unique(out).tolist() == pytest.approx(expected, abs=1e-6)


def test_add_noise_is_small_positive_and_rolls_time():
    features = torch.zeros(50, 8)
    features[0] = 100.0
    out = F.add_noise(features, torch.Generator().manual_seed(0))
    shifted_row = int((out[:, 0] > 50).nonzero())
    assert shifted_row in list(range(0, 10)) + list(range(40, 50))  # roll by -10..9
    noise = torch.roll(out, -shifted_row, dims=0) - features
    assert (noise >= 0).all() and (noise < 0.1).all()


def test_mix_batch_with_probability_zero_changes_nothing():
    features, targets = torch.randn(6, 10, 4), torch.eye(6)
    mixed, soft = F.mix_batch(features, targets, 0.0, np.random.default_rng(0))
    assert torch.equal(mixed, features) and torch.equal(soft, targets)


def test_mix_batch_mixes_every_row_with_another_by_one_lambda():
    rng = np.random.default_rng(1)
    features = torch.randn(8, 10, 4, dtype=torch.float64)
    # One-hot columns identify each row's partner and λ; the multi-hot columns must mix the same way.
    multi_hot = torch.from_numpy(rng.integers(0, 2, (8, 3))).double()
    targets = torch.cat([torch.eye(8, dtype=torch.float64), multi_hot], dim=1)
    mixed, soft = F.mix_batch(features, targets, 1.0, rng)
    assert mixed.shape == features.shape and soft.shape == targets.shape
    torch.testing.assert_close(soft[:, :8].sum(dim=1), torch.ones(8, dtype=torch.float64))  # one-hot sums kept
    for row in range(8):
        (partner,) = [j for j in range(8) if j != row and soft[row, j] > 0]
        lam = soft[row, row].item()
        assert 0.0 < lam < 1.0
        torch.testing.assert_close(mixed[row], lam * features[row] + (1 - lam) * features[partner])
        torch.testing.assert_close(soft[row], lam * targets[row] + (1 - lam) * targets[partner])
