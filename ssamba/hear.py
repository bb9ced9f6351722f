"""The HEAR 2021 API for SSAMBA encoders: ``load_model``, ``get_timestamp_embeddings``,
``get_scene_embeddings``.

Audio (16 kHz, float32 in [-1, 1]) → Kaldi fbank (normalised with the AudioSet statistics) →
overlapping 16×16 patches with a time stride of 4 frames, so that each time column of patches is
40 ms after the previous one. A timestamp embedding is made of the encoder outputs of the column's
frequency patches; the scene embedding is the mean over all timestamps. ``pooling`` says how a
column's patches are combined (``ssamba.probes.POOLINGS``, the same names the pretraining probe uses):

- ``bands``: side by side, frequency band by band (F·D values). The scene embedding is then the mean
  over time of each band: it keeps the spectral layout the encoder learned, which a mean over every
  patch averages away.
- ``mean``: their mean (D values), the compact choice.
- ``both``: the mean, then the bands ((F+1)·D values): timbre-like tasks favour the bands, contour-like
  ones (tone) the mean (BENCHMARKS.md).

Audio of any length is encoded in windows of the pretraining length (1024 frames); consecutive
windows overlap so that the timestamps stay on one regular 40 ms grid across window boundaries.
Sounds shorter than one patch (16 frames, 0.175 s) are zero-padded to it.
"""

from __future__ import annotations

import torch
from torch import nn

from ssamba.checkpoint import Source, load_encoder_weights
from ssamba.encoder import EncoderConfig, PatchGrid, SSAMBAEncoder
from ssamba.features import FbankConfig, fbank, norm_stats, normalize, remove_dc
from ssamba.finetune import encoder_on_grid
from ssamba.probes import DEFAULT_POOLING, POOLINGS, column_embeddings, embedding_size

SAMPLE_RATE = 16_000
TIME_STRIDE = 4  # frames: 40 ms between timestamps
FRAME_MS = 10.0


class HEARModel(nn.Module):
    """An SSAMBA encoder on the HEAR patch grid, with the attributes the HEAR API requires."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: SSAMBAEncoder, windows_per_batch: int = 8, pooling: str = DEFAULT_POOLING) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder.eval()
        self.grid = encoder.config.grid
        self.pooling = pooling
        self.scene_embedding_size = self.timestamp_embedding_size = embedding_size(self.grid, encoder.embed_dim, pooling)
        self.windows_per_batch = windows_per_batch
        self.fbank_config = FbankConfig(sample_rate=self.sample_rate, num_mel_bins=self.grid.num_mel_bins)

    @property
    def columns_per_window(self) -> int:
        return self.grid.time_patches

    @property
    def window_hop(self) -> int:
        """Frames between window starts: keeps every column on one regular grid."""
        return self.columns_per_window * self.grid.tstride

    def column_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised fbank windows ``(n, target_length, mel)`` → ``(n, columns, embedding size)``."""
        grid = self.grid
        outputs = []
        for start in range(0, features.shape[0], self.windows_per_batch):
            tokens = self.encoder(features[start : start + self.windows_per_batch])[:, 1:]
            tokens = tokens.reshape(tokens.shape[0], grid.freq_patches, grid.time_patches, -1)
            outputs.append(column_embeddings(tokens, self.pooling))
        return torch.cat(outputs)


def _encoder_for_hear(config: EncoderConfig, state: dict[str, torch.Tensor]) -> SSAMBAEncoder:
    """The pretrained encoder on the HEAR grid: the same kernel with a time stride of 4 frames."""
    source = config.grid
    target = PatchGrid(source.num_mel_bins, source.target_length, source.fshape, source.tshape,
                       source.fstride, TIME_STRIDE)
    return encoder_on_grid(config, state, target)


def load_model(model_file_path: Source = "", windows_per_batch: int = 8, pooling: str = DEFAULT_POOLING) -> HEARModel:
    """Load an encoder from one of our checkpoints or an official SSAMBA ``.pth``: a local path, a file
    object or bytes (for ``s3://`` and other URIs, ``pipeline.models.loaders.load_hear_model``); ``pooling``:
    one of :data:`POOLINGS` (see the module's docstring).

    With no path, a randomly initialised SSAMBA-tiny (fixed seed): a baseline, not a trained model."""
    if not model_file_path:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        config = EncoderConfig.from_size("tiny")
        state = SSAMBAEncoder(config).state_dict()
        torch.random.set_rng_state(generator_state)
    else:
        config, state = load_encoder_weights(model_file_path)
    return HEARModel(_encoder_for_hear(config, state), windows_per_batch, pooling)


def model_inputs(audio: torch.Tensor, model: HEARModel) -> torch.Tensor:
    """``(n_sounds, n_samples)`` → the model's input, normalised fbank ``(n_sounds, frames, mel)`` at least
    one patch long: what :func:`timestamp_embeddings_from_features` takes (the embed job calls it too)."""
    if audio.dim() != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {tuple(audio.shape)}")
    min_samples = model.fbank_config.window_size + (model.grid.tshape - 1) * model.fbank_config.window_shift
    if audio.shape[1] < min_samples:
        audio = torch.nn.functional.pad(audio, (0, min_samples - audio.shape[1]))
    features = fbank(remove_dc(audio.float()), model.fbank_config)
    return normalize(features, norm_stats("audioset"))


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_sounds, n_samples)`` → embeddings ``(n_sounds, n_timestamps, size)`` and timestamps in ms
    ``(n_sounds, n_timestamps)``, every 40 ms, each at the centre of its 16-frame patch column."""
    return timestamp_embeddings_from_features(model_inputs(audio, model), model)


def timestamp_embeddings_from_features(features: torch.Tensor, model: HEARModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from normalised fbank features ``(n_sounds, frames, mel)`` of at least 16 frames
    (e.g. stored by the featurize job), skipping the waveform stage."""
    model.eval()  # embeddings are deterministic: no drop-path
    grid = model.grid
    n_sounds, frames = features.shape[0], features.shape[1]
    if frames < grid.tshape:
        features = torch.nn.functional.pad(features, (0, 0, 0, grid.tshape - frames))
        frames = grid.tshape
    n_columns = (frames - grid.tshape) // grid.tstride + 1
    n_windows = -(-n_columns // model.columns_per_window)
    windows = []
    for index in range(n_windows):
        window = features[:, index * model.window_hop : index * model.window_hop + grid.target_length]
        windows.append(torch.nn.functional.pad(window, (0, 0, 0, grid.target_length - window.shape[1])))
    stacked = torch.stack(windows, dim=1).flatten(0, 1)  # (n_sounds · n_windows, target_length, mel)
    with torch.no_grad():
        columns = model.column_embeddings(stacked)
    embeddings = columns.reshape(n_sounds, n_windows * model.columns_per_window, -1)[:, :n_columns]
    centres = torch.arange(n_columns, dtype=torch.float32) * grid.tstride + grid.tshape / 2
    timestamps = (centres * FRAME_MS).to(embeddings.device).expand(n_sounds, -1)
    return embeddings.float().contiguous(), timestamps.contiguous()


def get_scene_embeddings(audio: torch.Tensor, model: HEARModel) -> torch.Tensor:
    """``(n_sounds, n_samples)`` → ``(n_sounds, size)``: the mean of the timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)
