"""Fine-tuned classifiers people can use: one file with everything a prediction needs.

A classifier file holds the encoder config and weights, the head, the class names, the feature
settings the model was trained on (fbank, clip length, normalisation, how the training input stored
the features), the pooling and how the head was trained (softmax for cross-entropy, sigmoid for
per-class binary cross-entropy; multi-label or not). It is a plain dict of tensors and primitive
values, so it loads with ``torch.load(weights_only=True)``.

``load_classifier`` reads a local path, a file object or bytes; URIs (``s3://...``) are the
pipeline's business (``pipeline.models.load_classifier``), since this package never imports boto3.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Literal

import torch

from ssamba.checkpoint import Source, read_payload
from ssamba.encoder import EncoderConfig, SSAMBAEncoder
from ssamba.features import FbankConfig, NormStats, crop_or_pad, fbank, normalize, remove_dc, to_mono
from ssamba.finetune import AudioClassifier, ClassifierConfig

FORMAT = "ssamba-classifier"
VERSION = 1

Activation = Literal["softmax", "sigmoid"]
ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")
STORED_PRECISIONS: tuple[str, ...] = ("float32", "float16")


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


class Classifier:
    """A loaded classifier: ``predict`` a waveform's class probabilities; ``classes`` names them."""

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
        return fbank(remove_dc(mono), self.features.fbank)

    def predict_fbank(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw log-mel ``(batch, frames, mel)`` → class probabilities ``(batch, classes)``."""
        inputs = self.features.from_fbank(raw).to(self.device)
        with torch.no_grad():
            logits = self.model(inputs).float()
        return logits.softmax(dim=-1) if self.activation == "softmax" else logits.sigmoid()

    def predict(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Class probabilities ``(classes,)`` of one clip, in the order of :attr:`classes`. A clip
        longer than the model's input is cut to its first ``target_length`` frames, as in training."""
        return self.predict_fbank(self.fbank(waveform, sample_rate)[None])[0].cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities, most probable first."""
        values, indices = probabilities.topk(min(k, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


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
    ``s3://`` and other URIs use ``pipeline.models.load_classifier``."""
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
