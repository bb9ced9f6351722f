"""Config sections several jobs share: audio inputs and decoding, training examples, augmentation,
Ray Train workers, the Ray cluster and MLflow tracking."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Place, Strict, _require_exactly_one, one_of
from ssamba import NORM_PRESETS, EncoderConfig, FbankConfig

ENCODER_DEFAULTS = EncoderConfig()  # the model library's defaults: configs start from them


AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "m4a", "aac", "wma")

# The labelled dataset layouts ``pipeline.data.layouts`` reads (fine-tuning, and the pretraining probe).
TaskName = Literal["esc50", "speechcommands_v1", "speechcommands_v2", "audioset20k", "manifest", "folders"]
TASK_DESCRIPTION = ("the labelled dataset and its splits (manifest: your own, from a CSV or JSONL; folders: one "
                    "folder per class)")
MULTI_LABEL_TASKS = ("audioset20k",)


class InputConfig(Strict):
    """Either every audio file under a prefix, or a manifest (CSV or JSONL with ``uri`` and optional
    ``label``, ``split``, ``fold``, ``labels``; relative URIs are resolved against the manifest's folder)."""

    uri: Place | None = Field(None, description="a folder or prefix: every audio file below it")
    manifest: Place | None = Field(None, description="a CSV or JSONL list of files (uri, label, split, fold, labels)")
    extensions: tuple[str, ...] = Field(AUDIO_EXTENSIONS, description="file endings that count as audio under uri")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> InputConfig:
        _require_exactly_one(self, "uri", "manifest", "input.uri (a prefix) and input.manifest")
        return self


class AudioConfig(Strict):
    """Decoding: resampling, and what happens to audio that is too long or too short."""

    sample_rate: int = Field(FbankConfig().sample_rate, gt=0, description="audio is resampled to this rate (Hz)")
    max_seconds: float | None = Field(None, gt=0, description="longer files are cropped or chunked")
    long_audio: Literal["crop", "chunk"] = Field("crop", description="beyond max_seconds: keep the start, or "
                                                 "cut into max_seconds chunks")
    min_seconds: float = Field(0.025, gt=0, description="shorter audio is quarantined (one 25 ms frame)")


class AugmentConfig(Strict):
    """Training-time augmentation of stored features: SpecAugment widths in bins/frames (applied
    before normalisation, as the official loader does) and the official noise augmentation."""

    freq_mask: int = Field(0, ge=0, description="SpecAugment: widest masked band of mel bins (0 = off)")
    time_mask: int = Field(0, ge=0, description="SpecAugment: widest masked run of frames (0 = off)")
    noise: bool = Field(False, description="add the official noise and random time shift")


class ExamplesConfig(Strict):
    """Training examples: from featurize output (``features``, the default at scale) or straight
    from audio (``audio``, on the fly, for small data). Exactly one of the two."""

    features: Place | None = Field(None, description="a featurize destination URI")
    audio: InputConfig | None = Field(None, description="audio files, featurized on the fly")
    target_length: int = Field(ENCODER_DEFAULTS.grid.target_length, ge=16,
                               description="frames per example (crop the end or zero-pad)")
    norm: one_of(NORM_PRESETS) = Field("audioset", description="normalisation statistics (mean, std) of a dataset")
    augment: AugmentConfig = AugmentConfig()
    shuffle: bool = Field(True, description="shuffle the examples each epoch (training)")
    shuffle_buffer: int = Field(256, ge=0, description="rows mixed across shards while training (0: none); "
                                "holds this many examples per worker")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ExamplesConfig:
        _require_exactly_one(self, "features", "audio", "features (featurize output) and audio (on the fly)")
        return self

    @property
    def local_shuffle_buffer(self) -> int | None:
        """The rows of this input's local shuffle buffer in training (None: keep the order)."""
        return self.shuffle_buffer if self.shuffle and self.shuffle_buffer else None


class RayConfig(Strict):
    """Which Ray cluster a job runs on; the job says which one it joined or started."""

    address: str | None = Field(None, description="a cluster to join (host:port or auto); local: start a new one; "
                                "default: RAY_ADDRESS, else a cluster started on this machine with `ray start`, "
                                "else a new local instance")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance this job starts (default: all)")


class ScalingSection(Strict):
    """Ray Train workers, a fixed number. ``num_workers: 0`` runs the loop in the driver process (local
    mode: no fault tolerance, checkpoints kept in memory)."""

    num_workers: int = Field(1, ge=0, description="Ray Train workers (0: run in the driver)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")

    @property
    def worker_range(self) -> tuple[int, int]:
        """The fewest and the most Train workers (the same number unless the run is elastic)."""
        count = self.num_workers
        return (count, count) if isinstance(count, int) else (count[0], count[1])

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    def ray_scaling(self) -> dict[str, Any]:
        """The arguments of Ray Train's ``ScalingConfig``."""
        return {"num_workers": self.num_workers, "use_gpu": self.use_gpu,
                "resources_per_worker": {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}}


class TrackingConfig(Strict):
    """MLflow: the tracking URI defaults to ``MLFLOW_TRACKING_URI``, else a SQLite file in ``outputs/``."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI")
    experiment: str = Field("ssamba-pretrain", description="MLflow experiment name")
    artifact_location: Place | None = Field(None, description="artifact root of experiments created by the job "
                                            "(local folder or s3://); default: beside a local store, or the server's")
    system_metrics: bool | Literal["auto"] = Field("auto", description="MLflow system metrics (CPU, memory, GPU); "
                                                   "auto: on when the job trains on GPUs")
    register_as: str | None = Field(None, description="register the run's encoder (pretraining) or classifier "
                                    "(fine-tuning) in the MLflow model registry under this name, a version per run")
