"""Training input: Ray Datasets of normalised, augmented fbank examples for Ray Train.

Two sources give the same examples:

* featurize output (the default at scale): Parquet shards, each epoch only cropping, normalising and
  augmenting stored features;
* on the fly (small data, demos): audio files decoded and featurized inside the pipeline, every
  epoch again. Files that are not there or fail to decode are dropped, each with a warning in the logs;
  a store that keeps failing is retried, then raises ``StorageUnavailable`` in the pipeline instead of
  having its files dropped as bad audio.

With ``shuffle`` every epoch reads the shards (or files) in a new random order, and the training loops
mix rows across shards with a local buffer of ``shuffle_buffer`` examples (:func:`training_batches`);
featurize already deals sources into shards at random, so a batch is a sample of the whole corpus, not
of one folder.
Validation and test inputs use ``shuffle: false`` and keep their order.

Either way rows come out as ``{"fbank": float32 (target_length, mel), "frames": int (before padding),
"label": str | None, "uri": str}``. Training splits leave ``fbank`` as float16 crops
(``finished=False``) for :func:`training_batches` to finish on the training device.
"""

from __future__ import annotations

import json
import logging
from typing import Iterator, Sequence

import numpy as np
import ray
import torch

from pipeline.config import AudioConfig, ExamplesConfig, S3Config
from pipeline.data.audio import AudioError
from pipeline.data.feature_store import FBANK_COLUMNS, STORED_DTYPE, decode_cropped, featurize_source
from pipeline.data.reading import SourceReader, read_source
from pipeline.data.sources import AudioSource, list_sources
from pipeline.data.storage import Location, resolve
from ssamba.features import FbankConfig, add_noise, norm_stats, normalize, spec_augment

log = logging.getLogger(__name__)


def read_parquet(location: Location, **options) -> ray.data.Dataset:
    """``ray.data.read_parquet`` of ``location`` with Ray Data's first Parquet reader. The second one
    (Ray 2.60's default) lists files in a task and reads their footers on a pool of up to 32 new
    actors on every execution of a dataset, which is every epoch and every evaluation: about 15
    CPU-seconds and several seconds of each small run on a laptop, for feature stores of a few large
    shards whose footers the first reader reads itself. The reader is taken from the calling
    process's ``DataContext`` when the dataset is made, so it is chosen here, where the pipeline
    makes every Parquet dataset, rather than once per job: Tune trials are processes of their own.

    Reads are not split below one block per file (``read_op_min_num_blocks``): to reach its default 200
    read blocks Ray splits the output of a store with fewer files, and a split read is never fused with
    the step after it, so every example crossed the object store twice, as stored float16 rows and
    again as float32 examples. Unsplit, one task reads a shard and makes its examples
    (benchmarks/ingest.py: about 1.5 times the examples per second on 2 CPUs)."""
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    context.read_op_min_num_blocks = 1
    return ray.data.read_parquet(location.path, filesystem=location.filesystem, **options)


def crop_examples(batch: dict[str, np.ndarray], config: ExamplesConfig) -> dict[str, np.ndarray]:
    """Stored raw log-mel rows → fixed-length examples at stored precision (float16), a batch at a time, not yet
    finished (:func:`finish_examples`). What training reads: half the bytes of float32 in the object store and
    the shuffle buffer, and on the way to the device."""
    fbank = decode_cropped(batch["fbank"], batch["n_frames"], batch["n_mels"], config.target_length, STORED_DTYPE)
    return {"fbank": fbank, "frames": np.minimum(batch["n_frames"], config.target_length).astype(np.int64),
            "label": batch["label"], "uri": batch["uri"]}


def finish_examples(fbank: torch.Tensor, config: ExamplesConfig) -> torch.Tensor:
    """A batch of cropped examples → float32, masked, normalised and noised, where it is (on the training
    device, for the training input): the masks go on the raw values, before normalising, as the official
    loader does (docs/pipeline.md#training-input)."""
    features = fbank.float() if fbank.dtype != torch.float32 else fbank.clone()  # a batch this function owns
    augment = config.augment
    if augment.freq_mask or augment.time_mask:
        features = spec_augment(features, augment.freq_mask, augment.time_mask)
    features = normalize(features, norm_stats(config.norm), in_place=True)
    if augment.noise:
        features = torch.stack([add_noise(clip) for clip in features])
    return features


def to_examples(batch: dict[str, np.ndarray], config: ExamplesConfig) -> dict[str, np.ndarray]:
    """Stored raw log-mel rows → finished float32 examples (cropped, masked, normalised, noised)."""
    examples = crop_examples(batch, config)
    return {**examples, "fbank": finish_examples(torch.from_numpy(examples["fbank"]), config).numpy()}


def labelled_rows(batch: dict[str, np.ndarray], targets: dict[str, Sequence[int]],
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``batch`` whose URI has targets (a boolean mask) and their float multi-hot targets
    (one-hot for single-label tasks). Labels come by URI, not from the stored features, so one
    featurize run serves any labelling of the same audio."""
    keep = np.array([uri in targets for uri in batch["uri"]], dtype=bool)
    target = np.zeros((int(keep.sum()), num_classes), dtype=np.float32)
    for row, uri in enumerate(batch["uri"][keep]):
        target[row, list(targets[uri])] = 1.0
    return keep, target


EXAMPLE_COLUMNS = ("fbank", "frames", "label", "uri")  # what to_examples makes
EXAMPLES_PER_BLOCK = 32  # 16 MB of float32 (8 MB of float16 crops) at 1,024 × 128: the examples step's pieces


def _examples_in_blocks(batch: dict[str, np.ndarray], config: ExamplesConfig, columns: Sequence[str],
                        finished: bool) -> Iterator[dict[str, np.ndarray]]:
    """``columns`` of the examples of a whole read block (:func:`to_examples`, or :func:`crop_examples` if
    not ``finished``), ``EXAMPLES_PER_BLOCK`` rows at a time. The examples step takes whole blocks (a fixed
    ``batch_size`` would keep Ray from fusing it with the Parquet read) and converts them a piece at a
    time; Ray gathers the pieces into output blocks of up to its target block size."""
    make = to_examples if finished else crop_examples
    for start in range(0, len(batch["n_frames"]), EXAMPLES_PER_BLOCK):
        examples = make({name: column[start:start + EXAMPLES_PER_BLOCK] for name, column in batch.items()}, config)
        yield {name: examples[name] for name in columns}


_readers: dict[str, SourceReader] = {}  # one per store settings and worker process, reused across batches


def featurize_on_the_fly(batch: dict[str, np.ndarray], storage: S3Config, audio: AudioConfig) -> dict[str, list]:
    """Decode + fbank inside the training input pipeline. A task, not an actor: it holds its CPU only
    while it runs, so the file shuffle and featurizing share whatever CPUs the input has (an actor
    pool kept them, and on a two-CPU machine the shuffle waited for a CPU forever)."""
    torch.set_num_threads(1)
    key = storage.model_dump_json()
    if key not in _readers:
        _readers[key] = SourceReader(storage)
    reader, fbank_config = _readers[key], FbankConfig(sample_rate=audio.sample_rate)
    rows = []
    for item in batch["source"]:
        source = AudioSource.from_dict(json.loads(item))
        try:  # a failing store is retried, then stops the run (StorageUnavailable): it is not bad audio
            data = read_source(reader, source.uri)
            rows += [{**source.to_dict(), **row} for row in featurize_source(data, source.uri, audio, fbank_config)]
        except (AudioError, OSError) as error:  # not there, or not audio: skipped, as featurize quarantines it
            log.warning("on-the-fly: skipping %s (%s)", source.uri, error)
    columns = ("uri", "label", *FBANK_COLUMNS)
    return {name: [row[name] for row in rows] for name in columns}


def training_batches(examples: ray.data.Dataset | ray.data.DataIterator, config: ExamplesConfig, buffer_rows: int | None,
                     batch_size: int, device: torch.device | str = "cpu",
                     drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over training examples (``examples_dataset(..., finished=False)``) as the training loops read
    them: torch batches on ``device``, two prefetched, rows mixed across shards in a local buffer of
    ``buffer_rows`` examples (None or 0: kept in order), each batch finished there
    (:func:`finish_examples`). benchmarks/ingest.py measures exactly this."""
    batches = iter(examples.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, device=device,
                                               prefetch_batches=2, local_shuffle_buffer_size=buffer_rows or None))
    try:
        for batch in batches:
            yield {**batch, "fbank": finish_examples(batch["fbank"], config)}
    finally:
        batches.close()  # its prefetch threads stop now, not when Ray is gone


def examples_dataset(config: ExamplesConfig, storage: S3Config, audio: AudioConfig = AudioConfig(),
                     columns: Sequence[str] = EXAMPLE_COLUMNS, finished: bool = True) -> ray.data.Dataset:
    """A Ray Dataset of examples (see the module docstring), with ``columns`` of them only. Not ``finished``:
    float16 crops that :func:`training_batches` finishes on the training device (the training input: the
    read tasks did two thirds of the work there and moved twice the bytes).

    Choose the columns here rather than with ``select_columns`` after it: Ray fuses that projection into
    the read task, which then holds back its output until the task ends, one block of a whole shard (200
    to 400 MB of examples) instead of a block every 128 MB (benchmarks/ingest.py: about 0.7 of the rate)."""
    if config.features is not None:
        location = resolve(config.features, storage).join("features")
        dataset = read_parquet(location, columns=["uri", "label", *FBANK_COLUMNS],
                               shuffle="files" if config.shuffle else None)
    else:
        sources = list_sources(config.audio, storage)
        dataset = ray.data.from_items([{"source": json.dumps(source.to_dict())} for source in sources])
        if config.shuffle:
            dataset = dataset.random_shuffle()  # file order; the rows are tiny until featurized
        dataset = dataset.map_batches(featurize_on_the_fly, fn_kwargs={"storage": storage, "audio": audio},
                                      batch_size=8, num_cpus=1)
    return dataset.map_batches(_examples_in_blocks, batch_size=None,
                               fn_kwargs={"config": config, "columns": tuple(columns), "finished": finished})
