"""The HEAR 2021 API: every rule of the contract, on white noise of several lengths and batch sizes."""

from __future__ import annotations

import pytest
import torch

from ssamba import EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel, hear, save_checkpoint
from support.checkpoints import official_layout

GRID = PatchGrid(num_mel_bins=128, target_length=128)  # 8 × 8 patches; a 1.28-s window


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    torch.manual_seed(0)
    config = EncoderConfig(embed_dim=32, depth=2, grid=GRID)
    model = SSAMBAPretrainModel(SSAMBAEncoder(config), GRID, PretrainConfig(mask_patches=10))
    path = tmp_path_factory.mktemp("hear") / "model.pt"
    save_checkpoint(path, model, config, model.config)
    return path, model


def noise(n_sounds: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n_sounds, n_samples, generator=torch.Generator().manual_seed(seed)) * 2 - 1).float()


BANDS = GRID.freq_patches  # 8 frequency bands of 32 values each


def test_model_attributes(checkpoint_path):
    model = hear.load_model(str(checkpoint_path[0]))
    assert isinstance(model, torch.nn.Module)
    for name, value in (("sample_rate", 16_000), ("scene_embedding_size", BANDS * 32),
                        ("timestamp_embedding_size", BANDS * 32)):
        assert isinstance(getattr(model, name), int) and getattr(model, name) == value
    compact = hear.load_model(str(checkpoint_path[0]), pooling="mean")
    assert compact.scene_embedding_size == compact.timestamp_embedding_size == 32
    default = hear.load_model(pooling="mean")
    assert default.scene_embedding_size == 192 and default.sample_rate == 16_000
    with pytest.raises(ValueError, match="pooling must be one of"):
        hear.load_model(pooling="max")


@pytest.mark.parametrize("n_samples", [100, 16_000, 3 * 16_000 + 123, 7 * 16_000])
@pytest.mark.parametrize("n_sounds", [1, 3])
def test_timestamp_and_scene_embeddings_follow_the_api(checkpoint_path, n_sounds, n_samples):
    model = hear.load_model(str(checkpoint_path[0]))
    audio = noise(n_sounds, n_samples)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    assert embeddings.dim() == 3 and embeddings.shape[0] == n_sounds and embeddings.shape[2] == BANDS * 32
    assert timestamps.shape == embeddings.shape[:2]
    steps = timestamps[:, 1:] - timestamps[:, :-1]
    assert torch.all(steps == steps.flatten()[0]) if steps.numel() else True  # regular
    assert steps.numel() == 0 or steps.flatten()[0] <= 50.0
    duration_ms = max(n_samples, 2_800) / 16
    assert timestamps.min() >= 0 and timestamps.max() <= duration_ms  # timestamps lie inside the sound
    assert duration_ms - timestamps.max() <= 50 + 80  # and cover it up to the last full patch column
    assert torch.isfinite(embeddings).all()
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (n_sounds, BANDS * 32) and scene.dtype == torch.float32
    torch.testing.assert_close(scene, embeddings.mean(dim=1))


def test_embeddings_are_deterministic_and_batch_independent(checkpoint_path):
    model = hear.load_model(str(checkpoint_path[0]))
    model.train()  # the API must still give eval-mode, deterministic embeddings
    audio = noise(3, 40_000, seed=1)
    first, _ = hear.get_timestamp_embeddings(audio, model)
    second, _ = hear.get_timestamp_embeddings(audio, model)
    assert torch.equal(first, second)
    alone, _ = hear.get_timestamp_embeddings(audio[1:2], model)
    torch.testing.assert_close(alone[0], first[1], rtol=1e-4, atol=1e-5)


def test_one_window_equals_the_encoder_directly(checkpoint_path):
    """A timestamp is one column of patches: its bands side by side (``bands``) or their mean."""
    audio = noise(2, 400 + 127 * 160, seed=2)  # exactly 128 frames: one window
    bands_model = hear.load_model(str(checkpoint_path[0]))
    features = hear.model_inputs(audio, bands_model)
    with torch.no_grad():
        tokens = bands_model.encoder(features)[:, 1:].reshape(2, BANDS, 29, 32)  # (sound, band, column, D)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, bands_model)
    for band in range(BANDS):
        torch.testing.assert_close(embeddings[..., band * 32 : (band + 1) * 32], tokens[:, band])
    torch.testing.assert_close(hear.get_scene_embeddings(audio, bands_model).reshape(2, BANDS, 32), tokens.mean(dim=2))
    means, _ = hear.get_timestamp_embeddings(audio, hear.load_model(str(checkpoint_path[0]), pooling="mean"))
    torch.testing.assert_close(means, tokens.mean(dim=1))
    assert timestamps[0, :3].tolist() == [80.0, 120.0, 160.0]


def test_official_checkpoint_gives_the_same_embeddings(checkpoint_path, tmp_path):
    path, pretrain_model = checkpoint_path
    official = tmp_path / "ssamba_official.pth"
    torch.save(official_layout(pretrain_model), official)
    audio = noise(2, 30_000, seed=3)
    ours = hear.get_scene_embeddings(audio, hear.load_model(str(path)))
    theirs = hear.get_scene_embeddings(audio, hear.load_model(str(official)))
    torch.testing.assert_close(ours, theirs)


def test_an_encoder_of_64_mel_bins_gets_64_mel_fbanks(tmp_path):
    torch.manual_seed(0)
    grid = PatchGrid(num_mel_bins=64, target_length=128)
    config = EncoderConfig(embed_dim=16, depth=2, grid=grid)
    save_checkpoint(tmp_path / "mel64.pt", SSAMBAEncoder(config), config)
    model = hear.load_model(str(tmp_path / "mel64.pt"))
    audio = noise(1, 16_000)
    assert model.fbank_config.num_mel_bins == 64 and hear.model_inputs(audio, model).shape[-1] == 64
    assert hear.get_scene_embeddings(audio, model).shape == (1, grid.freq_patches * 16)
