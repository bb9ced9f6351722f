"""Our checkpoint format and the import of official SSAMBA checkpoints (docs/model.md#official-checkpoints)."""

import io
import random

import pytest
import torch

from ssamba import (
    EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel,
    import_official_checkpoint, load_checkpoint, save_checkpoint,
)

from support.checkpoints import official_layout

GRID = PatchGrid(num_mel_bins=32, target_length=64)


def pretrain_model(norm: str = "layernorm") -> SSAMBAPretrainModel:
    torch.manual_seed(0)
    config = EncoderConfig(embed_dim=16, depth=4, grid=GRID, norm=norm)
    return SSAMBAPretrainModel(SSAMBAEncoder(config), GRID, PretrainConfig(mask_patches=3)).eval()


def test_roundtrip_of_our_checkpoint_with_weights_only_loading():
    model = pretrain_model()
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, model.encoder.config, model.config, metadata={"step": 7})
    checkpoint = load_checkpoint(buffer.getvalue())
    assert checkpoint.encoder_config == model.encoder.config and checkpoint.metadata == {"step": 7}
    restored = checkpoint.build_pretrain_model().eval()
    features = torch.randn(2, 64, 32)
    torch.testing.assert_close(restored.encoder(features), model.encoder(features))
    torch.testing.assert_close(checkpoint.build_encoder().eval()(features), model.encoder(features))
    # The file is plain tensors and primitives: torch.load(weights_only=True) must accept it.
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_load_rejects_foreign_files():
    buffer = io.BytesIO()
    torch.save({"module.v.pos_embed": torch.zeros(1)}, buffer)
    with pytest.raises(ValueError, match="import_official_checkpoint"):
        load_checkpoint(buffer.getvalue())


def test_official_checkpoint_loads_completely_and_reproduces_outputs(tmp_path):
    model = pretrain_model()
    path = tmp_path / "ssamba_tiny_400.pth"
    torch.save(official_layout(model), path)
    imported = import_official_checkpoint(path)
    assert imported.dropped_keys == ["p_input_fdim", "p_input_tdim", "v.head.bias", "v.head.weight"]
    assert imported.encoder_config == model.encoder.config
    restored = imported.build_pretrain_model(PretrainConfig(mask_patches=3)).eval()
    features = torch.randn(2, 64, 32)
    torch.testing.assert_close(restored.encoder(features), model.encoder(features))
    a, b = restored(features, random.Random(1)), model(features, random.Random(1))
    torch.testing.assert_close(a.loss, b.loss)


def test_official_import_detects_norm_type():
    rms = import_official_checkpoint(official_layout(pretrain_model(norm="rmsnorm")))
    assert rms.encoder_config.norm == "rmsnorm"
    with pytest.raises(ValueError, match="rmsnorm but layernorm was expected"):
        import_official_checkpoint(official_layout(pretrain_model(norm="rmsnorm")), expected_norm="layernorm")


def test_official_import_refuses_incomplete_or_unknown_weights():
    state = official_layout(pretrain_model())
    del state["module.v.layers.3.mixer.D_b"]
    with pytest.raises(RuntimeError, match="D_b"):
        import_official_checkpoint(state).build_encoder()
    state = official_layout(pretrain_model())
    state["module.something_new"] = torch.zeros(1)
    with pytest.raises(ValueError, match="something_new"):
        import_official_checkpoint(state)


def test_official_finetuned_grid_must_be_given():
    state = official_layout(pretrain_model())
    with pytest.raises(ValueError, match="pass the checkpoint's grid"):
        import_official_checkpoint(state, grid=PatchGrid(num_mel_bins=32, target_length=64, fstride=10, tstride=10))
