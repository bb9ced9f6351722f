"""``ssamba.from_pretrained`` (files, preset names in the local cache, URIs refused) and
``pipeline.models.from_pretrained`` (any URI the pipeline reaches)."""

import io

import pytest
import torch

from pipeline import models
from ssamba import EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel, from_pretrained, save_checkpoint
from ssamba.pretrained import PRESETS, cache_dir

from support.checkpoints import official_layout

GRID = PatchGrid(num_mel_bins=32, target_length=64)


def pretrain_model() -> SSAMBAPretrainModel:
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(EncoderConfig(embed_dim=16, depth=2, grid=GRID))
    return SSAMBAPretrainModel(encoder, GRID, PretrainConfig(mask_patches=3)).eval()


def exported_encoder(model: SSAMBAPretrainModel) -> bytes:
    """What a pretraining run exports as ssamba_encoder.pt (pipeline.pretrain)."""
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, model.encoder.config, model.config, metadata={"step": 5})
    return buffer.getvalue()


def official(model: SSAMBAPretrainModel) -> bytes:
    buffer = io.BytesIO()
    torch.save(official_layout(model), buffer)
    return buffer.getvalue()


def assert_same_weights(encoder: SSAMBAEncoder, model: SSAMBAPretrainModel) -> None:
    assert not encoder.training and encoder.config == model.encoder.config
    expected = model.encoder.state_dict()
    assert encoder.state_dict().keys() == expected.keys()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_loads_an_exported_encoder_from_a_path_uri_bytes_or_file_object(tmp_path):
    model = pretrain_model()
    path = tmp_path / "ssamba_encoder.pt"
    path.write_bytes(exported_encoder(model))
    for source in (str(path), path, path.as_uri(), path.read_bytes(), io.BytesIO(path.read_bytes())):
        assert_same_weights(from_pretrained(source), model)


def test_loads_an_official_checkpoint_from_a_path_or_file_object(tmp_path):
    model = pretrain_model()
    path = tmp_path / "ssamba_tiny_400.pth"
    path.write_bytes(official(model))
    assert_same_weights(from_pretrained(str(path)), model)
    assert_same_weights(from_pretrained(io.BytesIO(path.read_bytes())), model)  # read once, tried in both formats


def test_preset_name_resolves_in_ssamba_home(tmp_path, monkeypatch):
    model = pretrain_model()
    monkeypatch.setenv("SSAMBA_HOME", str(tmp_path))
    assert PRESETS["ssamba-tiny-400"] == "ssamba_tiny_400.pth" and len(PRESETS) == 9
    (tmp_path / "ssamba_tiny_400.pth").write_bytes(official(model))
    assert_same_weights(from_pretrained("ssamba-tiny-400"), model)
    monkeypatch.delenv("SSAMBA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "ssamba"


def test_missing_preset_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAMBA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="network access") as error:
        from_pretrained("ssamba-base-250")
    assert str(tmp_path / "ssamba_base_250.pth") in str(error.value) and "SSAMBA_HOME" in str(error.value)
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset name"):
        from_pretrained(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("uri", ["s3://bucket/ssamba_encoder.pt", "models:/encoder/3", "gs://bucket/model.pth"])
def test_uris_point_to_the_pipeline(uri):
    with pytest.raises(ValueError, match="pipeline.models.from_pretrained"):
        from_pretrained(uri)


def test_pipeline_from_pretrained_reads_uris_and_delegates_paths_and_presets(tmp_path, monkeypatch):
    model = pretrain_model()
    path = tmp_path / "ssamba_encoder.pt"
    path.write_bytes(exported_encoder(model))
    assert_same_weights(models.from_pretrained(path.as_uri()), model)
    assert_same_weights(models.from_pretrained(str(path)), model)
    monkeypatch.setenv("SSAMBA_HOME", str(tmp_path))
    (tmp_path / "ssamba_small_300.pth").write_bytes(official(model))
    assert_same_weights(models.from_pretrained("ssamba-small-300"), model)
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        models.from_pretrained("gs://bucket/model.pth")
