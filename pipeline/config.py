"""Typed job configs: a YAML file plus ``--set key=value`` overrides, validated once, before any Ray work.

Every entry point builds its config with :func:`load_config`; a wrong field fails here with a message
that names it (``input.uri: ...``). Credentials are ``SecretStr``: they never appear in ``repr``,
logs or tracked parameters (:func:`public_dict` drops them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """An invalid job configuration; the message names every offending field."""


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
    ``label``, ``split``, ``fold``; relative URIs are resolved against the manifest's folder)."""

    uri: str | None = None
    manifest: str | None = None
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "InputConfig":
        if (self.uri is None) == (self.manifest is None):
            raise ValueError("give exactly one of input.uri (a prefix) and input.manifest")
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

    features: str | None = Field(None, description="a featurize destination URI")
    audio: InputConfig | None = None
    target_length: int = Field(1024, ge=16, description="frames per example (crop the end or zero-pad)")
    norm: Literal["audioset", "esc50", "speechcommands", "urban8k"] = "audioset"
    augment: AugmentConfig = AugmentConfig()
    shuffle: bool = True

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ExamplesConfig":
        if (self.features is None) == (self.audio is None):
            raise ValueError("give exactly one of features (featurize output) and audio (on the fly)")
        return self


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(config)"
        lines.append(f"{field}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


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


def load_config(model: type[ModelT], path: str | Path | None, overrides: list[str] | None = None) -> ModelT:
    """Read ``path`` (YAML), apply overrides, validate. Raises :class:`ConfigError` naming the fields."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, overrides or [])
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


def command_line(description: str) -> argparse.ArgumentParser:
    """The shared CLI of every entry point: ``--config FILE`` and repeatable ``--set key=value``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted path), repeatable")
    return parser


class FeaturizeConfig(Strict):
    """``python -m pipeline.featurize``: audio under ``input`` → fbank Parquet shards at ``output``."""

    input: InputConfig
    output: str = Field(description="destination URI (s3://bucket/prefix or a local folder)")
    storage: S3Config = S3Config()
    audio: AudioConfig = AudioConfig()
    num_mel_bins: int = Field(128, ge=8)
    shard_size: int = Field(256, ge=1, description="audio files per output shard (the unit of resume)")
    num_workers: int | None = Field(None, ge=1, description="featurizer actors; default: every CPU in the cluster")
    ray_address: str | None = Field(None, description="cluster to join; default: the current one or a new local one")
