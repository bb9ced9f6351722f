"""Mixer, encoder, pretraining, fine-tuning and the SSAST baseline."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from ssamba import fastpath
from ssamba import (
    AudioClassifier, ClassifierConfig, EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder,
    SSAMBAPretrainModel, SSASTConfig, SSASTEncoder, adapt_encoder_state, adapt_pos_embed,
)
from ssamba.mixer import BiMambaMixer
from ssamba.ops.selective_scan import selective_scan_reference
from ssamba.pretrain import cluster_mask_indices, info_nce, mask_count, patchify, random_mask_indices, sample_masks

SMALL_GRID = PatchGrid(num_mel_bins=32, target_length=64)  # 2 × 4 = 8 patches


def small_config(**overrides) -> EncoderConfig:
    return EncoderConfig(**{"embed_dim": 16, "depth": 4, "grid": SMALL_GRID, **overrides})


# ---------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size,expected", [("tiny", 6_922_176), ("small", 25_345_920), ("base", 96_698_112)])
def test_encoder_parameter_counts_at_the_pretraining_grid(size, expected):
    encoder = SSAMBAEncoder(EncoderConfig.from_size(size))
    assert sum(p.numel() for p in encoder.parameters()) == expected


def test_grid_geometry():
    assert PatchGrid().num_patches == 512 and (PatchGrid().freq_patches, PatchGrid().time_patches) == (8, 64)
    finetune = PatchGrid(target_length=512, fstride=10, tstride=10)
    assert (finetune.freq_patches, finetune.time_patches) == (12, 50)
    frames = PatchGrid(fshape=128, tshape=2, fstride=128, tstride=2)
    assert frames.num_patches == 512


# ---------------------------------------------------------------------------------------- mixer


def mixer_reference(mixer: BiMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """bimamba v2 written out directly from docs/model.md#mixer, with F.conv1d and the sequential scan."""
    m = mixer.double()
    hidden = hidden.double()
    x, z = (hidden @ m.in_proj.weight.T).transpose(1, 2).chunk(2, dim=1)
    L = x.shape[-1]

    def direction(x, z, conv, x_proj, dt_proj, A_log, D):
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :L])
        dbc = x.transpose(1, 2) @ x_proj.weight.T
        dt, B, C = dbc.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.softplus(dt @ dt_proj.weight.T + dt_proj.bias).transpose(1, 2)
        return selective_scan_reference(x, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z)

    forward = direction(x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    backward = direction(x.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b).flip(-1)
    return ((forward + backward) / 2).transpose(1, 2) @ m.out_proj.weight.T


def test_mixer_matches_spec_reference():
    torch.manual_seed(0)
    mixer = BiMambaMixer(d_model=24)
    hidden = torch.randn(2, 37, 24)
    out = mixer(hidden)
    expected = mixer_reference(mixer, hidden)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_mixer_backward_branch_reads_the_future():
    torch.manual_seed(0)
    mixer = BiMambaMixer(d_model=8)
    hidden = torch.randn(1, 10, 8)
    changed = hidden.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(mixer(hidden)[:, 0], mixer(changed)[:, 0])


def test_mixer_initialisation_quirks():
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=SMALL_GRID))
    mixer = encoder.layers[0].mixer
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1, 17.0).repeat(64, 1))
    assert torch.equal(mixer.D, torch.ones(64)) and torch.equal(mixer.D_b, torch.ones(64))
    dt_forward = F.softplus(mixer.dt_proj.bias)
    assert dt_forward.min() >= 1e-4 and dt_forward.max() <= 0.1 + 1e-6
    assert torch.equal(mixer.dt_proj_b.bias, torch.zeros(64))  # zeroed: backward Δ starts at softplus(0)
    bound = 1 / math.sqrt(64) / math.sqrt(2)  # kaiming-uniform(a=√5) bound, then ÷ √depth
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.8 * bound


# ---------------------------------------------------------------------------------------- encoder


def test_flip_pairs_double_the_residual_each_pair():
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(small_config(depth=6)).eval()
    for block in encoder.layers:
        torch.nn.init.zeros_(block.mixer.out_proj.weight)  # every mixer outputs 0
    x = torch.randn(2, 9, 16)
    hidden, residual = encoder._run_flip_pairs(x)
    assert torch.equal(hidden, torch.zeros_like(x))
    torch.testing.assert_close(residual, 8 * x)  # 2 ** (6 / 2)
    _, residual = SSAMBAEncoder(small_config(depth=6, topology="sequential"))._run_sequential(x)
    assert residual.shape == x.shape


def test_flip_pairs_match_an_explicit_unrolled_loop():
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(small_config()).eval()
    features = torch.randn(2, 64, 32)
    b = encoder.layers
    h = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(features)], 1) + encoder.pos_embed
    h0f, r0f = b[0].mixer(b[0].norm(h)), h
    h0b, r0b = b[1].mixer(b[1].norm(h.flip(1))), h.flip(1)
    h1, r1 = h0f + h0b.flip(1), r0f + r0b.flip(1)
    r2f = r1 + h1
    r2b = r1.flip(1) + h1.flip(1)
    h2 = b[2].mixer(b[2].norm(r2f)) + b[3].mixer(b[3].norm(r2b)).flip(1)
    r2 = r2f + r2b.flip(1)
    expected = encoder.norm_f(encoder.norm_f(r2 + h2))
    torch.testing.assert_close(encoder(features), expected)


def _run_with_lean(encoder: SSAMBAEncoder, features: torch.Tensor, lean: bool) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and parameter gradients of one forward/backward, same random draws."""
    fastpath.set_lean_forward(lean)
    try:
        torch.manual_seed(1)
        features = features.clone().requires_grad_()
        out = encoder(features)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = (features.grad, *(p.grad.clone() for p in encoder.parameters()))
        encoder.zero_grad()
        return (out.detach(), *grads)
    finally:
        fastpath.set_lean_forward(None)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_lean_forward_matches_the_reference(training, norm):
    """The lean forward (the default on CUDA) against the reference forward: float64 to rounding,
    float32 within 1e-5 of the output, with drop-path active in training (same random draws)."""
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        torch.manual_seed(0)
        encoder = SSAMBAEncoder(small_config(embed_dim=32, depth=6, norm=norm, drop_path_rate=0.5)).to(dtype)
        encoder.train(training)
        features = torch.randn(3, 64, 32, dtype=dtype)
        reference, lean = _run_with_lean(encoder, features, False), _run_with_lean(encoder, features, True)
        out_error = ((lean[0] - reference[0]).norm() / reference[0].norm()).item()
        assert out_error <= tolerance, (dtype, out_error)
        for got, want in zip(lean[1:], reference[1:]):  # gradients: tiny ones are dominated by rounding
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item() + 1e-30)


def test_lean_mixer_reversed_equals_the_flipped_mixer():
    torch.manual_seed(0)
    mixer = BiMambaMixer(16).double()
    hidden = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mixer.forward_lean(hidden), mixer(hidden))
        torch.testing.assert_close(mixer.forward_lean(hidden, reverse=True), mixer(hidden.flip(1)).flip(1))


def test_frequency_major_token_order():
    encoder = SSAMBAEncoder(small_config())
    features = torch.zeros(1, 64, 32)
    features[0, 16:32, 0:16] = 1.0  # time patch 1, lowest frequency band
    with torch.no_grad():
        encoder.patch_embed.proj.weight.fill_(1.0)
        encoder.patch_embed.proj.bias.zero_()
    tokens = encoder.embed_patches(features)[0, :, 0]
    assert tokens.nonzero().flatten().tolist() == [1]  # f·T' + t = 0·4 + 1


def test_drop_path_schedule_matches_vim():
    rates = SSAMBAEncoder.drop_path_schedule(24, 0.1)
    assert len(rates) == 24 and rates[:2] == [0.0, 0.0]
    assert rates[5] == pytest.approx(0.1 * 4 / 23) and rates[-1] == pytest.approx(0.1 * 22 / 23)


def test_eval_mode_is_deterministic_and_training_drops_paths():
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(small_config(drop_path_rate=0.5))
    features = torch.randn(4, 64, 32)
    encoder.eval()
    assert torch.equal(encoder(features), encoder(features))
    encoder.train()
    assert not torch.equal(encoder(features), encoder(features))


def test_rmsnorm_option():
    encoder = SSAMBAEncoder(small_config(norm="rmsnorm"))
    assert "layers.0.norm.bias" not in encoder.state_dict()
    with pytest.raises(ValueError, match="norm"):
        small_config(norm="batchnorm")


# ---------------------------------------------------------------------------------------- masking


def test_cluster_masking_behaviour():
    rng = random.Random(0)
    rows = torch.zeros(8)
    for _ in range(300):
        mask = cluster_mask_indices(512, 400, 64, rng)
        assert len(mask) == 400 and len(set(mask.tolist())) == 400
        assert mask.min() >= 1 and mask.max() < 512  # patch 0 never masked
        assert torch.equal(mask, mask.sort().values)
        rows += torch.bincount(mask // 64, minlength=8).float() / 64
    rows /= 300
    # Strongly non-uniform over frequency rows: the lowest band is masked least (docs/model.md#masking: ≈ 0.41).
    assert rows[0] < 0.5 and rows[3:7].min() > 0.8 and rows[7] < rows[5]


def test_cluster_masks_are_made_of_squares():
    rng = random.Random(1)
    mask = set(cluster_mask_indices(512, 30, 64, rng).tolist())
    # Each masked patch has a masked neighbour to its right/left or above/below (clusters are ≥ 3×3).
    assert all({p - 1, p + 1, p - 64, p + 64} & mask for p in mask)


def test_random_masking_and_counts():
    mask = random_mask_indices(512, 300, random.Random(0))
    assert len(set(mask.tolist())) == 300
    assert mask_count(512, mask_ratio=0.75) == 384 and mask_count(512, mask_patches=250) == 250
    for bad in (dict(), dict(mask_patches=10, mask_ratio=0.5), dict(mask_patches=512), dict(mask_ratio=1.0)):
        with pytest.raises(ValueError):
            mask_count(512, **bad)
    # The config checks what it can without a grid when built, the rest against the grid.
    assert PretrainConfig(mask_patches=None, mask_ratio=0.5).num_masked(512) == 256
    for bad in (dict(mask_ratio=0.5), dict(mask_patches=None), dict(mask_patches=0), dict(mask_patches=None, mask_ratio=0.0)):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)
    with pytest.raises(ValueError, match="cannot mask 512 of 512 patches"):
        PretrainConfig(mask_patches=512).num_masked(512)
    frames = sample_masks(PatchGrid(fshape=128, tshape=2, fstride=128, tstride=2), 2, 10, random.Random(0))
    assert frames.shape == (2, 10)


def test_masks_are_reproducible_from_the_seed():
    assert torch.equal(sample_masks(PatchGrid(), 3, 250, random.Random(7)), sample_masks(PatchGrid(), 3, 250, random.Random(7)))


# ---------------------------------------------------------------------------------------- objectives


def test_info_nce_hand_computed():
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    predictions = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    # S = X·Pᵀ = [[2, 1], [0, 0]]; log-softmax rows: row0 [−log(1+e^−1), ...], row1 [−log 2, −log 2].
    loss, accuracy = info_nce(targets, predictions)
    expected = -(-math.log(1 + math.exp(-1)) - math.log(2)) / 2
    assert loss.item() == pytest.approx(expected)
    # Row-softmax: [[0.731, 0.269], [0.5, 0.5]]; column argmax over rows: [0, 1] → both correct.
    assert accuracy.item() == 1.0
    _, accuracy = info_nce(targets, torch.tensor([[[0.0, 0.0], [3.0, 0.0]]]))
    # S = [[0, 3], [0, 0]] → softmax rows [[.047, .953], [.5, .5]]: column 0 argmax row 1 (wrong), column 1 row 0 (wrong).
    assert accuracy.item() == 0.0


def test_info_nce_is_per_clip():
    targets, predictions = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    per_clip = torch.stack([info_nce(targets[i : i + 1], predictions[i : i + 1])[0] for i in range(3)])
    assert info_nce(targets, predictions)[0].item() == pytest.approx(per_clip.mean().item(), rel=1e-6)


def test_patchify_is_frequency_major_raw_patches():
    features = torch.arange(64 * 32.0).reshape(1, 64, 32)  # (frames, mel)
    patches = patchify(features, SMALL_GRID)
    assert patches.shape == (1, 8, 256)
    # Token 1 = lowest band, second time patch; its first value is frame 16, mel 0; next is frame 17.
    assert patches[0, 1, 0] == features[0, 16, 0] and patches[0, 1, 1] == features[0, 17, 0]
    assert patches[0, 1, 16] == features[0, 16, 1]  # then the next mel bin


@pytest.mark.parametrize("two_pass", [True, False])
def test_pretraining_losses_and_every_parameter_gets_a_gradient(two_pass):
    torch.manual_seed(0)
    config = small_config()
    model = SSAMBAPretrainModel(SSAMBAEncoder(config), config.grid, PretrainConfig(mask_patches=4, two_pass=two_pass))
    features = torch.randn(3, 64, 32)
    out = model(features, random.Random(0))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(out.nce.item() + 10 * out.mse.item(), rel=1e-5)
    assert 0.0 <= out.accuracy.item() <= 1.0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_mse_is_against_the_masked_raw_patches():
    torch.manual_seed(0)
    config = small_config()
    model = SSAMBAPretrainModel(SSAMBAEncoder(config), config.grid, PretrainConfig(mask_patches=3, two_pass=False)).eval()
    features = torch.randn(2, 64, 32)
    out = model(features, random.Random(5))
    masks = sample_masks(config.grid, 2, 3, random.Random(5))
    hidden = model.encode_masked(features, masks)
    targets = torch.stack([patchify(features, config.grid)[i, masks[i]] for i in range(2)])
    assert out.mse.item() == pytest.approx(((model.gpredlayer(hidden) - targets) ** 2).mean().item(), rel=1e-5)


def test_masked_tokens_are_replaced_by_the_mask_embedding():
    config = small_config()
    model = SSAMBAPretrainModel(SSAMBAEncoder(config).eval(), config.grid, PretrainConfig(mask_patches=3))
    masks = torch.tensor([[1, 2, 5]])
    a = torch.randn(1, 64, 32)
    b = a.clone()
    b[:, 16:32, :16] += 1.0  # patch 1 (lowest band, second time patch): masked, so invisible
    torch.testing.assert_close(model.encode_masked(a, masks), model.encode_masked(b, masks))
    b[:, 48:64, :16] += 1.0  # patch 3: visible
    assert not torch.allclose(model.encode_masked(a, masks), model.encode_masked(b, masks))


def test_reconstruction_keeps_visible_patches():
    config = small_config()
    model = SSAMBAPretrainModel(SSAMBAEncoder(config), config.grid, PretrainConfig(mask_patches=4))
    features = torch.randn(2, 64, 32)
    reconstruction, mask = model.reconstruct(features, random.Random(0))
    assert reconstruction.shape == mask.shape == features.shape
    assert torch.equal(reconstruction[mask == 0], features[mask == 0])
    assert mask.sum() == 2 * 4 * 256


def test_pretraining_rejects_overlapping_patches():
    grid = PatchGrid(num_mel_bins=32, target_length=64, fstride=10, tstride=10)
    with pytest.raises(ValueError, match="overlap"):
        SSAMBAPretrainModel(SSAMBAEncoder(small_config(grid=grid)), grid)


# ---------------------------------------------------------------------------------------- fine-tuning


def test_pos_embed_adaptation_crop_and_interpolate():
    source = PatchGrid()  # 8 × 64
    pos = torch.randn(1, 513, 4)
    grid = pos[:, 1:].transpose(1, 2).reshape(1, 4, 8, 64)
    sc = PatchGrid(target_length=128, fstride=10, tstride=10)  # 12 × 12: crop time 64 → 12, then 8 → 12
    adapted = adapt_pos_embed(pos, source, sc)
    assert adapted.shape == (1, 145, 4) and torch.equal(adapted[:, 0], pos[:, 0])
    cropped = grid[..., 26:38]
    expected = F.interpolate(cropped, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapted[:, 1:], expected.reshape(1, 4, -1).transpose(1, 2))
    assert torch.equal(adapt_pos_embed(pos, source, source), pos)


def test_finetune_classifier_from_pretrained_state():
    torch.manual_seed(0)
    pretrain_config = small_config()
    pretrained = SSAMBAEncoder(pretrain_config)
    target = PatchGrid(num_mel_bins=32, target_length=48, fstride=10, tstride=10)
    encoder = SSAMBAEncoder(pretrain_config.with_grid(target))
    encoder.load_state_dict(adapt_encoder_state(pretrained.state_dict(), pretrain_config.grid, target))
    assert torch.equal(encoder.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)
    model = AudioClassifier(encoder, ClassifierConfig(num_classes=5)).eval()
    features = torch.randn(3, 48, 32)
    assert model(features).shape == (3, 5)
    encoded = encoder(features)
    torch.testing.assert_close(model.embed(features), encoded[:, 1:].mean(1))
    cls_model = AudioClassifier(encoder, ClassifierConfig(num_classes=5, pooling="cls")).eval()
    torch.testing.assert_close(cls_model.embed(features), encoded[:, 0])


def test_linear_probe_trains_only_the_head():
    model = AudioClassifier(SSAMBAEncoder(small_config()), ClassifierConfig(num_classes=3, freeze_encoder=True))
    model.train()
    assert not model.encoder.training
    F.cross_entropy(model(torch.randn(2, 64, 32)), torch.tensor([0, 2])).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.mlp_head.parameters())


# ---------------------------------------------------------------------------------------- SSAST


def test_ssast_eager_and_sdpa_agree_and_pretrain():
    torch.manual_seed(0)
    eager = SSASTEncoder(SSASTConfig(embed_dim=32, num_heads=4, depth=2, grid=SMALL_GRID)).eval()
    sdpa = SSASTEncoder(SSASTConfig(embed_dim=32, num_heads=4, depth=2, grid=SMALL_GRID, attention="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    features = torch.randn(2, 64, 32)
    torch.testing.assert_close(eager(features), sdpa(features), rtol=1e-5, atol=1e-5)
    assert eager(features).shape == (2, 10, 32)
    model = SSAMBAPretrainModel(eager.train(), SMALL_GRID, PretrainConfig(mask_patches=3))
    model(features, random.Random(0)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    probe = AudioClassifier(eager, ClassifierConfig(num_classes=2)).eval()
    torch.testing.assert_close(probe.embed(features), eager(features)[:, 2:].mean(1))


@pytest.mark.parametrize("size,millions", [("tiny", 5.6), ("small", 21.9), ("base", 86.0)])
def test_ssast_sizes(size, millions):
    encoder = SSASTEncoder(SSASTConfig.from_size(size))
    assert sum(p.numel() for p in encoder.parameters()) / 1e6 == pytest.approx(millions, rel=0.03)
