"""The embed job end to end: audio in the S3 test server → embeddings Parquet, on a local Ray cluster; a
job killed partway resumes where it stopped."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from support.audio_files import BAD, GOOD
from pipeline import embed
from pipeline.data.audio import decode_audio
from pipeline.config import EmbedConfig, load_config
from pipeline.data.shards import DestinationConflict
from pipeline.data.storage import resolve
from ssamba import (
    AudioClassifier, ClassifierConfig, EncoderConfig, FbankConfig, FeatureSettings, PatchGrid, SSAMBAEncoder, hear,
    load_classifier, save_checkpoint, save_classifier,
)
from ssamba.features import norm_stats

CLASSES = ["hum", "tone", "whistle"]

pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("embed")]  # its module fixtures once


@pytest.fixture(scope="module")
def model_in_s3(s3_server):
    torch.manual_seed(0)
    config = EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(target_length=128))
    buffer = io.BytesIO()
    save_checkpoint(buffer, SSAMBAEncoder(config), config)
    s3_server.create_bucket("embed")
    s3_server.client().put_object(Bucket="embed", Key="models/encoder.pt", Body=buffer.getvalue())
    return "s3://embed/models/encoder.pt", buffer.getvalue()


def test_embed_audio_from_s3(ray_cluster, s3_server, collection, model_in_s3, tmp_path):
    root, files = collection
    s3_server.upload_folder(root, "embed", "audio")
    model_uri, model_bytes = model_in_s3
    config = load_config(EmbedConfig, None, [
        "input.uri=s3://embed/audio", "output=s3://embed/out", f"model={model_uri}", "embeddings=both", "batch_size=4"])
    first = embed.run(config)
    assert first.rows == len(GOOD) + len(BAD) and first.failed == len(BAD) and first.shards_reused == 0
    output = resolve(config.output)
    rows = {row["uri"]: row for row in pq.read_table(output.path, filesystem=output.filesystem).to_pylist()}
    (tmp_path / "encoder.pt").write_bytes(model_bytes)
    model = hear.load_model(str(tmp_path / "encoder.pt"))
    for name in GOOD:
        row = rows[f"s3://embed/audio/{name}"]
        assert row["ok"] and row["error"] is None
        waveform = torch.from_numpy(decode_audio(files[name], name).waveform)[None]
        expected_scene = hear.get_scene_embeddings(waveform, model)[0]
        np.testing.assert_allclose(row["scene"], expected_scene.numpy(), rtol=1e-4, atol=1e-5)
        embeddings, timestamps = hear.get_timestamp_embeddings(waveform, model)
        assert row["timestamps"] == timestamps[0].tolist()
        assert np.asarray(row["timestamp_embeddings"]).shape == (len(row["timestamps"]), model.timestamp_embedding_size)
    for name, reason in BAD.items():
        row = rows[f"s3://embed/audio/{name}"]
        assert not row["ok"] and row["error"].startswith(reason) and row["scene"] is None
    again = embed.run(config)  # a finished job run again: everything reused, nothing written twice
    assert (again.rows, again.shards_written, again.rows_reused) == (first.rows, 0, first.rows)
    assert len(pq.read_table(output.path, filesystem=output.filesystem)) == first.rows
    with pytest.raises(DestinationConflict, match="another input or configuration.*--overwrite"):
        embed.run(config.model_copy(update={"embeddings": "scene"}))


@pytest.fixture(scope="module")
def classifier_in_s3(s3_server):
    """A classifier file as a fine-tuning job exports it, in the S3 test server."""
    torch.manual_seed(1)
    encoder = SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(target_length=64, fstride=10, tstride=10)))
    buffer = io.BytesIO()
    settings = FeatureSettings(FbankConfig(), 64, norm_stats("audioset"), "float16")
    save_classifier(buffer, AudioClassifier(encoder, ClassifierConfig(len(CLASSES))), CLASSES, settings, "softmax", False)
    s3_server.create_bucket("embed")
    s3_server.client().put_object(Bucket="embed", Key="models/classifier.pt", Body=buffer.getvalue())
    return "s3://embed/models/classifier.pt", buffer.getvalue()


def test_embed_featurize_output_with_a_classifier(ray_cluster, pretrain_features, model_in_s3, classifier_in_s3, tmp_path):
    config = load_config(EmbedConfig, None, [
        f"features={pretrain_features}", f"output={tmp_path / 'emb'}", f"model={model_in_s3[0]}",
        f"classifier={classifier_in_s3[0]}", "top_k=2", "pooling=mean"])
    assert embed.run(config).rows == 24
    table = pq.read_table(str(tmp_path / "emb"))
    assert all(table.column("ok").to_pylist()) and len(table.column("scene")[0]) == 32  # the mean of D = 32
    classifier = load_classifier(classifier_in_s3[1])
    features = resolve(pretrain_features).join("features")
    stored = {row["uri"]: row for row in pq.read_table(features.path).to_pylist()}
    for row in table.to_pylist():
        source = stored[row["uri"]]
        raw = np.frombuffer(source["fbank"], dtype=np.float16).reshape(source["n_frames"], source["n_mels"])
        expected = classifier.top_k(classifier.predict_fbank(torch.from_numpy(raw.astype(np.float32))[None])[0], 2)
        assert row["labels"] == [label for label, _ in expected]
        np.testing.assert_allclose(row["probabilities"], [p for _, p in expected], rtol=1e-5)


def test_embed_refuses_stored_features_the_encoder_does_not_take(pretrain_features, tmp_path):
    """``python -m pipeline.embed`` on 128-mel features with a 64-mel encoder: a message naming the
    field and both settings, before any cluster work, and nothing written."""
    config = EncoderConfig(embed_dim=32, depth=2, grid=PatchGrid(num_mel_bins=64, target_length=128))
    save_checkpoint(tmp_path / "encoder64.pt", SSAMBAEncoder(config), config)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "pipeline.embed", "--set", f"features={pretrain_features}",
                           "--set", f"output={tmp_path / 'emb'}", "--set", f"model={tmp_path / 'encoder64.pt'}"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert (f"features: {pretrain_features} hold fbanks of 128 mel bins at 16000 Hz, but model takes 64 mel bins "
            "at 16000 Hz") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "ray:" not in done.stdout and not (tmp_path / "emb").exists()


def test_embed_killed_after_its_first_shard_resumes_without_overwrite(small_encoder, tmp_path):
    """``python -m pipeline.embed`` SIGKILLed (its Ray with it) once its first shard is written, a stray
    partial object beside the shards; run again without ``--overwrite``: one row per file, none twice,
    the finished shards reused and said so."""
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for index in range(96):
        t = np.arange(5 * 16_000) / 16_000
        samples = 0.3 * np.sin(2 * np.pi * (200 + 7 * index) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(audio / f"clip{index:02d}.wav", samples.astype(np.float32), 16_000)
    output = tmp_path / "embeddings"
    command = [sys.executable, "-m", "pipeline.embed", *[arg for setting in (
        f"input.uri={audio}", f"output={output}", f"model={small_encoder}", "shard_size=8", "num_workers=1",
        "ray.address=local",
        "ray.num_cpus=2") for arg in ("--set", setting)]]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    repo = Path(__file__).resolve().parents[2]
    job = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 180
    while not list((output / "_done").glob("*.json")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    finished = len(list((output / "_done").glob("*.json")))
    assert 1 <= finished < 12, f"{finished} of 12 shards finished: the job was not stopped partway"
    (output / "embeddings" / ".part-00099.parquet.partial").write_bytes(b"PAR1 half an object")

    again = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    table = pq.read_table(output)
    uris = table.column("uri").to_pylist()
    assert len(uris) == 96 and set(uris) == {str(path) for path in audio.iterdir()} and all(table.column("ok").to_pylist())
    said = re.search(r"(\d+) shards written, (\d+) rows reused from (\d+) finished shards", again.stdout)
    assert said is not None, again.stdout
    written, rows_reused, reused = (int(number) for number in said.groups())
    assert written + reused == 12 and reused >= finished and rows_reused == 8 * reused
    assert not list(output.rglob("*.partial"))
