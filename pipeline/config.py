"""Typed job configs: a YAML file plus ``--set key=value`` overrides, validated once, before any Ray work.

Every entry point builds its config with :func:`load_config`; a wrong field fails here with a message
that names it (``input.uri: ...``). Credentials are ``SecretStr``: they never appear in ``repr``,
logs or tracked parameters (:func:`public_dict` drops them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """An invalid job configuration; the message names every offending field."""


def _absolute_if_local(value: str) -> str:
    """Local paths become absolute where the config is read (the driver): Ray Train workers and Tune
    trials run in other working directories. URIs (``s3://``, ``file://``) and ``""`` stay as given."""
    return value if not value or "://" in value else Path(value).expanduser().resolve().as_posix()


# A local path or a URI: where data, checkpoints or features are.
Place = Annotated[str, AfterValidator(_absolute_if_local)]


def _require_exactly_one(section: BaseModel, first: str, second: str, names: str) -> None:
    if (getattr(section, first) is None) == (getattr(section, second) is None):
        raise ValueError(f"give exactly one of {names}")


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Config(Strict):
    """How to reach S3 or an S3-compatible store. Every field falls back to the standard AWS
    environment variables (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/
    ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``)
    and then to instance credentials. Prefer the environment or instance roles to keys in files."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    max_attempts: int = Field(10, ge=1, description="retries on transient errors (AWS standard retry strategy)")
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> "S3Config":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be given together")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")
        return self


AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "m4a", "aac", "wma")


class InputConfig(Strict):
    """Either every audio file under a prefix, or a manifest (CSV or JSONL with ``uri`` and optional
    ``label``, ``split``, ``fold``, ``labels``; relative URIs are resolved against the manifest's folder)."""

    uri: Place | None = None
    manifest: Place | None = None
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "InputConfig":
        _require_exactly_one(self, "uri", "manifest", "input.uri (a prefix) and input.manifest")
        return self


class AudioConfig(Strict):
    sample_rate: int = Field(16_000, gt=0)
    max_seconds: float | None = Field(None, gt=0, description="longer files are cropped or chunked")
    long_audio: Literal["crop", "chunk"] = "crop"
    min_seconds: float = Field(0.025, gt=0, description="shorter audio is quarantined (one 25 ms frame)")


class AugmentConfig(Strict):
    """Training-time augmentation of stored features (spec §1.5): SpecAugment widths in bins/frames
    (applied before normalisation, as the official loader does) and the noise augmentation."""

    freq_mask: int = Field(0, ge=0)
    time_mask: int = Field(0, ge=0)
    noise: bool = False


class ExamplesConfig(Strict):
    """Training examples: from featurize output (``features``, the default at scale) or straight
    from audio (``audio``, on the fly, for small data). Exactly one of the two."""

    features: Place | None = Field(None, description="a featurize destination URI")
    audio: InputConfig | None = None
    target_length: int = Field(1024, ge=16, description="frames per example (crop the end or zero-pad)")
    norm: Literal["audioset", "esc50", "speechcommands", "urban8k"] = "audioset"
    augment: AugmentConfig = AugmentConfig()
    shuffle: bool = True
    shuffle_buffer: int = Field(256, ge=0, description="rows mixed across shards while training (0: none); "
                                "holds this many examples per worker")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ExamplesConfig":
        _require_exactly_one(self, "features", "audio", "features (featurize output) and audio (on the fly)")
        return self

    @property
    def local_shuffle_buffer(self) -> int | None:
        """``iter_torch_batches(local_shuffle_buffer_size=...)`` of this input (None: keep the order)."""
        return self.shuffle_buffer if self.shuffle and self.shuffle_buffer else None


def error_lines(error: ValidationError) -> list[str]:
    """``field.path: message`` for every error pydantic found."""
    return [f"{'.'.join(str(part) for part in item['loc']) or '(config)'}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()]


def _format_errors(error: ValidationError) -> str:
    return "invalid configuration:\n  " + "\n  ".join(error_lines(error))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {text!r}")
    return key.split("."), yaml.safe_load(raw) if raw else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` sets ``data['a']['b']``; values are parsed as YAML scalars/lists."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; :class:`ConfigError` if unreadable or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def load_config(model: type[ModelT], path: str | Path | None, overrides: list[str] | None = None) -> ModelT:
    """Read ``path`` (YAML), apply overrides, validate. Raises :class:`ConfigError` naming the fields."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def public_dict(config: BaseModel) -> dict[str, Any]:
    """The config as plain data with every secret removed: safe to print, log, track and store."""

    def scrub(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return None
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items() if not isinstance(v, SecretStr)}
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        return value

    return scrub(config.model_dump(mode="python"))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: configs as tracking parameters."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_command(
    description: str,
    config_model: type[ModelT],
    job: Callable[[ModelT, argparse.Namespace], str],
    argv: list[str] | None = None,
    expected_errors: tuple[type[Exception], ...] = (),
    overwrite_flag: bool = False,
) -> int:
    """The shared command line of every entry point: ``--config FILE``, repeatable ``--set key=value``
    (and ``--overwrite`` where it applies). The config is validated before ``job`` runs; a bad config
    or an expected error prints one message and exits with 2; otherwise ``job``'s report is printed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted path), repeatable")
    if overwrite_flag:
        parser.add_argument("--overwrite", action="store_true", help="replace whatever the destination holds")
    args = parser.parse_args(argv)
    try:
        config = load_config(config_model, args.config, args.overrides)
        report = job(config, args)
    except (ConfigError, *expected_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


class FeaturizeConfig(Strict):
    """``python -m pipeline.featurize``: audio under ``input`` → fbank Parquet shards at ``output``."""

    input: InputConfig
    output: Place = Field(description="destination URI (s3://bucket/prefix or a local folder)")
    storage: S3Config = S3Config()
    audio: AudioConfig = AudioConfig()
    num_mel_bins: int = Field(128, ge=8)
    shard_size: int = Field(256, ge=1, description="audio files per output shard (the unit of resume)")
    num_workers: int | None = Field(None, ge=1, description="featurizer actors; default: every CPU in the cluster")
    ray_address: str | None = Field(None, description="cluster to join; default: the current one or a new local one")


class ModelConfig(Strict):
    """The SSAMBA encoder: a named size (D = 192/384/768) or an explicit width, official topology."""

    size: Literal["tiny", "small", "base"] = "tiny"
    embed_dim: int | None = Field(None, ge=8, description="overrides the size's width (small experiments)")
    depth: int = Field(24, ge=2)
    num_mel_bins: int = Field(128, ge=16)
    target_length: int = Field(1024, ge=16)
    patch: int = Field(16, ge=2, description="square patch size = stride in pretraining")
    topology: Literal["flip_pairs", "sequential"] = "flip_pairs"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    drop_path_rate: float = Field(0.1, ge=0, lt=1)


class MaskingConfig(Strict):
    """Masked patches per clip (count or ratio), the official two passes or one, and the fixed
    validation count (400 of 512 officially; capped to the grid for small models)."""

    mask_patches: int | None = Field(400, ge=1)
    mask_ratio: float | None = Field(None, gt=0, lt=1)
    two_pass: bool = True
    validation_mask_patches: int = Field(400, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _ratio_replaces_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mask_ratio") is not None and "mask_patches" not in data:
            data = {**data, "mask_patches": None}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> "MaskingConfig":
        _require_exactly_one(self, "mask_patches", "mask_ratio", "mask_patches and mask_ratio")
        return self


class OptimConfig(Strict):
    """AdamW with linear warm-up, then the official plateau schedule on validation accuracy, cosine
    decay, or a constant rate (spec §3.4)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(5e-8, ge=0)
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = Field(1000, ge=0)
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(2, ge=0, description="evaluations without improvement before decaying")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm (off officially)")


class TrainLoopConfig(Strict):
    batch_size: int = Field(64, ge=1, description="per worker and micro-step")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(..., ge=1, description="optimizer steps in all (the run resumes up to it)")
    eval_every: int = Field(4000, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    checkpoint_every: int = Field(4000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(50, ge=1)
    figure_every: int = Field(4000, ge=1, description="steps between reconstruction figures")
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0


class ScalingSection(Strict):
    """Ray Train workers. ``num_workers: 0`` runs the loop in the driver process (local mode: no
    fault tolerance, checkpoints kept in memory)."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")


class TrackingConfig(Strict):
    """MLflow: the tracking URI defaults to ``MLFLOW_TRACKING_URI``, else a SQLite file in ``outputs/``."""

    tracking_uri: str | None = None
    experiment: str = "ssamba-pretrain"


class FaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_step: int | None = Field(None, ge=1, description="raise in the last worker at this step, first attempt only")


class FinetuneFaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_epoch: int | None = Field(None, ge=0, description="raise when this epoch starts, unless resumed")


class PretrainJobConfig(Strict):
    """``python -m pipeline.pretrain``: masked-patch pretraining on Ray Train, tracked in MLflow."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: relaunching with it resumes the run")
    storage_path: Place = Field(..., description="checkpoint root (local folder or s3://bucket/prefix)")
    storage: S3Config = S3Config()
    data: ExamplesConfig
    validation: ExamplesConfig | None = None
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    testing: FaultInjectionConfig = FaultInjectionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainJobConfig":
        if self.data.target_length != self.model.target_length:
            raise ValueError(f"data.target_length ({self.data.target_length}) must equal model.target_length "
                             f"({self.model.target_length})")
        if self.validation is not None and self.validation.target_length != self.model.target_length:
            raise ValueError("validation.target_length must equal model.target_length")
        patches = (self.model.num_mel_bins // self.model.patch) * (self.model.target_length // self.model.patch)
        if self.masking.mask_patches is not None and self.masking.mask_patches >= patches:
            raise ValueError(f"masking.mask_patches ({self.masking.mask_patches}) must be below the {patches} patches")
        if self.scaling.num_workers == 0 and self.scaling.max_failures:
            raise ValueError("scaling.max_failures needs Ray Train workers (num_workers ≥ 1); local mode cannot restart")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size * max(1, self.scaling.num_workers) * self.train.grad_accum


class EmbedConfig(Strict):
    """``python -m pipeline.embed``: scene and/or timestamp embeddings of audio (or of featurize
    output) with a pretrained encoder, by Ray Data batch inference."""

    input: InputConfig | None = None
    features: Place | None = Field(None, description="a featurize destination URI, instead of audio")
    output: Place
    model: Place = Field("", description="our checkpoint or an official .pth (local or s3://); empty = random tiny")
    storage: S3Config = S3Config()
    audio: AudioConfig = AudioConfig()
    embeddings: Literal["scene", "timestamp", "both"] = "scene"
    batch_size: int = Field(8, ge=1, description="files per inference call")
    num_workers: int | None = Field(None, ge=1)
    use_gpu: bool = False

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "EmbedConfig":
        _require_exactly_one(self, "input", "features", "input (audio) and features (featurize output)")
        return self


class FinetuneModelConfig(Strict):
    """Where the encoder comes from and how it is used: our checkpoint, an official SSAMBA ``.pth``, or
    random init (``checkpoint: ""``, with ``size``); patch stride 10 as in the recipes; mean or [CLS]
    pooling; ``freeze_encoder`` for a linear probe."""

    checkpoint: Place = ""
    size: Literal["tiny", "small", "base"] = "tiny"
    stride: int = Field(10, ge=1, le=16)
    pooling: Literal["mean", "cls"] = "mean"
    freeze_encoder: bool = False


class FinetuneAugmentConfig(AugmentConfig):
    """Per-example augmentation (SpecAugment, noise) plus mixup, which needs the batch: with probability
    ``mixup`` an example is mixed with another of its batch, λ ~ Beta(10, 10), targets alike (spec §1.5;
    on stored features rather than waveforms)."""

    mixup: float = Field(0.0, ge=0, le=1, description="probability that a training example is mixed")

    def per_example(self) -> AugmentConfig:
        """The part the input pipeline applies to each example."""
        return AugmentConfig(**self.model_dump(exclude={"mixup"}))


class FinetuneOptimConfig(Strict):
    """Adam with a separate head learning rate and the recipes' per-epoch step decay (spec §4)."""

    lr: float = Field(1e-4, gt=0)
    head_lr_multiplier: float = Field(1.0, gt=0)
    weight_decay: float = Field(5e-7, ge=0)
    betas: tuple[float, float] = (0.95, 0.999)
    decay_start_epoch: int = Field(5, ge=0)
    decay_every: int = Field(1, ge=1)
    decay: float = Field(0.85, gt=0, le=1)


class FinetuneTrackingConfig(TrackingConfig):
    experiment: str = "ssamba-finetune"


class FinetuneJobConfig(Strict):
    """``python -m pipeline.finetune``: fine-tune (or linearly probe) an encoder on a labelled task."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: Place
    storage: S3Config = S3Config()
    task: Literal["esc50", "speechcommands_v1", "speechcommands_v2", "audioset20k", "manifest"]
    data_root: Place = Field(..., description="the dataset folder, or the manifest for task=manifest")
    features: Place = Field(..., description="where the task's audio is featurized (reused when present)")
    folds: list[int] | None = Field(None, description="ESC-50-style cross-validation: the test folds to run")
    target_length: int = Field(512, ge=16)
    norm: Literal["audioset", "esc50", "speechcommands", "urban8k"] = "audioset"
    augment: FinetuneAugmentConfig = FinetuneAugmentConfig()
    loss: Literal["ce", "bce"] = Field("ce", description="softmax cross-entropy, or per-class binary cross-entropy "
                                       "over one-/multi-hot targets (the Speech Commands and AS-20K recipes)")
    model: FinetuneModelConfig = FinetuneModelConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    batch_size: int = Field(48, ge=1)
    shuffle_buffer: int = Field(256, ge=0, description="training rows mixed across shards each epoch (0: none)")
    epochs: int = Field(50, ge=1)
    scaling: ScalingSection = ScalingSection()
    tracking: FinetuneTrackingConfig = FinetuneTrackingConfig()
    testing: FinetuneFaultInjectionConfig = FinetuneFaultInjectionConfig()
