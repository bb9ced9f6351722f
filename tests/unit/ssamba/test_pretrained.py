"""``ssamba.from_pretrained`` (files, preset names in the local cache, URIs refused) and
``pipeline.models.loaders.from_pretrained`` (any URI the pipeline reaches)."""

import io
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from pipeline.models import loaders as models
from pipeline.models.mlflow_models import log_torch_model
from ssamba import (
    AudioClassifier, ClassifierConfig, EncoderConfig, FbankConfig, FeatureSettings, PatchGrid, PretrainConfig, SSAMBAEncoder,
    SSAMBAPretrainModel, from_pretrained, norm_stats, save_checkpoint, save_classifier,
)
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


def assert_same_weights(encoder: SSAMBAEncoder, model) -> None:
    """``encoder`` is ``model.encoder`` (weights equal, eval mode)."""
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
    with pytest.raises(ValueError, match="pipeline.models.loaders.from_pretrained"):
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


def fine_tuned_classifier(model: SSAMBAPretrainModel) -> tuple[AudioClassifier, bytes]:
    """A classifier on the pretrained encoder, its encoder moved away from the pretrained weights."""
    classifier = AudioClassifier(SSAMBAEncoder(model.encoder.config), ClassifierConfig(3))
    classifier.encoder.load_state_dict(model.encoder.state_dict())
    with torch.no_grad():
        classifier.encoder.pos_embed.add_(1.0)
    buffer = io.BytesIO()
    save_classifier(buffer, classifier, ["a", "b", "c"], FeatureSettings(FbankConfig(num_mel_bins=32), target_length=64,
                                                                         norm=norm_stats("audioset")), "softmax", False)
    return classifier.eval(), buffer.getvalue()


def test_a_classifier_file_gives_its_fine_tuned_encoder(tmp_path):
    classifier, data = fine_tuned_classifier(pretrain_model())
    (tmp_path / "classifier.pt").write_bytes(data)
    for encoder in (from_pretrained(str(tmp_path / "classifier.pt")), models.from_pretrained((tmp_path / "classifier.pt").as_uri())):
        assert_same_weights(encoder, SimpleNamespace(encoder=classifier.encoder))


def test_models_uris_load_the_encoder_or_classifier_the_mlflow_model_holds(tmp_path, monkeypatch):
    """A real MLflow store: an encoder model and a classifier model logged as the jobs log them."""
    model = pretrain_model()
    classifier, classifier_data = fine_tuned_classifier(model)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("models")).info.run_id
    example = torch.randn(1, GRID.target_length, GRID.num_mel_bins)
    for name, module, data, file_name in [("encoder", model.encoder, exported_encoder(model), models.ENCODER_FILE),
                                          ("classifier", classifier, classifier_data, models.CLASSIFIER_FILE)]:
        (tmp_path / file_name).write_bytes(data)
        log_torch_model(tracking_uri, run_id, module, example, name, tmp_path / file_name, register_as=f"tiny-{name}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    assert_same_weights(models.from_pretrained("models:/tiny-encoder/1"), model)
    assert_same_weights(models.from_pretrained("models:/tiny-classifier/1"), SimpleNamespace(encoder=classifier.encoder))
    config, _ = models.load_encoder_weights("models:/tiny-classifier/1")
    assert config == classifier.encoder.config
