"""The stored fbank format read a batch at a time, against the one-clip path it replaces: decode each clip,
crop or pad it (``ssamba.features.crop_or_pad``), normalise it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.config import ExamplesConfig
from pipeline.data.examples import crop_examples, finish_examples, to_examples
from pipeline.data.feature_store import decode_cropped, decode_fbank, encode_fbank
from ssamba.features import crop_or_pad, norm_stats, normalize


def stored_batch(frame_counts: list[int], mels: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(frame_counts))
    rows = [encode_fbank(torch.from_numpy(rng.normal(-4.0, 3.0, (frames, mels)).astype(np.float32)))
            for frames in frame_counts]
    return {"fbank": np.array([row["fbank"] for row in rows], dtype=object),
            "n_frames": np.array([row["n_frames"] for row in rows]), "n_mels": np.array([row["n_mels"] for row in rows]),
            "label": np.array(["a"] * len(rows), dtype=object), "uri": np.array([f"clip{i}" for i in range(len(rows))])}


@pytest.mark.parametrize("target_length", [1, 24, 40, 90])
def test_a_batch_decodes_to_each_clip_cropped_or_padded(target_length):
    batch = stored_batch([40, 7, 1, 90, 24])
    decoded = decode_cropped(batch["fbank"], batch["n_frames"], batch["n_mels"], target_length)
    assert decoded.dtype == np.float32 and decoded.shape == (5, target_length, 16)
    for row, (data, frames, mels) in enumerate(zip(batch["fbank"], batch["n_frames"], batch["n_mels"])):
        expected = crop_or_pad(decode_fbank(data, frames, mels), target_length)
        np.testing.assert_array_equal(decoded[row], expected.numpy())


def test_examples_are_the_normalised_crops_with_their_kept_frame_counts():
    batch = stored_batch([30, 5, 64])
    config = ExamplesConfig(features="unused", target_length=32, norm="audioset")
    examples = to_examples(batch, config)
    stats = norm_stats("audioset")
    for row, (data, frames, mels) in enumerate(zip(batch["fbank"], batch["n_frames"], batch["n_mels"])):
        expected = normalize(crop_or_pad(decode_fbank(data, frames, mels), 32).double(), stats)
        np.testing.assert_allclose(examples["fbank"][row], expected.numpy(), rtol=1e-6, atol=1e-6)
    assert examples["frames"].tolist() == [30, 5, 32] and list(examples["uri"]) == ["clip0", "clip1", "clip2"]


def test_training_crops_keep_the_stored_values_and_finishing_them_gives_the_examples():
    """The training input carries float16 crops and finishes them on the training device: the stored values
    exactly, and once finished the same examples, bit for bit, as finishing in the read tasks."""
    batch = stored_batch([30, 5, 64])
    config = ExamplesConfig(features="unused", target_length=32, norm="audioset")
    crops = crop_examples(batch, config)
    assert crops["fbank"].dtype == np.float16 and crops["frames"].tolist() == [30, 5, 32]
    for row, (data, frames, mels) in enumerate(zip(batch["fbank"], batch["n_frames"], batch["n_mels"])):
        expected = crop_or_pad(decode_fbank(data, frames, mels), 32)
        np.testing.assert_array_equal(crops["fbank"][row].astype(np.float32), expected.numpy())
    crops_tensor = torch.from_numpy(crops["fbank"])
    finished = finish_examples(crops_tensor, config)
    assert finished.dtype == torch.float32 and crops_tensor.dtype == torch.float16  # its input left as it was
    np.testing.assert_array_equal(finished.numpy(), to_examples(batch, config)["fbank"])


def test_a_batch_mixing_mel_bin_counts_is_refused():
    first, second = stored_batch([4], mels=16), stored_batch([4], mels=8)
    with pytest.raises(ValueError, match=r"several mel-bin counts: \[8, 16\]"):
        decode_cropped([*first["fbank"], *second["fbank"]], [4, 4], [16, 8], 4)


def test_stored_fbank_round_trip_keeps_float16_precision():
    from pipeline.data.feature_store import STORED_PRECISION, decode_fbank, encode_fbank

    reference = torch.linspace(-15.0, 25.0, 7 * 128, dtype=torch.float64).reshape(7, 128)
    stored = encode_fbank(reference.float())
    assert (stored["n_frames"], stored["n_mels"], len(stored["fbank"])) == (7, 128, 7 * 128 * 2)
    restored = decode_fbank(stored["fbank"], stored["n_frames"], stored["n_mels"])
    assert restored.dtype == torch.float32 and STORED_PRECISION == "float16"
    assert (restored.double() - reference).abs().max() <= 25.0 * 2**-11  # half an ulp of float16 at 25


def test_every_finite_float16_decodes_to_the_float32_numpy_gives_and_nothing_warns():
    """torch converts the stored halves (numpy took ten times as long): against numpy's conversion of every
    finite float16 bit pattern, which is exact in float32."""
    bits = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = bits[np.isfinite(bits)]
    data = finite.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the read-only bytes: torch's warning stays inside the decoder
        decoded = decode_fbank(data, len(finite) // 2, 2)
        cropped = decode_cropped([data], [len(finite) // 2], [2], len(finite) // 2 + 3)
    expected = finite.astype(np.float32).reshape(-1, 2)
    np.testing.assert_array_equal(decoded.numpy().view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(cropped[0, :-3], expected)
    assert not cropped[0, -3:].any()
