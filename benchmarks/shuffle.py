"""Training-input throughput with and without shuffling, side by side in one run.

Writes a synthetic featurize destination (``--shards`` Parquet shards of ``--rows`` random 1024 × 128
fbanks, the job's own schema), then reads full epochs of ``pipeline.data.examples.examples_dataset`` through
``training_batches`` as the pretraining loop does:

* ordered: ``shuffle: false`` (files in order, no buffer);
* shuffled: ``shuffle: true`` (a new file order every epoch) and a local shuffle buffer of
  ``shuffle_buffer`` examples.

The two alternate for ``--repeats`` epochs each; the median examples/s of each and their ratio are
printed (the target: shuffled ≥ 90 % of ordered).

    python benchmarks/shuffle.py [--shards 8] [--rows 64] [--repeats 3] [--buffer 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
from synthetic import write_feature_store

from pipeline.config import ExamplesConfig, S3Config
from pipeline.data.examples import examples_dataset, training_batches


def epoch_rate(features: Path, shuffle: bool, buffer: int, batch_size: int) -> float:
    config = ExamplesConfig(features=str(features), shuffle=shuffle, shuffle_buffer=buffer)
    dataset = examples_dataset(config, S3Config(), columns=["fbank"], finished=False)
    start, count = time.perf_counter(), 0
    for batch in training_batches(dataset, config, config.local_shuffle_buffer, batch_size):
        count += batch["fbank"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="examples per shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--buffer", type=int, default=ExamplesConfig.model_fields["shuffle_buffer"].default)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # never a stray cluster
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as folder:
        write_feature_store(Path(folder), args.shards, args.rows)
        epoch_rate(Path(folder), False, 0, args.batch_size)  # warm-up: workers, imports, page cache
        rates: dict[str, list[float]] = {"ordered": [], "shuffled": []}
        for _ in range(args.repeats):
            rates["ordered"].append(epoch_rate(Path(folder), False, 0, args.batch_size))
            rates["shuffled"].append(epoch_rate(Path(folder), True, args.buffer, args.batch_size))
    ordered, shuffled = (statistics.median(rates[name]) for name in ("ordered", "shuffled"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.shards} shards × {args.rows} examples "
          f"(1024 × 128), batch {args.batch_size}, buffer {args.buffer}")
    for name, values in rates.items():
        print(f"{name:<9} median {statistics.median(values):7.1f} examples/s  (epochs: "
              + ", ".join(f"{value:.1f}" for value in values) + ")")
    print(f"shuffled / ordered = {shuffled / ordered:.3f}")


if __name__ == "__main__":
    main()
