"""Typed job configs: a YAML file plus ``--set key=value`` overrides, validated once, before any Ray work.

Every entry point builds its config with :func:`load_config`; a wrong field fails here with a message
that names it (``input.uri: ...``). Credentials are ``SecretStr``: they never appear in ``repr``,
logs or tracked parameters (:func:`public_dict` drops them).
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit, urlunsplit
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from pipeline.fields import is_secret, set_fields, typed_value
from pipeline.paths import absolute
from ssamba import (
    EMBED_DIMS, NORM_PRESETS, VALIDATION_MASK_COUNT, EncoderConfig, FbankConfig, Norm, PatchGrid, PretrainConfig, Topology,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

# The model library's defaults: job configs start from them rather than repeating them.
_ENCODER = EncoderConfig()
_MASKING = PretrainConfig()


def one_of(names: Iterable[str]) -> Any:
    """A ``Literal`` type of the names in a library registry (sizes, normalisation presets)."""
    return Literal[tuple(names)]


class ConfigError(ValueError):
    """An invalid job configuration; the message names every offending field."""


def _absolute_if_local(value: str) -> str:
    """Local paths become absolute where the config is read (the driver; see ``pipeline.paths``): Ray
    Train workers and Tune trials run in other working directories. URIs (``s3://``, ``file://``) and
    ``""`` stay as given."""
    return value if not value or "://" in value else absolute(value).as_posix()


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

    endpoint_url: str | None = Field(None, description="an S3-compatible store (http://host:port); default: AWS")
    region: str | None = Field(None, description="default: the AWS SDK's lookup (environment, profile, instance "
                               "metadata), else the bucket's own region; us-east-1 for custom endpoints")
    access_key_id: SecretStr | None = Field(None, description="with secret_access_key; default: environment or instance role")
    secret_access_key: SecretStr | None = Field(None, description="with access_key_id")
    session_token: SecretStr | None = Field(None, description="for temporary credentials")
    max_attempts: int = Field(10, ge=1, description="retries on transient errors (AWS standard retry strategy)")
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection")
    request_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for a response")

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be given together")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")
        return self


AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "m4a", "aac", "wma")


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
    target_length: int = Field(_ENCODER.grid.target_length, ge=16,
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
        """``iter_torch_batches(local_shuffle_buffer_size=...)`` of this input (None: keep the order)."""
        return self.shuffle_buffer if self.shuffle and self.shuffle_buffer else None


def error_lines(error: ValidationError) -> list[str]:
    """``field.path: message`` for every error pydantic found."""
    return [f"{'.'.join(str(part) for part in item['loc']) or '(config)'}: {_message(item)}" for item in error.errors()]


def _message(item: dict[str, Any]) -> str:
    return "no such field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")


def _format_errors(error: ValidationError) -> str:
    return "invalid configuration:\n  " + "\n  ".join(error_lines(error))


def apply_overrides(model: type[BaseModel], data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set a.b=value`` sets ``data['a']['b']``; values are YAML, typed by the field they set."""
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"--set expects key=value, got {text!r}")
        key, raw = text.split("=", 1)
        shown = f"{key}=***" if is_secret(model, key) else text
        try:
            data = set_fields(data, {key: typed_value(model, key, raw)})
        except ValueError as error:
            raise ConfigError(f"--set {shown!r}: {error}") from None
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
    data = apply_overrides(model, read_yaml(path) if path is not None else {}, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def without_userinfo(value: str) -> str:
    """A URI without the ``user:password@`` part (``http://u:p@host/x`` → ``http://host/x``); other text as is."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def public_dict(config: BaseModel) -> dict[str, Any]:
    """The config as plain data with every secret removed (secret fields, and user-info inside URIs):
    safe to print, log, track and store."""

    def scrub(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return None
        if isinstance(value, str):
            return without_userinfo(value)
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


class RayConfig(Strict):
    """Which Ray cluster a job runs on; the job says which one it joined or started."""

    address: str | None = Field(None, description="a cluster to join (host:port or auto); local: start a new one; "
                                "default: RAY_ADDRESS, else a cluster started on this machine with `ray start`, "
                                "else a new local instance")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance this job starts (default: all)")


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


class ModelConfig(Strict):
    """The SSAMBA encoder: a named size (D = 192/384/768) or an explicit width, official topology.
    Sizes, norms, topologies and defaults are the model library's."""

    size: one_of(EMBED_DIMS) = Field("tiny", description="named width: " + ", ".join(
        f"{name} {dim}" for name, dim in EMBED_DIMS.items()))
    embed_dim: int | None = Field(None, ge=8, description="overrides the size's width (small experiments)")
    depth: int = Field(_ENCODER.depth, ge=2, description="Mamba blocks (even for flip_pairs)")
    num_mel_bins: int = Field(_ENCODER.grid.num_mel_bins, ge=16, description="mel bins of the input features")
    target_length: int = Field(_ENCODER.grid.target_length, ge=16, description="frames of the input features")
    patch: int = Field(_ENCODER.grid.fshape, ge=2, description="square patch size = stride in pretraining")
    topology: Topology = Field(_ENCODER.topology, description="flip_pairs: the official pairs of forward and "
                               "reversed blocks; sequential: a plain stack")
    norm: Norm = Field(_ENCODER.norm, description="the blocks' normalisation")
    drop_path_rate: float = Field(_ENCODER.drop_path_rate, ge=0, lt=1, description="stochastic depth of the last block")

    def encoder_config(self) -> EncoderConfig:
        """The library's encoder config; ``ValueError`` if the library rejects the combination."""
        grid = PatchGrid(self.num_mel_bins, self.target_length, self.patch, self.patch, self.patch, self.patch)
        width = {} if self.embed_dim is None else {"embed_dim": self.embed_dim}
        return EncoderConfig.from_size(self.size, depth=self.depth, grid=grid, drop_path_rate=self.drop_path_rate,
                                       norm=self.norm, topology=self.topology, **width)


class MaskingConfig(Strict):
    """Masked patches per clip (count or ratio), the official two passes or one, and the fixed
    validation count (400 of 512 officially; capped to the grid for small models). The model
    library checks the counts (:class:`ssamba.PretrainConfig`)."""

    mask_patches: int | None = Field(_MASKING.mask_patches, description="masked patches per clip (or give mask_ratio)")
    mask_ratio: float | None = Field(None, description="fraction of the patches masked per clip, in (0, 1)")
    two_pass: bool = Field(_MASKING.two_pass, description="separate masked passes for the discriminative and "
                           "generative objectives (official); false: one pass feeds both")
    validation_mask_patches: int = Field(VALIDATION_MASK_COUNT, ge=1, description="masked patches per validation clip")

    @model_validator(mode="before")
    @classmethod
    def _ratio_replaces_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mask_ratio") is not None and "mask_patches" not in data:
            data = {**data, "mask_patches": None}
        return data

    @model_validator(mode="after")
    def _library_accepts(self) -> MaskingConfig:
        self.pretrain_config()
        return self

    def pretrain_config(self) -> PretrainConfig:
        """The library's pretraining config (raises ``ValueError`` on an invalid choice)."""
        return PretrainConfig(mask_patches=self.mask_patches, mask_ratio=self.mask_ratio, two_pass=self.two_pass)


class OptimConfig(Strict):
    """AdamW with linear warm-up, then the official plateau schedule on validation accuracy, cosine
    decay, or a constant rate (the paper's recipe by default)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(5e-8, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.95, 0.999), description="AdamW betas")
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["plateau", "cosine", "constant"] = Field("plateau", description="after warm-up: halve on a "
                                                               "validation plateau, cosine to 0, or constant")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="plateau: factor applied to the rate")
    plateau_patience: int = Field(2, ge=0, description="evaluations without improvement before decaying")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm (off officially)")


class TrainLoopConfig(Strict):
    """Steps, batches, and how often the loop evaluates, checkpoints, logs and draws."""

    batch_size: int = Field(64, ge=1, description="per worker and micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step on the most workers (an elastic "
                            "run on fewer accumulates more; see global_batch_size)")
    global_batch_size: int | None = Field(None, ge=1, description="examples per optimizer step over all workers, "
                                          "held when an elastic run changes size (accumulation adapts); "
                                          "default: batch_size x most workers x grad_accum")
    max_steps: int = Field(..., ge=1, description="optimizer steps in all (the run resumes up to it)")
    eval_every: int = Field(4000, ge=1, description="steps between validations")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    checkpoint_every: int = Field(4000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept")
    log_every: int = Field(50, ge=1, description="steps between logged metrics")
    figure_every: int = Field(4000, ge=1, description="steps between reconstruction figures")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast, or full fp32")
    seed: int = Field(0, description="seeds initialisation, masks and data order")


class ScalingSection(Strict):
    """Ray Train workers, a fixed number. ``num_workers: 0`` runs the loop in the driver process (local
    mode: no fault tolerance, checkpoints kept in memory)."""

    num_workers: int = Field(1, ge=0, description="Ray Train workers (0: run in the driver); fine-tuning takes "
                             "a fixed number")
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


WorkerCount = Annotated[int, Field(ge=0)]


class ElasticScalingSection(ScalingSection):
    """Ray Train workers for pretraining: a fixed number, or ``[min, max]`` for an elastic run that
    starts with the workers the cluster has room for (at least ``min``), grows as nodes join and
    shrinks as they leave, each time resuming from the last checkpoint (Ray Train's elastic training).
    The global batch stays the same: gradient accumulation adapts to the number of workers."""

    num_workers: WorkerCount | tuple[WorkerCount, WorkerCount] = Field(
        1, description="Ray Train workers (0: run in the driver), or [min, max] for an elastic run")
    resize_interval_s: float = Field(60.0, gt=0, description="elastic runs: seconds between Ray Train's looks at "
                                     "the cluster for room to grow (a lost node restarts the run at once)")

    @model_validator(mode="after")
    def _ordered_range(self) -> ElasticScalingSection:
        low, high = self.worker_range
        if self.elastic and not 1 <= low <= high:
            raise ValueError(f"num_workers: [min, max] needs 1 <= min <= max, got [{low}, {high}]")
        return self

    def ray_scaling(self) -> dict[str, Any]:
        if not self.elastic:
            return super().ray_scaling()
        return {**super().ray_scaling(), "num_workers": self.worker_range,
                "elastic_resize_monitor_interval_s": self.resize_interval_s}


class TrackingConfig(Strict):
    """MLflow: the tracking URI defaults to ``MLFLOW_TRACKING_URI``, else a SQLite file in ``outputs/``."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI")
    experiment: str = Field("ssamba-pretrain", description="MLflow experiment name")
    artifact_location: Place | None = Field(None, description="artifact root of experiments created by the job "
                                            "(local folder or s3://); default: beside a local store, or the server's")
    system_metrics: bool | Literal["auto"] = Field("auto", description="MLflow system metrics (CPU, memory, GPU); "
                                                   "auto: on when the job trains on GPUs")


class FaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_step: int | None = Field(None, ge=1, description="raise in the last worker at this step, first attempt only")
    hold_at_step: int | None = Field(None, ge=1, description="every worker of the first attempt waits after this "
                                     "step (and its checkpoint) until Ray Train replaces the worker group")
    hold_s: float = Field(300.0, gt=0, description="hold_at_step: fail if the worker group is not replaced in time")


class FinetuneFaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_epoch: int | None = Field(None, ge=1, description="raise when this epoch (from 1) starts, unless resumed")


_TARGET_LENGTH_SECTIONS = ("data", "validation", "model")


class PretrainJobConfig(Strict):
    """``python -m pipeline.pretrain``: masked-patch pretraining on Ray Train, tracked in MLflow."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: relaunching with it resumes the run")
    storage_path: Place = Field(..., description="checkpoint root (local folder or s3://bucket/prefix)")
    storage: S3Config = S3Config()
    target_length: int = Field(_ENCODER.grid.target_length, ge=16,
                               description="frames per clip: data, validation and model use it unless they set their own")
    data: ExamplesConfig = Field(..., description="training examples")
    validation: ExamplesConfig | None = Field(None, description="validation examples (masked-patch accuracy and MSE)")
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig
    scaling: ElasticScalingSection = ElasticScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    testing: FaultInjectionConfig = FaultInjectionConfig()

    @model_validator(mode="wrap")
    @classmethod
    def _one_target_length(cls, data: Any, handler: Callable[[Any], PretrainJobConfig]) -> PretrainJobConfig:
        """Sections that do not set ``target_length`` take the job's. The value they take stays
        marked unset, so that a sweep trial (which re-applies what was set) that changes the job's
        ``target_length`` changes theirs too."""
        if not isinstance(data, dict):
            return handler(data)
        length = data.get("target_length", cls.model_fields["target_length"].default)
        data, inherited = dict(data), []
        for name in _TARGET_LENGTH_SECTIONS:
            section = {} if name == "model" and data.get(name) is None else data.get(name)
            if isinstance(section, dict) and "target_length" not in section:
                data[name] = {**section, "target_length": length}
                inherited.append(name)
        config = handler(data)
        for name in inherited:
            getattr(config, name).model_fields_set.discard("target_length")
        if config.train.global_batch_size is None:  # derived, and unset: a sweep trial derives it anew
            object.__setattr__(config.train, "global_batch_size", config.default_global_batch_size)
            config.train.model_fields_set.discard("global_batch_size")
        return config

    @model_validator(mode="after")
    def _consistent(self) -> PretrainJobConfig:
        for name in ("data", "validation"):
            section = getattr(self, name)
            if section is not None and section.target_length != self.model.target_length:
                raise ValueError(f"{name}.target_length ({section.target_length}) must equal model.target_length "
                                 f"({self.model.target_length}): set target_length alone to change all three")
        try:
            grid = self.model.encoder_config().grid
        except ValueError as error:
            raise ValueError(f"model: {error}") from None
        try:
            self.masking.pretrain_config().num_masked(grid.num_patches)
        except ValueError as error:
            given = "mask_patches" if self.masking.mask_patches is not None else "mask_ratio"
            raise ValueError(f"masking.{given}: {error}") from None
        if self.scaling.num_workers == 0 and self.scaling.max_failures:
            raise ValueError("scaling.max_failures needs Ray Train workers (num_workers ≥ 1); local mode cannot restart")
        self._global_batch_divides()
        return self

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train on (local mode trains on one)."""
        low, high = self.scaling.worker_range
        return range(max(1, low), max(1, high) + 1)

    @property
    def default_global_batch_size(self) -> int:
        return self.train.batch_size * self.world_sizes[-1] * self.train.grad_accum

    def _global_batch_divides(self) -> None:
        """The global batch must be whole micro-batches on every world size the run may have."""
        train, sizes = self.train, self.world_sizes
        given = train.global_batch_size if "global_batch_size" in train.model_fields_set else None
        if given is not None and "grad_accum" in train.model_fields_set and given != self.default_global_batch_size:
            raise ValueError(f"train.global_batch_size ({given}) and train.grad_accum ({train.grad_accum}) disagree "
                             f"(batch_size {train.batch_size} x {sizes[-1]} workers x grad_accum = "
                             f"{self.default_global_batch_size}): give one of them")
        total = self.default_global_batch_size if given is None else given
        uneven = [size for size in sizes if total % (train.batch_size * size)]
        if uneven:
            origin = "" if given is not None else " (batch_size x most workers x grad_accum)"
            step = train.batch_size * math.lcm(*sizes)
            raise ValueError(f"train.global_batch_size: {total}{origin} is not a whole number of micro-batches of "
                             f"train.batch_size {train.batch_size} on {uneven[0]} workers (scaling.num_workers "
                             f"{list(self.scaling.worker_range)}): use a multiple of {step}")


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
    classifier: Place | None = Field(None, description="a fine-tuning job's exported classifier.pt (local or s3://): "
                                     "adds each source's top_k labels and probabilities")
    top_k: int = Field(5, ge=1, description="labels written per source when a classifier is given")
    batch_size: int = Field(8, ge=1, description="files per inference call")
    num_workers: int | None = Field(None, ge=1, description="inference actors; default: as the cluster fits")
    use_gpu: bool = Field(False, description="one GPU per actor")
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> EmbedConfig:
        _require_exactly_one(self, "input", "features", "input (audio) and features (featurize output)")
        if self.embeddings == "none" and self.classifier is None:
            raise ValueError("embeddings: none leaves nothing to write without a classifier")
        return self


class FinetuneModelConfig(Strict):
    """Where the encoder comes from and how it is used: our checkpoint, an official SSAMBA ``.pth``, or
    random init (``checkpoint: ""``, with ``size``); patch stride 10 as in the recipes; mean or [CLS]
    pooling; ``freeze_encoder`` for a linear probe."""

    checkpoint: Place = Field("", description="our checkpoint or an official .pth (local or s3://); empty = random init")
    size: one_of(EMBED_DIMS) = Field("tiny", description="random init only: the named size")
    stride: int = Field(10, ge=1, le=_ENCODER.grid.fshape,
                        description=f"patch stride in both axes (patches overlap below {_ENCODER.grid.fshape})")
    pooling: Literal["mean", "cls"] = Field("mean", description="mean of the patch tokens, or the [CLS] token")
    freeze_encoder: bool = Field(False, description="train the head only (a linear probe)")


class FinetuneAugmentConfig(AugmentConfig):
    """Per-example augmentation (SpecAugment, noise) plus mixup, which needs the batch: with probability
    ``mixup`` an example is mixed with another of its batch, λ ~ Beta(10, 10), targets alike (as the
    official recipes, but on stored features rather than waveforms)."""

    mixup: float = Field(0.0, ge=0, le=1, description="probability that a training example is mixed")

    def per_example(self) -> AugmentConfig:
        """The part the input pipeline applies to each example."""
        return AugmentConfig(**self.model_dump(exclude={"mixup"}))


class FinetuneOptimConfig(Strict):
    """Adam with a separate head learning rate and the recipes' per-epoch step decay."""

    lr: float = Field(1e-4, gt=0, description="the encoder's learning rate")
    head_lr_multiplier: float = Field(1.0, gt=0, description="the head's rate = lr × this")
    weight_decay: float = Field(5e-7, ge=0, description="Adam weight decay")
    betas: tuple[float, float] = Field((0.95, 0.999), description="Adam betas")
    decay_start_epoch: int = Field(5, ge=0, description="epochs trained at the full rate before the decay starts")
    decay_every: int = Field(1, ge=1, description="epochs between decays")
    decay: float = Field(0.85, gt=0, le=1, description="factor per decay")


class FinetuneTrackingConfig(TrackingConfig):
    experiment: str = Field("ssamba-finetune", description="MLflow experiment name")


class FinetuneJobConfig(Strict):
    """``python -m pipeline.finetune``: fine-tune (or linearly probe) an encoder on a labelled task."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: relaunching with it resumes the run")
    storage_path: Place = Field(..., description="checkpoint root (local folder or s3://bucket/prefix)")
    storage: S3Config = S3Config()
    task: Literal["esc50", "speechcommands_v1", "speechcommands_v2", "audioset20k", "manifest", "folders"] = Field(
        ..., description="the labelled dataset and its splits (manifest: your own, from a CSV or JSONL; folders: "
        "one folder per class)")
    data_root: Place = Field(..., description="the dataset folder, or the manifest for task=manifest")
    features: Place = Field(..., description="where the task's audio is featurized (reused when present)")
    folds: list[int] | None = Field(None, description="ESC-50-style cross-validation: the test folds to run")
    target_length: int = Field(512, ge=16, description="frames per clip: the features and the model's input")
    norm: one_of(NORM_PRESETS) = Field("audioset", description="normalisation statistics (mean, std) of a dataset")
    augment: FinetuneAugmentConfig = FinetuneAugmentConfig()
    loss: Literal["ce", "bce"] = Field("ce", description="softmax cross-entropy, or per-class binary cross-entropy "
                                       "over one-/multi-hot targets (the Speech Commands and AS-20K recipes)")
    model: FinetuneModelConfig = FinetuneModelConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    batch_size: int = Field(48, ge=1, description="per worker")
    shuffle_buffer: int = Field(256, ge=0, description="training rows mixed across shards each epoch (0: none)")
    epochs: int = Field(50, ge=1, description="passes over the training split")
    scaling: ScalingSection = ScalingSection()
    tracking: FinetuneTrackingConfig = FinetuneTrackingConfig()
    ray: RayConfig = RayConfig()
    testing: FinetuneFaultInjectionConfig = FinetuneFaultInjectionConfig()
