"""Storage URIs and the sources a job lists: prefixes, manifests, regions; the storage layer's imports."""

from __future__ import annotations

import json

import pytest
from support import REPO
from support.audio_files import BAD, GOOD, write_collection

from pipeline.config import (
    InputConfig,
    S3Config,
)
from pipeline.data.sources import AudioSource, SourceError, list_sources
from pipeline.data.storage import DEFAULT_REGION, resolve, s3_region


def test_resolve_uris(tmp_path):
    local = resolve(str(tmp_path))
    assert local.path == tmp_path.as_posix() and not local.is_s3
    assert resolve(f"file://{tmp_path}").path == tmp_path.as_posix()
    s3 = resolve("s3://bucket/some/prefix/", S3Config(endpoint_url="http://127.0.0.1:9000", region="eu-west-1"))
    assert s3.is_s3 and s3.path == "bucket/some/prefix" and s3.join("x.parquet").uri == "s3://bucket/some/prefix/x.parquet"
    assert str(s3) == "s3://bucket/some/prefix (endpoint http://127.0.0.1:9000)"
    for bad in ("gs://bucket/x", "s3://", "s3://bucket/x?endpoint_override=h"):
        with pytest.raises(ValueError):
            resolve(bad)


def test_s3_region_is_left_to_aws_unless_configured():
    looked_up = []

    def lookup(bucket):  # stands for the bucket-region request: no network here
        looked_up.append(bucket)
        return {"eu-bucket": "eu-west-1"}.get(bucket)

    aws = S3Config()
    assert s3_region(S3Config(region="ap-south-1"), "eu-bucket", {"AWS_REGION": "us-west-2"}, lookup) == "ap-south-1"
    assert s3_region(aws, "eu-bucket", {"AWS_REGION": "us-west-2"}, lookup) == "us-west-2"
    assert s3_region(aws, "eu-bucket", {"AWS_DEFAULT_REGION": "us-west-1"}, lookup) == "us-west-1"
    assert not looked_up  # a configured region is never second-guessed
    assert s3_region(aws, "eu-bucket", {}, lookup) == "eu-west-1"  # the bucket's own region, not us-east-1
    assert s3_region(aws, "private-bucket", {}, lookup) is None  # unknown: the AWS SDK decides (profile, metadata)
    assert s3_region(aws, None, {}, lookup) is None
    assert looked_up == ["eu-bucket", "private-bucket"]
    custom = S3Config(endpoint_url="http://127.0.0.1:9000")
    assert s3_region(custom, "b", {}, lookup) == DEFAULT_REGION  # S3-compatible stores keep the default
    assert s3_region(aws, "b", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}, lookup) == DEFAULT_REGION
    assert s3_region(custom, "b", {"AWS_REGION": "eu-central-1"}, lookup) == "eu-central-1"
    assert looked_up == ["eu-bucket", "private-bucket"]


def test_list_prefix_and_manifest(tmp_path):
    root = write_collection(tmp_path / "audio")
    sources = list_sources(InputConfig(uri=str(root)), S3Config())
    assert [s.uri for s in sources] == sorted(str(root / name) for name in [*GOOD, *BAD])  # README.txt skipped
    (root / "m.jsonl").write_text('{"uri": "good/tone_16k_mono.wav", "label": "a", "fold": 3}\n\n'
                                  f'{{"uri": "{root / "bad/empty.wav"}"}}\n')
    sources = list_sources(InputConfig(manifest=str(root / "m.jsonl")), S3Config())
    assert [(s.uri, s.label, s.fold) for s in sources] == [
        (str(root / "bad/empty.wav"), None, None), (str(root / "good/tone_16k_mono.wav"), "a", 3)]
    (root / "broken.csv").write_text("path,label\nx.wav,a\n")
    with pytest.raises(SourceError, match="needs a 'uri'"):
        list_sources(InputConfig(manifest=str(root / "broken.csv")), S3Config())
    (root / "dup.csv").write_text("uri\na.wav\na.wav\n")
    with pytest.raises(SourceError, match="more than once"):
        list_sources(InputConfig(manifest=str(root / "dup.csv")), S3Config())
    with pytest.raises(SourceError, match="does not exist"):
        list_sources(InputConfig(uri=str(root / "missing")), S3Config())


def test_multi_label_manifest_rows_round_trip(tmp_path):
    source = AudioSource("/a.wav", split="train", labels=("/m/x", "/m/y"))
    (tmp_path / "m.jsonl").write_text(json.dumps(source.to_dict()) + "\n")
    (tmp_path / "m.csv").write_text('uri,split,labels\n/a.wav,train,"/m/x,/m/y"\n')
    for manifest in ("m.jsonl", "m.csv"):
        assert list_sources(InputConfig(manifest=str(tmp_path / manifest)), S3Config()) == [source]
    assert AudioSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    assert AudioSource("/b.wav", "dog").to_dict() == {"uri": "/b.wav", "label": "dog", "split": None, "fold": None}
    assert AudioSource("/b.wav", "dog").targets == ("dog",)
    (tmp_path / "bad.jsonl").write_text('{"uri": "/a.wav", "labels": [1, 2]}\n')
    with pytest.raises(SourceError, match="labels must be a list of class names"):
        list_sources(InputConfig(manifest=str(tmp_path / "bad.jsonl")), S3Config())


def test_the_storage_layer_needs_neither_torch_nor_the_job_configs():
    import subprocess
    import sys

    probe = "import sys, pipeline.data.storage; print(sorted(m for m in ('torch', 'ssamba', 'pipeline.config') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
