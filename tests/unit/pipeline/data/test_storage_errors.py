"""Which read failures are bad input (quarantined) and which are a failing store (retried, then the job
stops): pyarrow's own errors where they can be made here, its messages where they need a remote store."""

from __future__ import annotations

import socket
import time

import pyarrow.fs as pafs
import pytest

from support.audio_files import parquet_table
from pipeline.data.audio import AudioError
from pipeline.data import featurizer
from pipeline.config import AudioConfig, S3Config
from pipeline.data.reading import SourceReader, StorageUnavailable, read_source
from pipeline.data.sources import AudioSource
from pipeline.data.storage import is_missing
from ssamba.features import FbankConfig

MISSING = [
    "[Errno 2] Path does not exist 'raw/a/missing.wav'. Detail: [errno 2] No such file or directory",
    "AWS Error NO_SUCH_KEY during GetObject operation: NoSuchKey: The specified key does not exist.",
    "AWS Error NO_SUCH_BUCKET during HeadObject operation: NoSuchBucket",
    "Cannot open for reading: path '/data' is a directory",
]
STORE_FAILING = [
    "When reading information for key 'a/x.wav' in bucket 'raw': AWS Error NETWORK_CONNECTION during HeadObject "
    "operation: curlCode: 7, Could not connect to server",
    "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached",
    "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Unable to parse ExceptionName: SlowDown",
    "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.",
    "AWS Error INTERNAL_FAILURE (HTTP status 500) during GetObject operation",
    "Unable to connect to endpoint",
    "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
    "AWS Error INVALID_ACCESS_KEY_ID during GetObject operation: InvalidAccessKeyId",
    "AWS Error UNKNOWN (HTTP status 400) during HeadObject operation: ExpiredToken",
    "[Errno 5] Input/output error",
]


@pytest.mark.parametrize("message", MISSING)
def test_not_there_is_missing(message):
    assert is_missing(OSError(message))


@pytest.mark.parametrize("message", STORE_FAILING)
def test_transport_and_credential_errors_are_the_store_failing(message):
    assert not is_missing(OSError(message))


def closed_port() -> int:
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable_reader() -> SourceReader:
    return SourceReader(S3Config(endpoint_url=f"http://127.0.0.1:{closed_port()}", access_key_id="key",
                                 secret_access_key="secret", max_attempts=1, connect_timeout_s=1, request_timeout_s=1))


def test_real_errors_are_classified(tmp_path):
    local = pafs.LocalFileSystem()
    for path in (tmp_path / "absent.wav", tmp_path):  # a missing file, a folder
        with pytest.raises(OSError) as error:
            local.open_input_stream(str(path)).read()
        assert is_missing(error.value)
    with pytest.raises(OSError) as error:
        unreachable_reader().read("s3://raw/a.wav")
    assert not is_missing(error.value)


def test_read_source_does_not_retry_a_missing_file(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        read_source(SourceReader(S3Config()), str(tmp_path / "absent.wav"), attempts=2, backoff_s=30)
    assert time.monotonic() - start < 30


def test_read_source_retries_a_failing_store_then_names_it():
    reader = unreachable_reader()
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as error:
        read_source(reader, "s3://raw/a.wav", attempts=3, backoff_s=0.2)
    assert time.monotonic() - start >= 0.2 + 0.4  # backed off twice, doubling
    message = str(error.value)
    assert "s3://raw/a.wav" in message and reader.storage.endpoint_url in message and "3 times" in message
    assert "secret" not in message


def test_a_missing_file_is_quarantined_but_a_failing_store_fails_the_shard(tmp_path):
    audio, fbank = AudioConfig(), FbankConfig()
    features, quarantine = featurizer.featurize_shard([AudioSource(str(tmp_path / "absent.wav"))],
                                                     SourceReader(S3Config()), audio, fbank)
    assert features.num_rows == 0 and quarantine.column("reason").to_pylist() == ["unreadable"]
    with pytest.raises(StorageUnavailable):
        featurizer.featurize_shard([AudioSource("s3://raw/a.wav")], unreachable_reader(), audio, fbank)


def test_a_corrupt_parquet_row_group_is_bad_data_but_an_unreachable_table_is_the_store(tmp_path):
    table = tmp_path / "table.parquet"
    table.write_bytes(parquet_table([{"audio": {"bytes": bytes([row]) * 4000, "path": f"{row}.wav"}} for row in range(4)],
                                    corrupt_group=1))
    reader = SourceReader(S3Config())
    assert reader.read(f"{table}#1") == bytes([1]) * 4000  # the intact group still reads
    with pytest.raises(AudioError) as error:
        reader.read(f"{table}#2")
    assert error.value.reason == "corrupt" and "row group 1" in error.value.detail
    with pytest.raises(OSError) as error:
        unreachable_reader().read("s3://raw/table.parquet#2")
    assert not is_missing(error.value)
