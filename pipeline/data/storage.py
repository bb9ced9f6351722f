"""URIs → pyarrow filesystems: ``s3://bucket/prefix`` (AWS or any S3-compatible endpoint), ``file://``
and plain local paths.

Regions: a region in the config or in ``AWS_REGION``/``AWS_DEFAULT_REGION`` is used as given. On
AWS without one, the bucket's own region is looked up (once per bucket and process), and where that
fails the AWS SDK resolves it (profile, instance metadata). A custom endpoint is addressed
path-style with a default region (S3-compatible stores ignore it, but requests are signed with one).
All use AWS's standard retry strategy for transient errors. Credentials come from the config or the
environment and are never printed: ``str(location)`` is safe to log.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from pipeline.data.paths import without_userinfo

DEFAULT_REGION = "us-east-1"  # custom endpoints only
PARTIAL_SUFFIX = ".partial"  # a local write in progress (see Location.write_bytes)
# What a store says when a file or object is not there (pyarrow raises a plain OSError for some).
_MISSING_MARKERS = ("Path does not exist", "NoSuchKey", "NoSuchBucket", "is a directory")


class S3Config(BaseModel):
    """How to reach S3 or an S3-compatible store. Every field falls back to the standard AWS
    environment variables (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/
    ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``)
    and then to instance credentials. Prefer the environment or instance roles to keys in files.
    Strict like every config section; defined here so that storage needs none of the job configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it (``bucket/key`` for S3, absolute for local)."""

    filesystem: pafs.FileSystem
    path: str
    uri: str
    endpoint: str | None = None

    def join(self, *parts: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, *parts), _rejoin(self.uri, *parts), self.endpoint)

    def __str__(self) -> str:
        """The URI and endpoint, never credentials: safe to log."""
        return self.uri if self.endpoint is None else f"{self.uri} (endpoint {without_userinfo(self.endpoint)})"

    @property
    def is_s3(self) -> bool:
        return isinstance(self.filesystem, pafs.S3FileSystem)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def write_bytes(self, data: bytes) -> None:
        """Whole-object write: atomic on object stores; on local disks written beside and renamed. The
        partial file is hidden (``.name.partial``): dataset readers (pyarrow, Ray Data) skip names that
        start with a dot, so a write in progress, or one a killed process left, is never read as data."""
        if self.is_s3:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)
            return
        folder, name = posixpath.split(self.path)
        self.filesystem.create_dir(folder, recursive=True)
        partial = posixpath.join(folder, f".{name}{PARTIAL_SUFFIX}")
        with self.filesystem.open_output_stream(partial) as stream:
            stream.write(data)
        self.filesystem.move(partial, self.path)

    def delete(self) -> None:
        self.filesystem.delete_file(self.path)

    def delete_contents(self) -> None:
        if self.exists():
            self.filesystem.delete_dir_contents(self.path, missing_dir_ok=True)


def is_missing(error: OSError) -> bool:
    """Whether a failed read says the file or object is not there (or is a folder): the input is wrong
    and retrying cannot help. Anything else (connection refused, timeouts, HTTP 5xx, throttling,
    refused or expired credentials, a failing disk) is the store failing, not the data."""
    return isinstance(error, (FileNotFoundError, IsADirectoryError)) or any(
        marker in str(error) for marker in _MISSING_MARKERS)


def _rejoin(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _endpoint(config: S3Config, environ: Mapping[str, str] = os.environ) -> str | None:
    return config.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")


@functools.cache
def bucket_region(bucket: str) -> str | None:
    """Where an AWS bucket lives (one request, no credentials needed); ``None`` if it cannot be told."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def s3_region(config: S3Config, bucket: str | None, environ: Mapping[str, str] = os.environ,
              lookup: Callable[[str], str | None] = bucket_region) -> str | None:
    """The region to connect with, or ``None`` to leave it to the AWS SDK (profile, instance
    metadata): the configured one, the environment's, a default for custom endpoints, or the AWS
    bucket's own region. Forcing a default on AWS would break buckets in every other region."""
    explicit = config.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if explicit:
        return explicit
    if _endpoint(config, environ):
        return DEFAULT_REGION
    return lookup(bucket) if bucket else None


def s3_filesystem(config: S3Config, bucket: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for ``config`` (and ``bucket``, whose region it may need); fields left unset
    fall back to the AWS environment."""
    options: dict = {
        "connect_timeout": config.connect_timeout_s,
        "request_timeout": config.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=config.max_attempts),
    }
    region = s3_region(config, bucket)
    if region is not None:
        options["region"] = region
    endpoint = _endpoint(config)
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme,
                       force_virtual_addressing=False)
    if config.access_key_id is not None:
        options.update(access_key=config.access_key_id.get_secret_value(),
                       secret_key=config.secret_access_key.get_secret_value())
        if config.session_token is not None:
            options["session_token"] = config.session_token.get_secret_value()
    return pafs.S3FileSystem(**options)


def resolve(uri: str, s3: S3Config | None = None) -> Location:
    """Turn a URI into a :class:`Location`. Only ``s3://``, ``file://`` and local paths are accepted."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r} has no bucket")
        if "?" in uri:
            raise ValueError(f"{uri!r}: put S3 options in the config's storage section, not in the URI")
        s3 = s3 or S3Config()
        path = parsed.netloc + parsed.path.rstrip("/")
        return Location(s3_filesystem(s3, parsed.netloc), path, uri.rstrip("/"), _endpoint(s3))
    if parsed.scheme == "file":
        local = Path(parsed.path)
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = Path(uri)
    else:
        raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use s3://, file:// or a local path)")
    local = local.expanduser().resolve()
    return Location(pafs.LocalFileSystem(), local.as_posix(), local.as_posix())
