"""Models by URI: the ``ssamba`` loaders (which read local files and file objects only, having no
S3 client) for anything :func:`pipeline.data.storage.resolve` reaches: ``s3://`` (custom endpoints via
``storage``), ``file://`` and local paths; and for MLflow models, ``models:/NAME/VERSION`` or
``models:/<model id>`` (from the store of ``MLFLOW_TRACKING_URI``; the project's weights-only file
inside the model is read, never the pickled module).

    from pipeline.models.loaders import load_classifier
    classifier = load_classifier("s3://bucket/runs/esc50-fold1/classifier.pt")
    classifier = load_classifier("models:/esc50-probe/3")
    encoder = from_pretrained("s3://bucket/runs/tiny/ssamba_encoder.pt")   # or a path, or "ssamba-tiny-400"
"""

from __future__ import annotations

import io

import torch

from pipeline.config import S3Config
from pipeline.data.storage import resolve
from pipeline.models.mlflow_models import MODELS_SCHEME, download_project_file, project_file_names
from ssamba import Checkpoint, Classifier, EncoderConfig, SSAMBAEncoder, hear
from ssamba import load_checkpoint as _load_checkpoint
from ssamba import load_classifier as _load_classifier
from ssamba.checkpoint import load_encoder_weights as _load_encoder_weights
from ssamba.pretrained import from_pretrained as _from_pretrained
from ssamba.pretrained import is_uri

ENCODER_FILE = "ssamba_encoder.pt"  # a pretraining run's encoder, beside its checkpoints and in its MLflow model
CLASSIFIER_FILE = "classifier.pt"  # a fine-tuning run's selected model, likewise


def read_model(uri: str, storage: S3Config | None = None, file_name: str = ENCODER_FILE) -> bytes:
    """The bytes of a model file, read once (then loaded from memory); for an MLflow model, its
    ``file_name``."""
    if uri.startswith(MODELS_SCHEME):
        return download_project_file(uri, file_name)
    return resolve(uri, storage).read_bytes()


def load_checkpoint(uri: str, storage: S3Config | None = None) -> Checkpoint:
    """One of our checkpoints (``ssamba.load_checkpoint``) at any URI."""
    return _load_checkpoint(io.BytesIO(read_model(uri, storage)))


def load_encoder_weights(uri: str, storage: S3Config | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """The encoder config and weights of our checkpoint, a classifier or an official SSAMBA ``.pth`` at any URI."""
    return _load_encoder_weights(read_encoder(uri, storage))


def load_hear_model(uri: str, storage: S3Config | None = None, windows_per_batch: int = 8,
                    pooling: str = hear.DEFAULT_POOLING) -> hear.HEARModel:
    """``ssamba.hear.load_model`` at any URI; ``""``: the random SSAMBA-tiny baseline."""
    return hear.load_model(read_encoder(uri, storage) if uri else "", windows_per_batch, pooling)


def load_classifier(uri: str, storage: S3Config | None = None) -> Classifier:
    """A fine-tuning job's exported classifier (``ssamba.load_classifier``) at any URI."""
    return _load_classifier(io.BytesIO(read_model(uri, storage, CLASSIFIER_FILE)))


def from_pretrained(uri: str, storage: S3Config | None = None) -> SSAMBAEncoder:
    """``ssamba.from_pretrained`` at any URI: the encoder (eval mode) of our checkpoint, an exported
    encoder, a classifier (its fine-tuned encoder) or an official SSAMBA ``.pth``. Local paths and
    preset names go to ``ssamba`` as they are."""
    return _from_pretrained(read_encoder(uri, storage) if is_uri(uri) else uri)


def read_encoder(uri: str, storage: S3Config | None = None) -> bytes:
    """The bytes of a file holding an encoder; of an MLflow model, its encoder or classifier file
    (whichever it holds: ``ssamba.load_encoder_weights`` reads both)."""
    if not uri.startswith(MODELS_SCHEME):
        return read_model(uri, storage)
    held = project_file_names(uri)
    file_name = next((name for name in (ENCODER_FILE, CLASSIFIER_FILE) if name in held), None)
    if file_name is None:
        raise ValueError(f"{uri}: not an SSAMBA model (its files {held} hold neither {ENCODER_FILE} nor {CLASSIFIER_FILE})")
    return download_project_file(uri, file_name)
