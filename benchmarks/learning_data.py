"""Real recordings for the learning benchmark, from Debian's data packages (no install, never committed).

    nice -n 5 .venv/bin/python benchmarks/learning_data.py [--cache outputs/learning/data]

Each package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into ``<cache>/root``;
its sounds are decoded (channel mean, then torchaudio's sinc resampling to 16 kHz, as pipeline.data.audio
does, with the resampling kernel kept per source rate) into ``<cache>/clips`` as WAV, and manifests
(CSV ``uri,label,split``, URIs relative to the manifest, as ``pipeline.data.sources`` reads them) are
written beside them:

* ``pool_train.csv`` / ``pool_validation.csv``: the unlabelled pretraining pool. Game dialogue in
  Czech and Dutch (fillets-ng-data-cs/-nl) and its sound effects (fillets-ng-data), telephone prompts
  in five languages (asterisk-core-sounds-{en,es,fr,it,ru}-wav), game music and effects
  (hedgewars-data without its voice packs) and the stamp sound effects of tuxpaint-stamps-default.
  The validation part is 5 % of the files, chosen by a hash of the relative path.
* ``task_voice.csv``: which of hedgewars' 15 voice packs (one actor or character voice each) says a
  phrase. Grouped by phrase: a phrase (e.g. every pack's ``Hello``) is in one split only, so the
  probe must recognise the voice in words it never heard from it.
* ``task_language.csv``: the language of tuxpaint's spoken stamp descriptions (the 8 languages with
  most recordings), at most ``--per-language`` of each (whole stamps, chosen by a hash). Grouped by
  stamp: all descriptions of one stamp are in one split.

Neither task's clips are in the pool. Splits are ``train`` (60 %), ``validation`` (20 %) and
``test`` (20 %) of the groups, by a hash of the group name, so they are stable across runs.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch
import torchaudio

SAMPLE_RATE = 16_000
POOL_PACKAGES = ("fillets-ng-data", "fillets-ng-data-cs", "fillets-ng-data-nl", "asterisk-core-sounds-en-wav",
                 "asterisk-core-sounds-es-wav", "asterisk-core-sounds-fr-wav", "asterisk-core-sounds-it-wav",
                 "asterisk-core-sounds-ru-wav")
HEDGEWARS, TUXPAINT = "hedgewars-data", "tuxpaint-stamps-default"
PACKAGES = POOL_PACKAGES + (HEDGEWARS, TUXPAINT)
AUDIO_SUFFIXES = {".ogg", ".wav"}
LANGUAGES = ("be", "bg", "ca", "el", "es", "fr", "ro", "ru")  # tuxpaint's languages with ≥ 600 descriptions
SPLITS = (("train", 0.6), ("validation", 0.8), ("test", 1.0))  # cumulative fractions of the groups


@dataclass(frozen=True)
class Clip:
    """One source file and where its decoded WAV goes; label/group only for task clips."""

    source: Path
    target: Path
    label: str | None = None
    group: str | None = None


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text`` (splits must not change between runs or machines)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / 16**12


def split_of(group: str) -> str:
    fraction = unit_hash(group)
    return next(name for name, upper in SPLITS if fraction < upper)


def fetch(package: str, cache: Path) -> Path:
    """``<cache>/root/<package>``: the package's files, downloaded and unpacked once."""
    root = cache / "root" / package
    if root.exists():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
    (deb,) = debs.glob(f"{package}_*.deb")
    partial = root.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted unpack
    partial.parent.mkdir(parents=True, exist_ok=True)  # dpkg -x creates only the last level
    subprocess.run(["dpkg", "-x", str(deb), str(partial)], check=True)
    partial.rename(root)
    return root


def audio_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file())


def clip_for(source: Path, cache: Path, label: str | None = None, group: str | None = None) -> Clip:
    relative = source.relative_to(cache / "root")
    return Clip(source, (cache / "clips" / relative).with_suffix(".wav"), label, group)


def pool_clips(cache: Path) -> list[Clip]:
    clips = [clip_for(path, cache) for package in POOL_PACKAGES for path in audio_files(cache / "root" / package)]
    clips += [clip_for(path, cache) for path in audio_files(cache / "root" / HEDGEWARS) if "voices" not in path.parts]
    clips += [clip_for(path, cache) for path in audio_files(cache / "root" / TUXPAINT) if "_desc" not in path.name]
    return clips


def voice_clips(cache: Path) -> list[Clip]:
    """Hedgewars voice packs: label = pack, group = phrase (file name without extension)."""
    return [clip_for(path, cache, label=path.parent.name, group=path.stem.lower())
            for path in audio_files(cache / "root" / HEDGEWARS) if path.parent.parent.name == "voices"]


def language_clips(cache: Path, per_language: int) -> list[Clip]:
    """Tuxpaint descriptions ``<stamp>_desc_<lang>.ogg``: label = language, group = stamp."""
    clips = []
    for path in audio_files(cache / "root" / TUXPAINT):
        stamp, marker, language = path.stem.rpartition("_desc_")
        if marker and language in LANGUAGES:
            group = (path.parent / stamp).relative_to(cache / "root").as_posix()
            clips.append(clip_for(path, cache, label=language, group=group))
    clips.sort(key=lambda clip: (unit_hash("keep " + clip.group), clip.source))  # not the split's hash
    kept, selected = collections.Counter(), []
    for clip in clips:
        if kept[clip.label] < per_language:
            kept[clip.label] += 1
            selected.append(clip)
    return selected


_RESAMPLERS: dict[int, torchaudio.transforms.Resample] = {}


def decode(clip: Clip) -> str | None:
    """Write the clip's 16 kHz mono WAV (once); the reason when the file cannot be decoded."""
    if clip.target.exists():
        return None
    try:
        samples, rate = soundfile.read(clip.source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        return f"{clip.source}: {error}"
    if len(samples) == 0:
        return f"{clip.source}: no samples"
    waveform = torch.from_numpy(samples.mean(axis=1))
    if rate != SAMPLE_RATE:
        waveform = _RESAMPLERS.setdefault(rate, torchaudio.transforms.Resample(rate, SAMPLE_RATE))(waveform)
    clip.target.parent.mkdir(parents=True, exist_ok=True)
    partial = clip.target.with_suffix(".partial.wav")
    soundfile.write(partial, waveform.clamp(-1, 1).numpy(), SAMPLE_RATE, subtype="PCM_16")
    partial.rename(clip.target)
    return None


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label", "split"])
        writer.writerows(rows)


def relative_uri(clip: Clip, cache: Path) -> str:
    return clip.target.relative_to(cache).as_posix()


def task_rows(clips: list[Clip], cache: Path) -> list[tuple[str, str, str]]:
    """Manifest rows with group-disjoint splits; checks that no group is on two sides."""
    splits_of_group = collections.defaultdict(set)
    rows = []
    for clip in clips:
        split = split_of(clip.group)
        splits_of_group[clip.group].add(split)
        rows.append((relative_uri(clip, cache), clip.label, split))
    assert all(len(splits) == 1 for splits in splits_of_group.values()), "a group is on two sides of a split"
    return rows


def print_counts(name: str, rows: list[tuple[str, str, str]]) -> None:
    counts = collections.Counter((label, split) for _, label, split in rows)
    labels = sorted({label for _, label, _ in rows})
    print(f"\n{name}: {len(rows)} clips, {len(labels)} classes")
    print(f"  {'class':<14}" + "".join(f"{split:>11}" for split, _ in SPLITS))
    for label in labels:
        print(f"  {label:<14}" + "".join(f"{counts[label, split]:>11}" for split, _ in SPLITS))
    print(f"  {'all':<14}" + "".join(f"{sum(counts[label, split] for label in labels):>11}" for split, _ in SPLITS))


def seconds(clips: list[Clip]) -> float:
    return sum(soundfile.info(clip.target).duration for clip in clips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("outputs/learning/data"))
    parser.add_argument("--jobs", type=int, default=2, help="decoding processes")
    parser.add_argument("--per-language", type=int, default=300, help="cap on the language task's clips per language")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    for package in PACKAGES:
        fetch(package, cache)

    pool = pool_clips(cache)
    tasks = {"voice": voice_clips(cache), "language": language_clips(cache, args.per_language)}
    everything = [clip for clips in tasks.values() for clip in clips] + pool
    with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as executor:
        failures = [reason for reason in executor.map(decode, everything, chunksize=32) if reason]
    for reason in failures:
        print(f"skipped {reason}")
    pool = [clip for clip in pool if clip.target.exists()]
    tasks = {name: [clip for clip in clips if clip.target.exists()] for name, clips in tasks.items()}

    pool_split = {name: [c for c in pool if (unit_hash(relative_uri(c, cache)) < 0.05) == (name == "validation")]
                  for name in ("train", "validation")}
    for name, clips in pool_split.items():
        write_manifest(cache / f"pool_{name}.csv", [(relative_uri(clip, cache), "", "") for clip in clips])
    print(f"pool: {len(pool_split['train'])} train + {len(pool_split['validation'])} validation files, "
          f"{seconds(pool) / 3600:.2f} h of audio")
    for name, clips in tasks.items():
        rows = task_rows(clips, cache)
        write_manifest(cache / f"task_{name}.csv", rows)
        print_counts(f"task {name} ({seconds(clips) / 3600:.2f} h)", rows)
    print(f"\nmanifests in {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
