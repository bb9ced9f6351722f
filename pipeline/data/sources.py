"""Which audio sources a job reads: every file under a prefix, or the rows of a manifest.

Under a prefix, audio files are sources, and so is every audio member of a WebDataset ``.tar`` shard
and every row of a ``.parquet`` audio table (``shard.tar#key.flac``, ``table.parquet#17``; see
``pipeline.data.reading``), labelled by the shard's ``.cls``/``.json`` members or the table's ``label``
column. Manifest rows may name such member URIs too.

A manifest is CSV (header row) or JSON Lines with a ``uri`` per row and optional ``label``,
``split``, ``fold`` and ``labels`` (the classes of a multi-label clip: a JSON list, or one
comma-separated CSV field). Relative URIs are resolved against the manifest's own folder, so a dataset
folder with its manifest can be moved or uploaded as a whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import InputConfig, S3Config
from pipeline.data.audio import AudioError
from pipeline.data.reading import CONTAINER_SUFFIXES, TAR, SourceReader, StorageUnavailable
from pipeline.data.storage import Location, is_missing, resolve

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The input cannot be listed (missing prefix, bad manifest): the job stops before any work."""


@dataclass(frozen=True, order=True)
class AudioSource:
    """One audio file; ``label`` for single-label tasks, ``labels`` (every positive class) for multi-label ones."""

    uri: str
    label: str | None = None
    split: str | None = None
    fold: int | None = None
    labels: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        """The positive classes, whichever way the source is labelled."""
        return self.labels or ((self.label,) if self.label is not None else ())

    def to_dict(self) -> dict:
        """A manifest row; ``labels`` only when there are some, so single-label rows (and the featurize
        fingerprints made of them) are what they were before multi-label sources existed."""
        row = asdict(self)
        if not self.labels:
            del row["labels"]
        return row

    @classmethod
    def from_dict(cls, row: dict) -> AudioSource:
        return cls(**{**row, "labels": tuple(row.get("labels", ()))})


def list_sources(config: InputConfig, storage: S3Config) -> list[AudioSource]:
    """All sources, sorted by URI (a stable order makes shard assignment reproducible)."""
    sources = _list_prefix(config, storage) if config.uri is not None else _read_manifest(config.manifest, storage)
    uris = [source.uri for source in sources]
    if len(set(uris)) != len(uris):
        duplicates = sorted({uri for uri in uris if uris.count(uri) > 1})
        raise SourceError(f"the input lists some files more than once: {duplicates[:5]}")
    return sorted(sources)


def uri_for(location: Location, path: str) -> str:
    """The URI of ``path`` on ``location``'s filesystem (``s3://`` for object stores)."""
    return f"s3://{path}" if location.is_s3 else path


def _list_prefix(config: InputConfig, storage: S3Config) -> list[AudioSource]:
    location = resolve(config.uri, storage)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"input.uri {location} does not exist")
    extensions = {extension.lower().lstrip(".") for extension in config.extensions}
    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    reader = SourceReader(storage)
    sources = []
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        uri = uri_for(location, entry.path)
        if uri.endswith(CONTAINER_SUFFIXES):
            sources += _container_sources(reader, uri, extensions)
        elif entry.extension.lower() in extensions or info.type == pafs.FileType.File:
            sources.append(AudioSource(uri))
    if not sources:
        raise SourceError(f"no files with extensions {sorted(extensions)}, .tar or .parquet under {location}")
    return sources


def _container_sources(reader: SourceReader, uri: str, extensions: set[str]) -> list[AudioSource]:
    """The members of a tar shard or the rows of a Parquet table. A container whose bytes cannot be
    parsed is one source of its own: its members cannot be named, so the featurize job quarantines the
    container as one row, with its reason, and featurizes everything else. A store that fails stops the
    job here (:class:`StorageUnavailable`), naming the store."""
    try:
        members = reader.tar_members(uri, extensions) if uri.endswith(TAR) else reader.parquet_members(uri)
        return [AudioSource(member.uri, member.label, labels=member.labels) for member in members]
    except AudioError as error:
        log.warning("cannot list the members of %s (%s): it is quarantined as one source", uri, error)
        return [AudioSource(uri)]
    except OSError as error:
        if not is_missing(error):
            raise StorageUnavailable(f"storage unavailable: listing the members of {uri}: {error}") from error
        raise SourceError(f"cannot list the members of {uri}: {error}") from None
    except ValueError as error:
        raise SourceError(f"cannot list the members of {uri}: {error}") from None


def _resolve_relative(manifest_uri: str, uri: str) -> str:
    if urlparse(uri).scheme or uri.startswith("/"):
        return uri
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    if urlparse(base).scheme:
        return base + "/" + posixpath.normpath(uri)
    return posixpath.normpath(posixpath.join(base, uri))


def _read_manifest(manifest: str, storage: S3Config) -> list[AudioSource]:
    location = resolve(manifest, storage)
    try:
        text = location.read_bytes().decode("utf-8")
    except OSError as error:
        if not is_missing(error):  # the store is failing, not the manifest: say so (docs/pipeline.md)
            raise StorageUnavailable(f"storage unavailable: reading input.manifest {location}: {error}") from error
        raise SourceError(f"cannot read input.manifest {location}: {error}") from None
    if location.path.endswith((".jsonl", ".json")):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise SourceError(f"{location} line {number}: not JSON ({error.msg})") from None
    else:
        rows = list(enumerate(csv.DictReader(io.StringIO(text)), start=2))
    if not rows:
        raise SourceError(f"input.manifest {location} has no rows")
    return [_manifest_row(location.uri, number, row) for number, row in rows]


def _manifest_row(manifest_uri: str, number: int, row: dict) -> AudioSource:
    where = f"{manifest_uri} line {number}"
    if not isinstance(row, dict) or not row.get("uri"):
        raise SourceError(f"{where}: every row needs a 'uri'")
    unknown = set(row) - {"uri", "label", "split", "fold", "labels"}
    if unknown:
        raise SourceError(f"{where}: unknown columns {sorted(unknown)} (allowed: uri, label, split, fold, labels)")
    fold = row.get("fold")
    if fold not in (None, ""):
        try:
            fold = int(fold)
        except (TypeError, ValueError):
            raise SourceError(f"{where}: fold must be an integer, got {fold!r}") from None
    else:
        fold = None
    label = row.get("label")
    return AudioSource(
        uri=_resolve_relative(manifest_uri, str(row["uri"])),
        label=None if label in (None, "") else str(label),
        split=row.get("split") or None,
        fold=fold,
        labels=_labels(where, row.get("labels")),
    )


def _labels(where: str, value: object) -> tuple[str, ...]:
    """A multi-label row's classes: a JSON list of strings, or a comma-separated CSV field."""
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise SourceError(f"{where}: labels must be a list of class names, got {value!r}")
    return tuple(value)
