"""Fine-tuned classifiers people can use: one file with everything a prediction needs.

A classifier file holds the encoder config and weights, the head, the class names, the feature
settings the model was trained on (fbank, clip length, normalisation, how the training input stored
the features), the pooling and how the head was trained (softmax for cross-entropy, sigmoid for
per-class binary cross-entropy; multi-label or not). It is a plain dict of tensors and primitive
values, so it loads with ``torch.load(weights_only=True)``.

``load_classifier`` reads a local path, a file object or bytes; URIs (``s3://...``) are the
pipeline's business (``pipeline.models.loaders.load_classifier``), since this package never imports boto3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Literal, TypeVar

import torch

from ssamba.checkpoint import CLASSIFIER_FORMAT, Source, read_payload
from ssamba.encoder import EncoderConfig, SSAMBAEncoder
from ssamba.features import FbankConfig, NormStats, crop_or_pad, normalize, to_mono, waveform_to_fbank
from ssamba.finetune import AudioClassifier, ClassifierConfig

FORMAT = CLASSIFIER_FORMAT
VERSION = 1

Activation = Literal["softmax", "sigmoid"]
ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")
STORED_PRECISIONS: tuple[str, ...] = ("float32", "float16")
T = TypeVar("T")


@dataclass(frozen=True)
class FeatureSettings:
    """How a waveform becomes the model's input, exactly as in training: Kaldi fbank, rounded to the
    precision the training input stored it in (the featurize job keeps float16), the first
    ``target_length`` frames (zero-padded), then normalised."""

    fbank: FbankConfig
    target_length: int
    norm: NormStats
    stored_precision: str = "float32"

    def __post_init__(self) -> None:
        if self.stored_precision not in STORED_PRECISIONS:
            raise ValueError(f"stored_precision must be one of {STORED_PRECISIONS}, got {self.stored_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSettings:
        return cls(FbankConfig(**data["fbank"]), int(data["target_length"]), NormStats(**data["norm"]),
                   data["stored_precision"])

    def from_fbank(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw log-mel ``(…, frames, mel)`` (as computed or stored) → normalised model input."""
        if self.stored_precision == "float16":
            raw = raw.to(torch.float16)
        return normalize(crop_or_pad(raw.float(), self.target_length), self.norm)


@dataclass(frozen=True)
class WindowPredictions:
    """:meth:`Classifier.predict_windows` of one clip."""

    probabilities: torch.Tensor  # (windows, classes)
    starts: torch.Tensor  # (windows,): where each window starts, in seconds from the clip's start
    pooled: torch.Tensor  # (classes,): the windows pooled into the clip's prediction


class Classifier:
    """A loaded classifier: ``predict`` a waveform's class probabilities (``predict_batch`` many clips,
    ``predict_windows`` every window of a long one); ``classes`` names them."""

    def __init__(self, model: AudioClassifier, classes: list[str], features: FeatureSettings,
                 activation: Activation, multi_label: bool, metadata: dict[str, Any] | None = None) -> None:
        if len(classes) != model.config.num_classes:
            raise ValueError(f"{len(classes)} class names for a head of {model.config.num_classes} classes")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.model, self.classes, self.features = model.eval(), list(classes), features
        self.activation, self.multi_label, self.metadata = activation, multi_label, metadata or {}

    @property
    def sample_rate(self) -> int:
        return self.features.fbank.sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> Classifier:
        self.model.to(device)
        return self

    def fbank(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``(samples,)`` or ``(channels, samples)`` at ``sample_rate`` → raw log-mel ``(frames, mel)``:
        mixed to mono, resampled to the model's rate (as the pipeline decodes audio), DC removed."""
        mono = to_mono(torch.as_tensor(waveform, dtype=torch.float32))
        if sample_rate != self.sample_rate:
            import torchaudio  # only when resampling: torchaudio is heavy to import

            mono = torchaudio.functional.resample(mono, sample_rate, self.sample_rate)
        return waveform_to_fbank(mono, self.features.fbank)

    def predict_fbank(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw log-mel ``(batch, frames, mel)`` → class probabilities ``(batch, classes)``."""
        return self._predict_inputs(self.features.from_fbank(raw))

    def predict(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Class probabilities ``(classes,)`` of one clip, in the order of :attr:`classes`. A clip
        longer than the model's input is cut to its first ``target_length`` frames, as in training
        (:meth:`predict_windows` covers all of it)."""
        return self.predict_batch([waveform], sample_rate)[0]

    def predict_batch(self, waveforms: Sequence[torch.Tensor] | torch.Tensor, sample_rate: int,
                      lengths: Sequence[int] | torch.Tensor | None = None, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``(batch, classes)`` of clips of any lengths, each computed as
        :meth:`predict` computes it: a list of ``(samples,)`` or ``(channels, samples)`` waveforms, or a
        padded tensor ``(batch, [channels,] samples)`` with ``lengths`` (samples per clip), which cut the
        padding off before the fbank so that it never reaches the features (nor the DC removal). Each
        clip is featurized alone, since the fbank needs one length per call; the model then runs
        ``batch_size`` clips at a time."""
        clips = _clips(waveforms, lengths)
        return self._predict_each(clips, lambda clip: self.features.from_fbank(self.fbank(clip, sample_rate)),
                                  batch_size)

    def predict_windows(self, waveform: torch.Tensor, sample_rate: int, hop_seconds: float | None = None,
                        batch_size: int = 32) -> WindowPredictions:
        """Class probabilities of every ``target_length``-frame window of one clip, for audio longer
        than the model's input. The fbank is computed once over the whole clip (as training computed
        it per clip) and cut into windows ``hop_seconds`` apart (default: the window length, no
        overlap) until a window reaches the clip's end; a last partial window is zero-padded, as
        training pads short clips. ``pooled`` is the clip's prediction: the mean of the windows for
        softmax (it stays a distribution over classes), their maximum for sigmoid (a label is
        present in the clip when it is present in any window, as in clip-level tagging)."""
        raw = self.fbank(waveform, sample_rate)
        window, frame_seconds = self.features.target_length, self.features.fbank.window_shift / self.sample_rate
        hop = window if hop_seconds is None else round(hop_seconds / frame_seconds)
        if hop < 1:
            raise ValueError(f"hop_seconds must be at least one frame ({frame_seconds} s), got {hop_seconds}")
        # A window starts only while the previous one ended before the clip did: none is empty or redundant.
        starts = [start for start in range(0, raw.shape[0], hop) if start == 0 or start - hop + window < raw.shape[0]]
        probabilities = self._predict_each(starts, lambda start: self.features.from_fbank(raw[start : start + window]),
                                           batch_size)
        pooled = probabilities.mean(dim=0) if self.activation == "softmax" else probabilities.amax(dim=0)
        return WindowPredictions(probabilities, torch.tensor(starts, dtype=torch.float64) * frame_seconds, pooled)

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities, most probable first."""
        values, indices = probabilities.topk(min(k, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def top_k_rows(self, probabilities: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """:meth:`top_k` of each row of ``(rows, classes)``: each clip of a batch, each window of a clip."""
        return [self.top_k(row, k) for row in probabilities]

    def _predict_each(self, items: Sequence[T], to_input: Callable[[T], torch.Tensor], batch_size: int) -> torch.Tensor:
        """Probabilities ``(len(items), classes)`` on the CPU of the model inputs ``to_input(item)``, built
        and run ``batch_size`` at a time so that memory does not grow with the number of items."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return torch.cat([
            self._predict_inputs(torch.stack([to_input(item) for item in items[start : start + batch_size]])).cpu()
            for start in range(0, len(items), batch_size)
        ])

    def _predict_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised model inputs ``(batch, target_length, mel)`` → probabilities ``(batch, classes)``."""
        with torch.no_grad():
            logits = self.model(inputs.to(self.device)).float()
        return logits.softmax(dim=-1) if self.activation == "softmax" else logits.sigmoid()


def _clips(waveforms: Sequence[torch.Tensor] | torch.Tensor,
           lengths: Sequence[int] | torch.Tensor | None) -> list[torch.Tensor]:
    """The clips of a batch, each cut to its length; clear errors for what cannot be a batch."""
    if isinstance(waveforms, torch.Tensor) and waveforms.dim() < 2:
        raise ValueError(f"a batch of waveforms is (batch, [channels,] samples), got shape {tuple(waveforms.shape)}; "
                         "predict takes one clip")
    clips = list(waveforms)
    if not clips:
        raise ValueError("no waveforms to predict: pass at least one clip")
    if lengths is None:
        return clips
    lengths = [int(length) for length in lengths]
    if len(lengths) != len(clips):
        raise ValueError(f"{len(lengths)} lengths for {len(clips)} waveforms: give one length (in samples) per clip")
    for index, (clip, length) in enumerate(zip(clips, lengths)):
        if not 0 < length <= clip.shape[-1]:
            raise ValueError(f"length {length} of clip {index} is not between 1 and its {clip.shape[-1]} samples")
    return [clip[..., :length] for clip, length in zip(clips, lengths)]


def save_classifier(destination: str | os.PathLike | BinaryIO, model: AudioClassifier, classes: list[str],
                    features: FeatureSettings, activation: Activation, multi_label: bool,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` with everything :func:`load_classifier` needs to predict as it did in training.
    ``metadata`` must hold only primitive values (it is read back with ``weights_only=True``)."""
    Classifier(model, classes, features, activation, multi_label)  # the same checks as on loading
    torch.save({
        "format": FORMAT,
        "version": VERSION,
        "encoder_config": model.encoder.config.to_dict(),
        "pooling": model.config.pooling,
        "classes": list(classes),
        "features": features.to_dict(),
        "activation": activation,
        "multi_label": multi_label,
        "metadata": metadata or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }, destination)


def load_classifier(source: Source) -> Classifier:
    """A classifier from a local path, a file object or bytes (never executes pickled code); for
    ``s3://`` and other URIs use ``pipeline.models.loaders.load_classifier``."""
    payload = read_payload(source)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not an SSAMBA classifier file (a fine-tuning job exports one as classifier.pt)")
    if payload["version"] > VERSION:
        raise ValueError(f"classifier version {payload['version']} is newer than this library's {VERSION}")
    classes = list(payload["classes"])
    encoder = SSAMBAEncoder(EncoderConfig.from_dict(payload["encoder_config"]))
    model = AudioClassifier(encoder, ClassifierConfig(len(classes), payload["pooling"]))
    model.load_state_dict(payload["state_dict"])
    return Classifier(model, classes, FeatureSettings.from_dict(payload["features"]), payload["activation"],
                      bool(payload["multi_label"]), payload.get("metadata", {}))
