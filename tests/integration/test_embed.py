"""The embed job end to end: audio in the S3 test server → embeddings Parquet, on a local Ray cluster."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from support.audio_files import BAD, GOOD
from pipeline import embed
from pipeline.audio import decode_audio
from pipeline.config import EmbedConfig, load_config
from pipeline.storage import resolve
from ssamba import EncoderConfig, PatchGrid, SSAMBAEncoder, hear, save_checkpoint

pytestmark = pytest.mark.timeout(300)


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
    assert embed.run(config) == len(GOOD) + len(BAD)
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
        assert np.asarray(row["timestamp_embeddings"]).shape == (len(row["timestamps"]), 32)
    for name, reason in BAD.items():
        row = rows[f"s3://embed/audio/{name}"]
        assert not row["ok"] and row["error"].startswith(reason) and row["scene"] is None
    with pytest.raises(embed.EmbedError, match="--overwrite"):
        embed.run(config)


def test_embed_featurize_output(ray_cluster, pretrain_features, model_in_s3, tmp_path):
    config = load_config(EmbedConfig, None, [
        f"features={pretrain_features}", f"output={tmp_path / 'emb'}", f"model={model_in_s3[0]}"])
    assert embed.run(config) == 24
    table = pq.read_table(str(tmp_path / "emb"))
    assert all(table.column("ok").to_pylist()) and len(table.column("scene")[0]) == 32
