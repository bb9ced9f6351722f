"""``python -m pipeline.featurize``: decode audio from object storage and store its fbank features.

    python -m pipeline.featurize --config configs/featurize/<preset>.yaml [--set key=value ...] [--overwrite]

Sources are loose audio files, WebDataset tar members or Parquet audio rows (``pipeline.data.sources``).
They are dealt into shards of ``shard_size`` in a seeded random order, so every shard is a mix of the
whole input (class folders and per-speaker tars do not end up one per shard), yet the same input
always gives the same shards. The assignment is stored (``_plan.parquet``) before any work. A Ray
Data actor pool featurizes one shard per call: it reads each source, decodes it (mono, 16 kHz, DC
removed) and computes the raw Kaldi log-mel fbank with ``ssamba.features``, then writes the shard as
one Parquet object of features, one of quarantined sources (URI + reason) and, last, a completion
record with both objects' row counts and sizes. A re-run resumes: it skips the shards whose record
matches their objects and redoes the others (a lost or truncated object, an interrupted write), after
deleting the ``*.partial`` files that interrupted local writes leave.

Only a source that is not there or cannot be decoded is quarantined. A store that fails (unreachable,
timing out, throttling, refusing the credentials) is retried a few times, then the job stops with one
line naming it; the shards it could not read are not written, so a re-run once the store is back
does them.

A re-run over a grown input (new files under the same prefix or manifest) deals only the new sources
into new shards and reports how many were added; sources that disappeared are reported and their
features kept. A destination written with other settings (fbank, audio, shard size) or from another
input location is refused unless ``--overwrite`` is given. Nothing is ever written twice.

Output under the destination::

    features/part-00000.parquet     uri, label, split, fold, chunk, offset_s, duration_s,
                                    source_sample_rate, source_channels, n_frames, n_mels,
                                    fbank (float16 bytes, n_frames × n_mels, row-major)
    quarantine/part-00000.parquet   uri, reason, detail
    done/part-00000.json            rows and bytes of both objects, written last: the shard is complete
                                    (a shard without one, from before records existed, counts when both
                                    Parquet footers read; its record is written then)
    _plan.parquet                   shard, source (JSON): which source went to which shard
    _run.json                       config (no credentials), settings fingerprint, counts, versions
"""

from __future__ import annotations

import sys

from pipeline.config import FeaturizeConfig
from pipeline.data.featurizer import run
from pipeline.data.reading import StorageUnavailable
from pipeline.data.shards import DestinationConflict
from pipeline.data.sources import SourceError
from pipeline.runtime.launch import run_command, source_inputs

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], FeaturizeConfig,
                       lambda config, args: run(config, overwrite=args.overwrite).table(),
                       argv, (SourceError, DestinationConflict, StorageUnavailable), inputs=lambda config: source_inputs("input", config.input),
                       overwrite_flag=True)


if __name__ == "__main__":
    from pipeline.featurize import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
