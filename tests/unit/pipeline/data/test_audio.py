"""Audio decoding: every kind of bad file gets its reason; long audio is split."""

from __future__ import annotations

import numpy as np
import pytest
from support.audio_files import BAD, write_collection

from pipeline.data.audio import AudioError, decode_audio, split_long_audio


def test_decode_classifies_every_bad_file(tmp_path):
    root = write_collection(tmp_path)
    for name, reason in BAD.items():
        with pytest.raises(AudioError) as error:
            decode_audio((root / name).read_bytes(), name)
        assert error.value.reason == reason, name
    decoded = decode_audio((root / "good/tone_44k_stereo.flac").read_bytes(), "x.flac")
    assert decoded.sample_rate == 16_000 and decoded.source_sample_rate == 44_100 and decoded.source_channels == 2
    assert decoded.waveform.dtype == np.float32 and decoded.duration_s == pytest.approx(0.8, abs=1e-3)


def test_split_long_audio():
    wave = np.arange(35, dtype=np.float32)
    assert [o for o, _ in split_long_audio(wave, 10, 1.0, "chunk", 0.3)] == [0.0, 1.0, 2.0, 3.0]  # 0.5 s tail kept
    assert [len(p) for _, p in split_long_audio(wave, 10, 1.0, "chunk", 0.6)] == [10, 10, 10]  # tail dropped
    assert [len(p) for _, p in split_long_audio(wave, 10, 1.0, "crop", 0.3)] == [10]
    assert len(split_long_audio(wave, 10, None, "crop", 0.3)[0][1]) == 35
