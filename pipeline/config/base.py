"""The config base: strict sections, places (local paths made absolute, URIs kept), YAML plus
``--set key=value`` overrides, validation that names every bad field, and what is safe to print and track.

Every entry point builds its config with :func:`load_config`; a wrong field fails here with a message
that names it (``input.uri: ...``). Credentials are ``SecretStr``: they never appear in ``repr``, logs
or tracked parameters (:func:`public_dict` drops them, and user-info inside URIs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr, ValidationError

from pipeline.config.fields import is_secret, set_fields, typed_value
from pipeline.data.paths import absolute, without_userinfo

ModelT = TypeVar("ModelT", bound=BaseModel)
TEST_ONLY = {"test_only": True}  # a field's json_schema_extra: left out of --help (fault injection for the tests)

def one_of(names: Iterable[str]) -> Any:
    """A ``Literal`` type of the names in a library registry (sizes, normalisation presets)."""
    return Literal[tuple(names)]


class ConfigError(ValueError):
    """An invalid job configuration; the message names every offending field."""


def _absolute_if_local(value: str) -> str:
    """Local paths become absolute where the config is read (the driver; see ``pipeline.data.paths``): Ray
    Train workers and Tune trials run in other working directories. URIs (``s3://``, ``file://``,
    MLflow's ``models:/``) and ``""`` stay as given."""
    return value if not value or "://" in value or value.startswith("models:/") else absolute(value).as_posix()


Place = Annotated[str, AfterValidator(_absolute_if_local)]


def _require_exactly_one(section: BaseModel, first: str, second: str, names: str) -> None:
    if (getattr(section, first) is None) == (getattr(section, second) is None):
        raise ValueError(f"give exactly one of {names}")


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
