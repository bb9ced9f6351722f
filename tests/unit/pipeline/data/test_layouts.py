"""Downstream task layouts: ESC-50, Speech Commands, AudioSet and manifests, generated small in the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import S3Config
from pipeline.data.layouts import LayoutError, read_task
from support.task_layouts import AUDIOSET_CLASSES, audioset, esc50, speech_commands, tone


def test_esc50_folds_and_classes(tmp_path):
    data = read_task("esc50", str(esc50(tmp_path)), S3Config())
    assert data.classes == ["dog", "rain"] and len(data.sources) == 10
    assert [len(data.fold(k)) for k in range(1, 6)] == [2, 2, 2, 2, 2]
    assert {s.label for s in data.fold(1)} == {"dog", "rain"}


def test_esc50_wrong_layouts_say_what_is_missing(tmp_path):
    with pytest.raises(LayoutError, match="missing file 'meta/esc50.csv'"):
        read_task("esc50", str(tmp_path), S3Config())
    root = esc50(tmp_path / "esc")
    next((root / "audio").iterdir()).unlink()
    with pytest.raises(LayoutError, match="1 files listed in meta/esc50.csv are missing from audio/"):
        read_task("esc50", str(root), S3Config())


def test_speech_commands_splits(tmp_path):
    data = read_task("speechcommands_v2", str(speech_commands(tmp_path, 35)), S3Config())
    assert len(data.classes) == 35 and "_background_noise_" not in data.classes
    assert (len(data.split("train")), len(data.split("validation")), len(data.split("test"))) == (102, 2, 1)
    assert data.split("test")[0].label == "word00"
    with pytest.raises(LayoutError, match="expected 30 word folders"):
        read_task("speechcommands_v1", str(tmp_path), S3Config())
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(LayoutError, match="missing file 'testing_list.txt'"):
        read_task("speechcommands_v2", str(tmp_path), S3Config())


def test_audioset_multi_labels_splits_and_missing_clips(tmp_path):
    data = read_task("audioset20k", str(audioset(tmp_path / "as")), S3Config())
    assert data.classes == AUDIOSET_CLASSES
    assert (len(data.split("train")), len(data.split("validation")), len(data.split("test"))) == (8, 3, 0)
    assert data.missing_audio == {"train": 0, "validation": 1}  # skipped and counted, not an error
    by_name = {Path(s.uri).name: s for s in data.sources}
    assert by_name["-ba_1x.flac"].labels == ("/m/05zppz", "/t/dd00088") and by_name["-ba_1x.flac"].label is None
    assert by_name["-ev_0x.wav"].targets == ("/m/09x0r",) and "-ev_3x.wav" not in by_name


def test_audioset_wrong_layouts_say_what_is_missing(tmp_path):
    root = audioset(tmp_path / "as")
    (root / "class_labels_indices.csv").unlink()
    with pytest.raises(LayoutError, match="missing file 'class_labels_indices.csv'"):
        read_task("audioset20k", str(root), S3Config())
    root = audioset(tmp_path / "as2")
    segments = root / "eval_segments.csv"
    segments.write_text(segments.read_text() + 'zzz, 0.000, 10.000, "/m/unknown"\n')
    with pytest.raises(LayoutError, match=r"eval_segments.csv uses 1 labels .*'/m/unknown'"):
        read_task("audioset20k", str(root), S3Config())
    for clip in (root / "audio" / "eval").iterdir():
        clip.unlink()
    (root / "audio" / "eval").rmdir()
    with pytest.raises(LayoutError, match="missing folder 'audio/eval'"):
        read_task("audioset20k", str(root), S3Config())


def test_manifest_task_needs_labels(tmp_path):
    tone(tmp_path / "a.wav", 0)
    tone(tmp_path / "b.wav", 1)
    (tmp_path / "m.csv").write_text("uri,label,split\na.wav,x,train\nb.wav,y,test\n")
    data = read_task("manifest", str(tmp_path / "m.csv"), S3Config())
    assert data.classes == ["x", "y"] and [s.split for s in data.sources] == ["train", "test"]
    (tmp_path / "n.csv").write_text("uri\na.wav\n")
    with pytest.raises(LayoutError, match="no label"):
        read_task("manifest", str(tmp_path / "n.csv"), S3Config())
    with pytest.raises(LayoutError, match="unknown task"):
        read_task("audioset", str(tmp_path), S3Config())


def test_class_folders_label_by_parent_folder_with_or_without_split_folders(tmp_path):
    for index in range(20):
        tone(tmp_path / "flat" / ["dog", "rain"][index % 2] / f"clip{index:02d}.wav", index)
    data = read_task("folders", str(tmp_path / "flat"), S3Config())
    assert data.classes == ["dog", "rain"] and len(data.sources) == 20
    assert all(source.uri.split("/")[-2] == source.label for source in data.sources)
    held_out = {source.uri for source in data.split("validation")}
    assert 0 < len(held_out) < 20 and len(data.split("train")) == 20 - len(held_out)
    assert {s.uri for s in read_task("folders", str(tmp_path / "flat"), S3Config()).split("validation")} == held_out

    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        for index in range(count):
            tone(tmp_path / "split" / split / ["cat", "bird"][index % 2] / f"{split}{index}.wav", index)
    data = read_task("folders", str(tmp_path / "split"), S3Config())
    assert data.classes == ["bird", "cat"]
    assert (len(data.split("train")), len(data.split("validation")), len(data.split("test"))) == (4, 2, 2)
    tone(tmp_path / "loose" / "clip.wav", 0)
    with pytest.raises(LayoutError, match="put each file in the folder of its class"):
        read_task("folders", str(tmp_path / "loose"), S3Config())
