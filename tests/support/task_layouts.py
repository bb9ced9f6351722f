"""Small downstream task layouts written by the tests: ESC-50, Speech Commands and AudioSet-20K in
their official file formats, with generated tones as the audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


def tone(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000) / 16_000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32), 16_000)


def esc50(root: Path) -> Path:
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for index in range(10):
        category = ["dog", "rain"][index % 2]
        name = f"{index // 2 + 1}-{index:04d}-A-{index % 2}.wav"
        tone(root / "audio" / name, index)
        rows.append(f"{name},{index // 2 + 1},{index % 2},{category},False,{index},A")
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def speech_commands(root: Path, words: int) -> Path:
    for w in range(words):
        for n in range(3):
            tone(root / f"word{w:02d}" / f"spk{n}_nohash_0.wav", w + n)
    tone(root / "_background_noise_" / "noise.wav", 99)
    (root / "validation_list.txt").write_text("word00/spk1_nohash_0.wav\nword01/spk1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("word00/spk2_nohash_0.wav\n")
    return root


AUDIOSET_CLASSES = ["/m/09x0r", "/m/05zppz", "/t/dd00088"]


def audioset(root: Path) -> Path:
    """AS-20K in the official CSV formats: 8 balanced_train and 4 eval segments with 1–2 labels each.
    The last eval segment's clip was never downloaded; one clip is FLAC."""
    root.mkdir(parents=True)
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mid},"Class {i}, sound"\n' for i, mid in enumerate(AUDIOSET_CLASSES)))
    for name, count in (("balanced_train", 8), ("eval", 4)):
        lines = ["# Segments csv created Sun Mar  5 10:54:31 2017",
                 f"# num_ytids={count}, num_segs={count}, num_unique_labels=3, num_positive_labels=12",
                 "# YTID, start_seconds, end_seconds, positive_labels"]
        for n in range(count):
            ytid = f"-{name[:2]}_{n}x"
            mids = AUDIOSET_CLASSES[n % 3] + ("," + AUDIOSET_CLASSES[(n + 1) % 3] if n % 2 else "")
            lines.append(f'{ytid}, {10 * n}.000, {10 * n + 10}.000, "{mids}"')
            if (name, n) != ("eval", count - 1):
                tone(root / "audio" / name / f"{ytid}.{'flac' if n == 1 else 'wav'}", n)
        (root / f"{name}_segments.csv").write_text("\n".join(lines) + "\n")
    return root
