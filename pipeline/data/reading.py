"""Reading one audio source: the I/O every data job shares (``feature_store.featurize_source`` turns what
it reads into stored fbank rows).

A source is a loose audio file, or one member of a corpus container, named by a URI with a
fragment after ``#``:

* ``.../shard-000123.tar#key.flac``: the audio member of a WebDataset tar shard (members grouped by
  key, the part of the member name before its first dot); a ``key.cls`` or ``key.json`` member of the
  same key gives the label.
* ``.../train-00000.parquet#17``: row 17 of a Parquet table whose ``audio`` column holds
  ``{bytes, path}`` structs (the Hugging Face ``datasets`` Audio layout), with an optional ``label``
  column.

Containers are read in place: a tar member with one ranged read (its offset comes from the tar's
headers, indexed once per reader), a Parquet row from its row group (cached while the next rows come
from the same group). Nothing here imports Ray, so the featurize, training-input and embed jobs all
use the same code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import posixpath
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.parquet as pq

from pipeline.config import S3Config
from pipeline.data.audio import AudioError
from pipeline.data.storage import Location, is_missing, resolve

TAR, PARQUET = ".tar", ".parquet"
CONTAINER_SUFFIXES = (TAR, PARQUET)
AUDIO_COLUMN, LABEL_COLUMN = "audio", "label"
T = TypeVar("T")
MAX_CACHED_TARS = 16  # tar indexes a reader keeps (a shard reads runs of members, few tars at a time)
READ_ATTEMPTS = 3  # reads of one source before a job stops (pyarrow also retries each request inside)
READ_BACKOFF_S = 0.5  # the first wait between attempts, doubled after each


class StorageUnavailable(RuntimeError):
    """A store kept failing (unreachable, timing out, throttling, refusing the credentials). Its sources
    are not bad audio: marking them failed would hide them from every re-run, so the job stops instead."""


def split_uri(uri: str) -> tuple[str, str | None]:
    """``(container or file URI, member or None)``."""
    container, _, member = uri.partition("#")
    return container, member or None


def wds_key(member: str) -> str:
    """WebDataset's grouping key: the member name up to the first dot of its base name."""
    folder, base = posixpath.split(member)
    return posixpath.join(folder, base.split(".", 1)[0])


@dataclass(frozen=True)
class Member:
    """One audio member of a container, as listed: its URI and the label found beside it."""

    uri: str
    label: str | None = None
    labels: tuple[str, ...] = ()


class SourceReader:
    """Reads source bytes, one filesystem per URI scheme/bucket (built lazily and reused), and keeps
    the index of the last containers it opened so a shard's members do not re-read headers."""

    def __init__(self, storage: S3Config) -> None:
        self.storage = storage
        self._roots: dict[str, Location] = {}
        self._tar_index: dict[str, dict[str, tuple[int, int]]] = {}
        self._row_group: tuple[str, int, int, list] | None = None  # container, group, first row, audio cells

    def location(self, uri: str) -> tuple[Location, str]:
        """The filesystem root holding ``uri`` and the path on it."""
        root_key = uri.split("/", 3)[2] if uri.startswith("s3://") else ""
        if root_key not in self._roots:
            self._roots[root_key] = resolve(f"s3://{root_key}" if root_key else "/", self.storage)
        path = uri[len("s3://"):] if root_key else resolve(uri).path
        return self._roots[root_key], path

    def describe(self, uri: str) -> str:
        """``uri`` and the endpoint that serves it (never credentials): names the store in errors."""
        root, _ = self.location(split_uri(uri)[0])
        return uri if root.endpoint is None else f"{uri} (endpoint {root.endpoint})"

    def read(self, uri: str) -> bytes:
        """The bytes of a file or a container member. Raises ``OSError`` (storage) or :class:`AudioError`
        (a member that is not there, or a container that cannot be parsed)."""
        container, member = split_uri(uri)
        if member is None and container.endswith(CONTAINER_SUFFIXES):
            self._raise_unlisted(container)
        if member is None:
            root, path = self.location(container)
            with root.filesystem.open_input_stream(path) as stream:
                return stream.read()
        if container.endswith(TAR):
            return self._read_tar_member(container, member)
        if container.endswith(PARQUET):
            return self._read_parquet_row(container, member)
        raise AudioError("unreadable", f"{container} is not a .tar or .parquet container")

    def _raise_unlisted(self, container: str) -> None:
        """A container listed as one source, because its members could not be listed: its error, once more
        (what the featurize job quarantines it with)."""
        members = self.tar_members(container, set()) if container.endswith(TAR) else self.parquet_members(container)
        list(members)  # raises the container's AudioError while it is still damaged
        raise AudioError("unreadable", f"{container} could not be opened when the input was listed; a re-run lists "
                         "its members")

    # -- WebDataset tar ---------------------------------------------------------------------------

    def tar_index(self, container: str) -> dict[str, tuple[int, int]]:
        """``{member name: (data offset, size)}`` of a tar, from its headers only (no member data read)."""
        if container not in self._tar_index:
            root, path = self.location(container)
            try:
                with root.filesystem.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
                    index = {info.name: (info.offset_data, info.size) for info in tar if info.isfile()}
            except tarfile.TarError as error:
                raise AudioError("corrupt", f"{container} is not a readable tar ({error})") from None
            if len(self._tar_index) >= MAX_CACHED_TARS:
                self._tar_index.clear()
            self._tar_index[container] = index
        return self._tar_index[container]

    def _read_tar_member(self, container: str, member: str) -> bytes:
        index = self.tar_index(container)
        if member not in index:
            raise AudioError("unreadable", f"{container} has no member {member!r}")
        offset, size = index[member]
        root, path = self.location(container)
        with root.filesystem.open_input_file(path) as handle:
            return handle.read_at(size, offset)

    def tar_members(self, container: str, extensions: set[str]) -> Iterator[Member]:
        """The audio members of a tar, each with the label of its ``.cls`` or ``.json`` sibling."""
        index = self.tar_index(container)
        by_key: dict[str, list[str]] = {}
        for name in index:
            by_key.setdefault(wds_key(name), []).append(name)
        for names in by_key.values():
            audio = [name for name in names if name.rsplit(".", 1)[-1].lower() in extensions]
            label, labels = self._tar_label(container, names)
            for name in audio:
                yield Member(f"{container}#{name}", label, labels)

    def _tar_label(self, container: str, names: list[str]) -> tuple[str | None, tuple[str, ...]]:
        for name in names:
            if name.endswith(".cls"):
                return self._read_tar_member(container, name).decode("utf-8").strip() or None, ()
            if name.endswith(".json"):
                meta = json.loads(self._read_tar_member(container, name))
                if isinstance(meta, dict):
                    label, labels = meta.get("label"), meta.get("labels") or ()
                    return (None if label is None else str(label)), tuple(str(item) for item in labels)
        return None, ()

    # -- Parquet audio tables ---------------------------------------------------------------------

    def _parquet(self, container: str) -> pq.ParquetFile:
        root, path = self.location(container)
        return self._decode(container, "its footer", lambda: pq.ParquetFile(root.filesystem.open_input_file(path)))

    def _decode(self, container: str, part: str, decode: Callable[[], T]) -> T:
        """``decode()`` of a part of a Parquet file. pyarrow reports a corrupt page and a failing store
        alike (``OSError``), so a failure is decoded again after a raw read of the file has succeeded:
        if it fails while the store serves the bytes, the data is corrupt (:class:`AudioError`, its
        rows are quarantined); a failing raw read is the store's ``OSError``."""
        try:
            return decode()
        except ValueError as error:  # ArrowInvalid: not Parquet at all
            raise AudioError("corrupt", f"{container}: cannot decode {part} ({error})") from None
        except OSError:
            root, path = self.location(container)
            with root.filesystem.open_input_file(path) as handle:
                handle.read_at(min(handle.size(), 8), max(handle.size() - 8, 0))
        try:
            return decode()
        except (OSError, ValueError) as error:
            raise AudioError("corrupt", f"{container}: cannot decode {part} ({error})") from None

    def _read_parquet_row(self, container: str, member: str) -> bytes:
        if not member.isdigit():
            raise AudioError("unreadable", f"{container}: {member!r} is not a row number")
        row = int(member)
        cached = self._row_group
        if cached is None or cached[0] != container or not cached[2] <= row < cached[2] + len(cached[3]):
            table = self._parquet(container)
            first = 0
            for group in range(table.metadata.num_row_groups):
                count = table.metadata.row_group(group).num_rows
                if row < first + count:
                    read_group = functools.partial(table.read_row_group, group, columns=[AUDIO_COLUMN])
                    audio = self._decode(container, f"row group {group}", read_group)
                    cells = audio.column(AUDIO_COLUMN).to_pylist()
                    cached = self._row_group = (container, group, first, cells)
                    break
                first += count
            else:
                raise AudioError("unreadable", f"{container} has no row {row}")
        cell = cached[3][row - cached[2]]
        if not isinstance(cell, dict) or not cell.get("bytes"):
            raise AudioError("empty", f"{container} row {row} holds no audio bytes")
        return cell["bytes"]

    def parquet_members(self, container: str) -> Iterator[Member]:
        """One source per row; the label column (when there is one) is read, never the audio bytes."""
        table = self._parquet(container)
        names = table.schema_arrow.names
        if AUDIO_COLUMN not in names:
            raise AudioError("unreadable", f"{container} has no {AUDIO_COLUMN!r} column")
        if LABEL_COLUMN in names:
            labels = table.read(columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_pylist()
        else:
            labels = [None] * table.metadata.num_rows
        for row, label in enumerate(labels):
            yield Member(f"{container}#{row}", None if label is None else str(label))


def read_source(reader: SourceReader, uri: str, attempts: int = READ_ATTEMPTS, backoff_s: float = READ_BACKOFF_S) -> bytes:
    """The bytes of ``uri``, retried with exponential backoff while its store fails. A file that is not
    there raises ``OSError`` at once (retrying cannot bring it back); a store that still fails after
    ``attempts`` raises :class:`StorageUnavailable`."""
    attempt = 1
    while True:
        try:
            return reader.read(uri)
        except OSError as error:
            if is_missing(error):
                raise
            if attempt >= attempts:
                raise StorageUnavailable(f"storage unavailable: reading {reader.describe(uri)} failed "
                                         f"{attempt} times: {error}") from error
        time.sleep(backoff_s * 2 ** (attempt - 1))
        attempt += 1


@contextlib.contextmanager
def stop_on_storage_failure(advice: str) -> Iterator[None]:
    """Around a Ray Data execution: the :class:`StorageUnavailable` a task raised, with ``advice``
    appended, instead of Ray's wrapper. Ray Data re-raises a UDF's exception as a
    ``UserCodeException`` that keeps only its traceback text, so it is recognised by its name there;
    Ray Train's ``WorkerGroupError`` shows only the tail of each worker's error, so each worker's
    whole error is searched."""
    try:
        yield
    except Exception as error:
        texts = [str(error), *(str(failure) for failure in getattr(error, "worker_failures", {}).values())]
        matches = [match for text in texts if (match := re.search(rf"\b{StorageUnavailable.__name__}: (.+)", text))]
        if not matches:
            raise
        raise StorageUnavailable(f"{matches[0].group(1)} ({advice})") from None
