"""Training-input throughput: the pipeline's input against a plain one-process read loop, side by side.

Two inputs, each read both ways:

* stored features: a synthetic featurize destination (``--shards`` × ``--rows`` fbanks of 400–1,500
  frames × 128 mels, the job's schema and Parquet settings); ``stored-zstd``: the same with the fbanks
  zstd-compressed, as the featurize job wrote them before it stored them raw;
* on the fly: ``--clips`` WAV files of ``--seconds`` seconds, decoded and featurized while reading.

Pipeline: ``pipeline.data.examples.examples_dataset`` read with ``pipeline.data.examples.training_batches``, the pretraining
loop's own call (``iter_torch_batches``, two batches prefetched, the local shuffle buffer), on a local Ray
started with N CPUs and pinned to N cores, its driver included, for N in ``--cpus``. The driver reads the
batches as the Train worker does in pretraining: from 2 CPUs on, Ray Data schedules its tasks on N - 1 of
them, as it does beside a Train worker that holds one.

Plain loop: one process on one core reads the same shards (or files) in a shuffled order and does the same
work per clip: pyarrow → ``numpy.frombuffer`` → crop or pad to ``--target-length`` → normalise →
``torch.stack`` into batches (on the fly: decode → Kaldi fbank → the same).

Steady state only: the first ``--warmup`` batches are not timed, then ``--timed`` batches are; the set is
larger than both together plus any prefetch and shuffle buffer. The time to the first batch is printed
too. Each row: examples/s of the pipeline on N CPUs, of the plain loop on one core, and their ratio.

    python benchmarks/ingest.py [--cpus 1 2] [--inputs stored stored-zstd on-the-fly] [--shards 16] [--rows 384] [--clips 1600]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import ray
import soundfile
from ray.data import ExecutionResources
import torch
from synthetic import write_feature_store, write_wav_clips

from pipeline.config import AudioConfig, ExamplesConfig, InputConfig, S3Config
from pipeline.data.examples import examples_dataset, training_batches
from pipeline.data.feature_store import RAW_COLUMNS
from ssamba.features import FbankConfig, norm_stats, waveform_to_fbank

AVAILABLE = sorted(os.sched_getaffinity(0))  # the cores this benchmark may pin itself to


def timed(batches: Iterable[torch.Tensor | dict], warmup: int, count: int) -> tuple[float, float]:
    """(seconds to the first batch, examples/s over ``count`` batches after ``warmup``)."""
    started = time.perf_counter()
    first, clock, examples = None, None, 0
    for index, batch in enumerate(batches):
        if first is None:
            first = time.perf_counter() - started
        if index == warmup:
            clock = time.perf_counter()
        elif index > warmup:
            examples += len(batch["fbank"] if isinstance(batch, dict) else batch)
        if index == warmup + count:
            break
    if clock is None or examples == 0:
        raise SystemExit(f"the input gave fewer than {warmup + count + 1} batches: make the set larger")
    return first, examples / (time.perf_counter() - clock)


# --------------------------------------------------------------------------------------------------
# The plain loop: one process, no Ray
# --------------------------------------------------------------------------------------------------


def _crop_pad_normalise(fbank: np.ndarray, target_length: int, mean: float, std: float) -> np.ndarray:
    example = np.zeros((target_length, fbank.shape[1]), dtype=np.float32)
    kept = min(len(fbank), target_length)
    example[:kept] = fbank[:kept]
    return (example - mean) / (2 * std)


def _batched(examples: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    batch = []
    for example in examples:
        batch.append(torch.from_numpy(example))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []


def plain_stored(store: Path, config: ExamplesConfig, batch_size: int) -> Iterator[torch.Tensor]:
    stats = norm_stats(config.norm)
    shards = sorted((store / "features").glob("*.parquet"))
    random.Random(0).shuffle(shards)

    def examples() -> Iterator[np.ndarray]:
        for shard in shards:
            table = pq.read_table(shard, columns=["n_frames", "n_mels", "fbank"]).to_pydict()
            for frames, mels, data in zip(table["n_frames"], table["n_mels"], table["fbank"]):
                fbank = np.frombuffer(data, dtype=np.float16).reshape(frames, mels)
                yield _crop_pad_normalise(fbank, config.target_length, stats.mean, stats.std)

    return _batched(examples(), batch_size)


def plain_on_the_fly(clips: Path, config: ExamplesConfig, batch_size: int) -> Iterator[torch.Tensor]:
    stats = norm_stats(config.norm)
    files = sorted(clips.glob("*.wav"))
    random.Random(0).shuffle(files)

    def examples() -> Iterator[np.ndarray]:
        for path in files:
            samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
            fbank = waveform_to_fbank(torch.from_numpy(samples.T.copy()), FbankConfig(sample_rate=rate)).numpy()
            yield _crop_pad_normalise(fbank, config.target_length, stats.mean, stats.std)

    return _batched(examples(), batch_size)


# --------------------------------------------------------------------------------------------------
# Side by side
# --------------------------------------------------------------------------------------------------


def pipeline_rate(config: ExamplesConfig, cpus: int, args: argparse.Namespace) -> tuple[float, float]:
    os.sched_setaffinity(0, AVAILABLE[:cpus])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loop's one CPU, as Ray Train gives its worker (OMP_NUM_THREADS)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # As in pretraining: its Train worker holds a CPU and Ray Data schedules on the rest (with one CPU
        # in all, the reader and the loop share it).
        context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpus - 1 if cpus > 1 else None)
        dataset = examples_dataset(config, S3Config(), AudioConfig(), columns=["fbank"], finished=False)
        batches = training_batches(dataset, config, config.local_shuffle_buffer, args.batch_size)
        try:
            return timed(batches, args.warmup, args.timed)
        finally:
            batches.close()  # stop its prefetch threads before Ray goes: one left running ends the process
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, AVAILABLE)


def plain_rate(batches: Iterator[torch.Tensor], args: argparse.Namespace) -> tuple[float, float]:
    os.sched_setaffinity(0, AVAILABLE[:1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timed(batches, args.warmup, args.timed)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, AVAILABLE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, nargs="+", default=sorted({1, 2, len(AVAILABLE)}),
                        help="CPU counts to give the pipeline (default 1, 2 and all)")
    parser.add_argument("--inputs", nargs="+", choices=("stored", "stored-zstd", "on-the-fly"), default=["stored", "on-the-fly"])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=384, help="fbanks per shard")
    parser.add_argument("--clips", type=int, default=1600, help="WAV files for the on-the-fly input")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each WAV file")
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20, help="stored: batches read before the clock starts")
    parser.add_argument("--timed", type=int, default=150, help="stored: batches timed")
    parser.add_argument("--fly-warmup", type=int, default=20, help="on the fly: batches read before the clock starts")
    parser.add_argument("--fly-timed", type=int, default=20, help="on the fly: batches timed")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {len(AVAILABLE)} cores available; batch {args.batch_size}, "
          f"{args.target_length} frames, shuffle buffer {ExamplesConfig.model_fields['shuffle_buffer'].default}, "
          f"warm-up {args.warmup} batches stored, {args.fly_warmup} on the fly")
    print(f"{'input':<11} {'CPUs':>4} {'pipeline ex/s':>14} {'plain ex/s':>11} {'ratio':>6} {'first batch s':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.inputs:
            if name.startswith("stored"):
                store = write_feature_store(Path(folder) / name, args.shards, args.rows, frames=(400, 1500),
                                            raw_columns=() if name == "stored-zstd" else RAW_COLUMNS)
                config = ExamplesConfig(features=str(store), target_length=args.target_length)
                plain = plain_stored(store, config, args.batch_size)
                settings = args
            else:
                clips = write_wav_clips(Path(folder) / "clips", args.clips, args.seconds)
                config = ExamplesConfig(audio=InputConfig(uri=str(clips)), target_length=args.target_length)
                plain = plain_on_the_fly(clips, config, args.batch_size)
                settings = argparse.Namespace(**{**vars(args), "warmup": args.fly_warmup, "timed": args.fly_timed})
            _, plain_examples = plain_rate(plain, settings)
            for cpus in args.cpus:
                first, examples = pipeline_rate(config, cpus, settings)
                print(f"{name:<11} {cpus:>4} {examples:>14.1f} {plain_examples:>11.1f} "
                      f"{examples / plain_examples:>6.2f} {first:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
