"""Downstream task layouts → labelled audio sources, with splits or folds and the class list.

Each reader checks the layout it expects and says exactly what is missing, before any Ray work:

* ``esc50``: ``meta/esc50.csv`` (``filename, fold, target, category, ...``) and ``audio/``; five folds.
* ``speechcommands_v1`` / ``speechcommands_v2``: one folder per word (30 / 35 words, plus the ignored
  ``_background_noise_``), ``validation_list.txt`` and ``testing_list.txt``; everything else trains.
* ``audioset20k``: AudioSet's ``class_labels_indices.csv`` (``index, mid, display_name``; the classes
  are the mids in index order), the official segment lists ``balanced_train_segments.csv`` and
  ``eval_segments.csv`` (``#`` comment lines; rows ``YTID, start_seconds, end_seconds,
  "positive_labels"``) and the clips as ``audio/balanced_train/<YTID>.<ext>`` and
  ``audio/eval/<YTID>.<ext>`` (any audio extension; each file holds its segment, as download scripts
  save them). Multi-label. ``balanced_train`` trains and ``eval`` is the validation split that selects
  the model; there is no separate test split. Downloads always miss some clips: a listed segment
  without a file is skipped and counted in ``TaskData.missing_audio``, not an error.
* ``manifest``: any CSV/JSONL manifest with ``uri``, ``label`` and optional ``split``/``fold``.
* ``folders``: one folder per class, the label of a file is its parent folder's name. Split folders
  ``train/``, ``validation/`` (and optionally ``test/``) above the class folders give the splits;
  without them a fixed tenth of the files (chosen by a hash of their path, so it never changes)
  validates and the rest trains.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipeline.config import AUDIO_EXTENSIONS, InputConfig, S3Config
from pipeline.data.sources import AudioSource, SourceError, list_sources, uri_for
from pipeline.data.storage import Location, resolve

SPEECH_COMMANDS_WORDS = {"speechcommands_v1": 30, "speechcommands_v2": 35}
BACKGROUND_NOISE = "_background_noise_"
AUDIOSET_SPLITS = {"train": "balanced_train", "validation": "eval"}  # our split → AudioSet's list and folder

log = logging.getLogger(__name__)


class LayoutError(SourceError):
    """A dataset folder does not have the layout its task expects."""


@dataclass(frozen=True)
class TaskData:
    """A task's sources and classes; ``missing_audio`` counts listed clips without a file, per split."""

    sources: list[AudioSource]
    classes: list[str]
    missing_audio: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[AudioSource]:
        return [source for source in self.sources if source.split == name]

    def fold(self, number: int) -> list[AudioSource]:
        return [source for source in self.sources if source.fold == number]


def _require(location: Location, relative: str, task: str, kind: pafs.FileType) -> Location:
    target = location.join(relative)
    if location.filesystem.get_file_info(target.path).type != kind:
        what = "folder" if kind == pafs.FileType.Directory else "file"
        raise LayoutError(f"{task} layout: missing {what} {relative!r} under {location}")
    return target


def read_esc50(root: str, storage: S3Config) -> TaskData:
    location = resolve(root, storage)
    meta = _require(location, "meta/esc50.csv", "ESC-50", pafs.FileType.File)
    audio = _require(location, "audio", "ESC-50", pafs.FileType.Directory)
    rows = list(csv.DictReader(io.StringIO(meta.read_bytes().decode("utf-8"))))
    missing_columns = {"filename", "fold", "category"} - set(rows[0] if rows else {})
    if missing_columns:
        raise LayoutError(f"ESC-50 layout: meta/esc50.csv lacks the columns {sorted(missing_columns)}")
    present = {info.base_name for info in location.filesystem.get_file_info(pafs.FileSelector(audio.path))}
    absent = sorted(row["filename"] for row in rows if row["filename"] not in present)
    if absent:
        raise LayoutError(f"ESC-50 layout: {len(absent)} files listed in meta/esc50.csv are missing from audio/, "
                          f"e.g. {absent[:3]}")
    sources = [AudioSource(uri_for(location, audio.join(row["filename"]).path), row["category"], None, int(row["fold"]))
               for row in rows]
    return TaskData(sorted(sources), sorted({row["category"] for row in rows}))


def read_speech_commands(root: str, storage: S3Config, task: str) -> TaskData:
    location = resolve(root, storage)
    lists = {}
    for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt")):
        listed = _require(location, name, "Speech Commands", pafs.FileType.File).read_bytes().decode("utf-8")
        lists[split] = {line.strip() for line in listed.splitlines() if line.strip()}
    entries = location.filesystem.get_file_info(pafs.FileSelector(location.path))
    words = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name != BACKGROUND_NOISE)
    expected = SPEECH_COMMANDS_WORDS[task]
    if len(words) != expected:
        raise LayoutError(f"{task} layout: expected {expected} word folders under {location}, found {len(words)}")
    sources = []
    for word in words:
        for info in location.filesystem.get_file_info(pafs.FileSelector(location.join(word).path)):
            if info.type != pafs.FileType.File or info.extension.lower() != "wav":
                continue
            relative = f"{word}/{info.base_name}"
            split = "test" if relative in lists["test"] else "validation" if relative in lists["validation"] else "train"
            sources.append(AudioSource(uri_for(location, info.path), word, split))
    return TaskData(sorted(sources), words)


def _audioset_classes(csv_file: Location) -> list[str]:
    rows = list(csv.DictReader(io.StringIO(csv_file.read_bytes().decode("utf-8"))))
    missing_columns = {"index", "mid", "display_name"} - set(rows[0] if rows else {})
    if missing_columns:
        raise LayoutError(f"AudioSet layout: class_labels_indices.csv lacks the columns {sorted(missing_columns)}")
    return [row["mid"] for row in sorted(rows, key=lambda row: int(row["index"]))]


def _audioset_segments(csv_file: Location, name: str) -> dict[str, tuple[str, ...]]:
    """YTID → positive mids of an official segments CSV."""
    segments = {}
    for number, line in enumerate(csv_file.read_bytes().decode("utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        row = next(csv.reader([line], skipinitialspace=True))
        if len(row) != 4:
            raise LayoutError(f"AudioSet layout: {name} line {number}: expected "
                              f'YTID, start_seconds, end_seconds, "positive_labels", got {line!r}')
        segments[row[0]] = tuple(mid.strip() for mid in row[3].split(",") if mid.strip())
    return segments


def _audio_files(folder: Location) -> dict[str, str]:
    """File stem → path of the audio files directly in ``folder``."""
    entries = folder.filesystem.get_file_info(pafs.FileSelector(folder.path))
    return {e.base_name.rsplit(".", 1)[0]: e.path for e in sorted(entries, key=lambda e: e.path)
            if e.type == pafs.FileType.File and e.extension.lower() in AUDIO_EXTENSIONS}


def read_audioset(root: str, storage: S3Config) -> TaskData:
    location = resolve(root, storage)
    classes = _audioset_classes(_require(location, "class_labels_indices.csv", "AudioSet", pafs.FileType.File))
    known = set(classes)
    sources, missing = [], {}
    for split, name in AUDIOSET_SPLITS.items():
        segments = _audioset_segments(_require(location, f"{name}_segments.csv", "AudioSet", pafs.FileType.File),
                                      f"{name}_segments.csv")
        files = _audio_files(_require(location, f"audio/{name}", "AudioSet", pafs.FileType.Directory))
        unknown = sorted({mid for mids in segments.values() for mid in mids} - known)
        if unknown:
            raise LayoutError(f"AudioSet layout: {name}_segments.csv uses {len(unknown)} labels that "
                              f"class_labels_indices.csv lacks, e.g. {unknown[:3]}")
        missing[split] = sum(ytid not in files for ytid in segments)
        if missing[split]:
            log.warning("AudioSet: %d of the %d segments of %s_segments.csv have no audio under audio/%s/; skipped",
                        missing[split], len(segments), name, name)
        sources += [AudioSource(uri_for(location, files[ytid]), split=split, labels=mids)
                    for ytid, mids in segments.items() if ytid in files]
    return TaskData(sorted(sources), classes, missing)


def read_manifest_task(manifest: str, storage: S3Config) -> TaskData:
    sources = list_sources(InputConfig(manifest=manifest), storage)
    unlabelled = [source.uri for source in sources if source.label is None]
    if unlabelled:
        raise LayoutError(f"manifest {manifest}: {len(unlabelled)} rows have no label, e.g. {unlabelled[:3]}")
    return TaskData(sources, sorted({source.label for source in sources}))


SPLIT_FOLDERS = ("train", "validation", "test")
HELD_OUT = 10  # without split folders, one file in this many validates


def _held_out(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HELD_OUT == 0


def read_class_folders(root: str, storage: S3Config) -> TaskData:
    location = resolve(root, storage)
    sources = []
    for source in list_sources(InputConfig(uri=root), storage):
        relative = source.uri[len(location.uri):].lstrip("/")
        parts = relative.split("/")
        if len(parts) < 2:
            raise LayoutError(f"folders layout: {relative!r} lies directly in {location}; put each file in the "
                              "folder of its class")
        has_split = parts[0] in SPLIT_FOLDERS and len(parts) >= 3
        split = parts[0] if has_split else "validation" if _held_out(relative) else "train"
        sources.append(AudioSource(source.uri, posixpath.basename(posixpath.dirname(relative)), split))
    if not any(source.split == "train" for source in sources) or not any(s.split == "validation" for s in sources):
        raise LayoutError(f"folders layout: {location} needs audio to train and to validate on (class folders, "
                          "or train/ and validation/ folders of class folders)")
    return TaskData(sorted(sources), sorted({source.label for source in sources}))


def read_task(task: str, root: str, storage: S3Config) -> TaskData:
    """The labelled sources of ``task`` under ``root`` (a folder, or the manifest for ``manifest``)."""
    if task == "esc50":
        return read_esc50(root, storage)
    if task in SPEECH_COMMANDS_WORDS:
        return read_speech_commands(root, storage, task)
    if task == "audioset20k":
        return read_audioset(root, storage)
    if task == "manifest":
        return read_manifest_task(root, storage)
    if task == "folders":
        return read_class_folders(root, storage)
    raise LayoutError(f"unknown task {task!r}; choose from esc50, speechcommands_v1, speechcommands_v2, "
                      "audioset20k, manifest, folders")
