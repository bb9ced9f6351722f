"""Featurization throughput: one process vs the Ray Data featurize job on every core, side by side.

Writes ``--clips`` 10-second clips per format (16 kHz mono WAV and FLAC) to a temporary folder, then

* one process: the job's own shard code (read, decode, fbank, Parquet write), shard after shard,
  one torch thread → clips/s on one core;
* Ray Data: ``pipeline.featurize`` on a local cluster with one actor per core → clips/s in the
  steady state (from the first shard started to the last written, as the job's summary reports)
  and over the whole job's wall clock (which adds the actor pool's start-up);

and prints clips/s/core for both and the scaling efficiency ``ray / (cores × one-core rate)``.

    python benchmarks/featurize.py [--clips 200] [--cores N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from pipeline import featurize
from pipeline.config import FeaturizeConfig, load_config
from pipeline.data import featurizer
from pipeline.data.sources import list_sources


def write_clips(folder: Path, fmt: str, count: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(160_000) / 16_000
    folder.mkdir(parents=True)
    for index in range(count):
        tone = 0.3 * np.sin(2 * np.pi * (200 + index) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(folder / f"clip{index:05d}.{fmt.lower()}", tone.astype(np.float32), 16_000, format=fmt, subtype="PCM_16")


def job_config(folder: Path, output: Path, cores: int) -> FeaturizeConfig:
    return load_config(FeaturizeConfig, None, [f"input.uri={folder}", f"output={output}",
                                               f"num_workers={cores}", "shard_size=64"])


def one_process_rate(folder: Path, output: Path) -> float:
    """The job's own actor code (read, decode, fbank, Parquet write), run in this process."""
    config = job_config(folder, output, 1)
    sources = list_sources(config.input, config.storage)
    shards = [sources[i : i + config.shard_size] for i in range(0, len(sources), config.shard_size)]
    worker = featurizer.ShardFeaturizer(config)  # sets one torch thread, like each actor
    start = time.perf_counter()
    for index, shard in enumerate(shards):
        worker({"shard": np.array([index]), "sources": np.array([json.dumps([s.to_dict() for s in shard])])})
    return len(sources) / (time.perf_counter() - start)


def ray_rates(folder: Path, output: Path, cores: int) -> tuple[float, float]:
    """Files/s of the job: steady state (actors up, first shard started → last written) and wall
    clock including the actor pool's start-up (each actor imports torch: seconds, once per job)."""
    start = time.perf_counter()
    summary = featurize.run(job_config(folder, output, cores))
    return summary.files_per_second, summary.files / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="featbench") as tmp:
        root = Path(tmp)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, log_to_driver=False)  # never a stray cluster
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_clips(root / "warmup", "WAV", 2 * args.cores)
        ray_rates(root / "warmup", root / "out-warmup", args.cores)
        print(f"featurize throughput, 10-s clips, {args.cores} cores ({platform.processor() or platform.machine()}), "
              f"torch {torch.__version__}, ray {ray.__version__}")
        print(f"{'format':<6} {'1 proc clips/s/core':>20} {'ray clips/s':>12} {'ray clips/s/core':>17} "
              f"{'efficiency':>11} {'wall clips/s':>13} {'wall efficiency':>16}")
        for fmt in ("WAV", "FLAC"):
            folder = root / fmt
            write_clips(folder, fmt, args.clips)
            single = one_process_rate(folder, root / f"out-single-{fmt}")
            parallel, wall = ray_rates(folder, root / f"out-{fmt}", args.cores)
            ideal = args.cores * single
            print(f"{fmt:<6} {single:>20.1f} {parallel:>12.1f} {parallel / args.cores:>17.1f} "
                  f"{parallel / ideal:>10.0%} {wall:>13.1f} {wall / ideal:>15.0%}")
        ray.shutdown()


if __name__ == "__main__":
    main()
