"""The configs of the data jobs: ``pipeline.featurize`` and ``pipeline.embed``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Place, Strict, _require_exactly_one, one_of
from pipeline.config.sections import AudioConfig, InputConfig, RayConfig
from pipeline.data.storage import S3Config
from ssamba import FbankConfig, hear


class FeaturizeConfig(Strict):
    """``python -m pipeline.featurize``: audio under ``input`` → fbank Parquet shards at ``output``."""

    input: InputConfig
    output: Place = Field(description="destination URI (s3://bucket/prefix or a local folder)")
    storage: S3Config = S3Config()
    audio: AudioConfig = AudioConfig()
    num_mel_bins: int = Field(FbankConfig().num_mel_bins, ge=8, description="mel bins per frame")
    shard_size: int = Field(256, ge=1, description="audio files per output shard (the unit of resume)")
    num_workers: int | None = Field(None, ge=1, description="featurizer actors; default: every CPU in the cluster")
    ray: RayConfig = RayConfig()

    def fbank_config(self) -> FbankConfig:
        """The Kaldi fbank settings of the stored features (the others are the library's fixed ones)."""
        return FbankConfig(sample_rate=self.audio.sample_rate, num_mel_bins=self.num_mel_bins)


class EmbedConfig(Strict):
    """``python -m pipeline.embed``: scene and/or timestamp embeddings of audio (or of featurize
    output) with a pretrained encoder, by Ray Data batch inference."""

    input: InputConfig | None = None
    features: Place | None = Field(None, description="a featurize destination URI, instead of audio")
    output: Place = Field(description="destination URI (s3://bucket/prefix or a local folder)")
    model: Place = Field("", description="our checkpoint or an official .pth (local or s3://); empty = random tiny")
    storage: S3Config = S3Config()
    audio: AudioConfig = AudioConfig()
    embeddings: Literal["scene", "timestamp", "both", "none"] = Field(
        "scene", description="one vector per clip, one per time step, both, or none (labels only: needs classifier)")
    pooling: one_of(hear.POOLINGS) = Field(
        hear.DEFAULT_POOLING, description="how a time step's frequency patches combine: bands (side by side, F x D "
        "values; keeps the spectral layout), mean (D values, compact) or both ((F+1) x D)")
    classifier: Place | None = Field(None, description="a fine-tuning job's exported classifier.pt (local or s3://): "
                                     "adds each source's top_k labels and probabilities")
    top_k: int = Field(5, ge=1, description="labels written per source when a classifier is given")
    batch_size: int = Field(8, ge=1, description="files per inference call")
    shard_size: int = Field(64, ge=1, description="audio files per output shard, the unit a re-run redoes (stored "
                            "features keep their featurize shards)")
    num_workers: int | None = Field(None, ge=1, description="inference actors; default: as the cluster fits")
    use_gpu: bool = Field(False, description="one GPU per actor")
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> EmbedConfig:
        _require_exactly_one(self, "input", "features", "input (audio) and features (featurize output)")
        if self.embeddings == "none" and self.classifier is None:
            raise ValueError("embeddings: none leaves nothing to write without a classifier")
        return self
