"""The stored feature format: what a featurize destination holds, and how an fbank is written and read.

One place owns it so that the featurize job, the training input, the embed job and the classifier
export agree: a row per source (or chunk of long audio) with its provenance and the raw, unnormalised
Kaldi log-mel fbank as ``STORED_PRECISION`` bytes, ``n_frames × n_mels``, row-major.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

STORED_PRECISION = "float16"  # half the bytes of float32; fbank values (about -15..25) keep ~3 decimals
_STORED_DTYPE = np.dtype(STORED_PRECISION)

FEATURE_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.string()), ("split", pa.string()), ("fold", pa.int32()),
    ("chunk", pa.int32()), ("offset_s", pa.float64()), ("duration_s", pa.float64()),
    ("source_sample_rate", pa.int32()), ("source_channels", pa.int32()),
    ("n_frames", pa.int32()), ("n_mels", pa.int32()), ("fbank", pa.binary()),
])
QUARANTINE_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
FBANK_COLUMNS = ["n_frames", "n_mels", "fbank"]  # what decoding a row needs


def encode_fbank(features: torch.Tensor) -> dict:
    """The columns of one ``(frames, mels)`` fbank as stored."""
    return {"n_frames": features.shape[0], "n_mels": features.shape[1],
            "fbank": features.to(torch.float16).numpy().tobytes()}


def decode_fbank(data: bytes, n_frames: int, n_mels: int) -> torch.Tensor:
    """A stored fbank back as a float32 ``(frames, mels)`` tensor."""
    return torch.from_numpy(np.frombuffer(data, dtype=_STORED_DTYPE).reshape(int(n_frames), int(n_mels)).astype(np.float32))
