"""The teacher-student objective (docs/model.md#teacher-student-objective) and the encoder stages it uses."""

import io
import random

import pytest
import torch
import torch.nn.functional as F

from ssamba import fastpath
from ssamba import (
    EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBATeacherStudentModel, TeacherStudentConfig,
    load_checkpoint, save_checkpoint, tokens_per_clip,
)
from ssamba.encoder import drop_path
from ssamba.teacher_student import average_targets, inverse_block_mask, masked_patches, sample_visible

GRID = PatchGrid(num_mel_bins=64, target_length=128)  # 4 × 8 = 32 patches
CONFIG = TeacherStudentConfig(block_size=2, decoder_dim=32)  # 26 masked, 6 visible per view


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_encoder(seed: int = 0, **overrides) -> SSAMBAEncoder:
    torch.manual_seed(seed)
    return SSAMBAEncoder(EncoderConfig(**{"embed_dim": 32, "depth": 4, "grid": GRID, **overrides}))


def tiny_model(seed: int = 0, config: TeacherStudentConfig = CONFIG, **overrides) -> SSAMBATeacherStudentModel:
    return SSAMBATeacherStudentModel(tiny_encoder(seed, **overrides), GRID, config)


def features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, GRID.target_length, GRID.num_mel_bins, generator=torch.Generator().manual_seed(seed))


def perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


# ---------------------------------------------------------------------------------------- encoder stages


@pytest.mark.parametrize("training", [False, True])
def test_encoder_forward_is_unchanged_and_equals_the_stagewise_path(training):
    """forward() against the pre-refactor body of forward_tokens, written out, and against the stages."""
    encoder = tiny_encoder(drop_path_rate=0.5).train(training)
    x = features()

    def reference() -> torch.Tensor:
        tokens = encoder.patch_embed(x)
        hidden = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + encoder.pos_embed
        hidden, residual = encoder._run_flip_pairs(hidden)
        residual = residual + drop_path(hidden, encoder.config.drop_path_rate, encoder.training)
        return encoder.norm_f(encoder.norm_f(residual))

    outputs = []
    for run in (lambda: encoder(x), reference, lambda: encoder.encode_sequence(encoder.add_positions(encoder.embed_patches(x)))):
        torch.manual_seed(3)  # the same drop-path draws
        outputs.append(run())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("lean", [False, True])
def test_stage_outputs_are_each_flip_pairs_mixer_outputs(lean):
    encoder = tiny_encoder().eval()
    assert encoder.num_stages == 2 and tiny_encoder(topology="sequential").num_stages == 4
    b = encoder.layers
    with torch.no_grad():
        h = encoder.add_positions(encoder.embed_patches(features()))
        stage0 = b[0].mixer(b[0].norm(h)) + b[1].mixer(b[1].norm(h.flip(1))).flip(1)
        residual = h + h + stage0
        stage1 = b[2].mixer(b[2].norm(residual)) + b[3].mixer(b[3].norm(residual.flip(1))).flip(1)
        fastpath.set_lean_forward(lean)
        try:
            both, last = encoder.stage_outputs(h, 2), encoder.stage_outputs(h, 1)
        finally:
            fastpath.set_lean_forward(None)
    torch.testing.assert_close(both[0], stage0)
    torch.testing.assert_close(both[1], stage1)
    assert len(last) == 1 and torch.equal(last[0], both[1])


def test_targets_are_normalised_per_stage_then_per_patch():
    stages = [torch.randn(2, 9, 8), torch.randn(2, 9, 8)]
    targets = average_targets(stages, num_prefix_tokens=1)
    assert targets.shape == (2, 8, 8) and targets.dtype == torch.float32
    normed = [(s[:, 1:] - s[:, 1:].mean(1, keepdim=True)) / (s[:, 1:].var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
              for s in stages]
    torch.testing.assert_close(targets, F.layer_norm((normed[0] + normed[1]) / 2, (8,)), rtol=1e-5, atol=1e-5)
    # Scale-free per stage: a stage's magnitude cannot dominate the average.
    torch.testing.assert_close(average_targets([1000 * stages[0], stages[1]], 1), targets, rtol=1e-4, atol=1e-4)


def test_layer_normalised_targets_keep_what_the_clips_patches_share():
    stages = [torch.randn(2, 9, 8, dtype=torch.float64) for _ in range(2)]
    shared = torch.randn(2, 1, 8, dtype=torch.float64)  # a per-clip offset every patch carries
    stages = [stage + 3 * shared for stage in stages]
    targets = average_targets([s.float() for s in stages], num_prefix_tokens=1, norm="layer")
    normed = [(s[:, 1:] - s[:, 1:].mean(2, keepdim=True)) / (s[:, 1:].var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()
              for s in stages]  # float64, per patch over the features
    mean = (normed[0] + normed[1]) / 2
    expected = (mean - mean.mean(2, keepdim=True)) / (mean.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(targets, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(average_targets([1000 * stages[0].float(), stages[1].float()], 1, "layer"), targets,
                               rtol=1e-4, atol=1e-4)
    # The clip-level offset survives as the utterance target; instance norm removes it.
    utterance = targets.mean(1)
    assert torch.nn.functional.cosine_similarity(utterance, shared[:, 0].float()).min() > 0.8
    assert average_targets([s.float() for s in stages], 1, "instance").mean(1).abs().max() < utterance.abs().max() / 4


# ---------------------------------------------------------------------------------------- masking


def patches_outside_full_blocks(visible: set[int], grid: PatchGrid, size: int) -> int:
    rows, cols = grid.freq_patches, grid.time_patches
    covered: set[int] = set()
    for top in range(rows - size + 1):
        for left in range(cols - size + 1):
            block = {(top + i) * cols + left + j for i in range(size) for j in range(size)}
            if block <= visible:
                covered |= block
    return len(visible - covered)


def test_inverse_block_masking_at_the_paper_grid():
    grid, config = PatchGrid(), TeacherStudentConfig()
    visible_count = config.num_visible(grid.num_patches)
    assert visible_count == 102  # 512 − round(0.8 · 512)
    assert abs(visible_count / grid.num_patches - (1 - config.mask_ratio)) <= 1 / grid.num_patches
    rng = random.Random(0)
    for _ in range(50):
        visible = inverse_block_mask(grid, visible_count, config.block_size, rng)
        assert len(set(visible.tolist())) == visible_count and torch.equal(visible, visible.sort().values)
        assert 0 <= visible.min() and visible.max() < grid.num_patches
        # Grown from full 3×3 blocks: only the last, cut-short block may leave patches outside one.
        assert patches_outside_full_blocks(set(visible.tolist()), grid, config.block_size) <= config.block_size**2 - 1
    draw = lambda seed: sample_visible(grid, 4, visible_count, 3, random.Random(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))


def test_masked_patches_are_the_complement_and_frame_grids_work():
    frames = PatchGrid(fshape=128, tshape=2, fstride=128, tstride=2)  # one row of 512 frame tokens
    visible = sample_visible(frames, 3, 100, 3, random.Random(0))
    masked = masked_patches(visible, frames.num_patches)
    assert masked.shape == (3, 412)
    for row_visible, row_masked in zip(visible.tolist(), masked.tolist()):
        assert sorted(row_visible + row_masked) == list(range(512)) and row_masked == sorted(row_masked)


# ---------------------------------------------------------------------------------------- model


def test_teacher_gets_no_gradients_and_every_student_parameter_does():
    model = tiny_model().train()
    assert not model.teacher.training and model.encoder.training  # train() keeps the teacher in eval mode
    model(features(), random.Random(0)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    trainable = dict(model.named_parameters())
    assert not any(name.startswith("teacher.") and p.requires_grad for name, p in trainable.items())
    no_grad = [n for n, p in trainable.items() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


@pytest.mark.parametrize("clones", [1, 3])
def test_student_sees_only_visible_patches_and_the_teacher_runs_once(clones):
    model = tiny_model(config=TeacherStudentConfig(clones=clones, block_size=2, decoder_dim=32))
    shapes, teacher_calls = [], []
    model.encoder.layers[0].register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    model.teacher.patch_embed.register_forward_hook(lambda *_: teacher_calls.append("embed"))
    model.teacher.layers[0].register_forward_hook(lambda *_: teacher_calls.append("block"))
    model(features(batch=2), random.Random(0))
    assert shapes == [torch.Size([2 * clones, model.num_visible + 1, 32])] and model.num_visible == 6
    assert teacher_calls == ["embed", "block"]  # one teacher pass per model forward, whatever the clones


def test_student_output_ignores_masked_patches():
    model = tiny_model().eval()
    visible = torch.tensor([[0, 1, 2, 8, 9, 10]])  # a 2 × 3 visible area at the grid's start
    clip = torch.zeros(1, dtype=torch.long)
    a = features(batch=1)
    b = a.clone()
    b[:, 112:128, 48:64] += 1.0  # the last patch (top band, last time step): masked
    torch.testing.assert_close(model.encode_visible(a, visible, clip), model.encode_visible(b, visible, clip))
    b[:, 0:16, 0:16] += 1.0  # patch 0: visible
    assert not torch.allclose(model.encode_visible(a, visible, clip), model.encode_visible(b, visible, clip))


def test_reconstruction_term_scores_the_masked_fbank_patches():
    """The optional reconstruction MSE, against the patches cut out of the fbank by hand in float64."""
    config = TeacherStudentConfig(clones=2, block_size=2, decoder_dim=32, reconstruction_weight=0.5)
    model = tiny_model(config=config).train()
    decoded = []
    model.decoder.register_forward_hook(lambda module, args, output: decoded.append(output))
    x = features(batch=2)
    out = model(x, random.Random(0))
    out.loss.backward()

    visible = sample_visible(GRID, 4, model.num_visible, config.block_size, random.Random(0))  # the forward's draw
    reconstructed = decoded[0][1].detach().double()
    errors = []
    for row, row_visible in enumerate(visible.tolist()):
        clip = x[row // config.clones].double()
        for patch in sorted(set(range(GRID.num_patches)) - set(row_visible)):
            band, column = divmod(patch, GRID.time_patches)
            frames = slice(column * GRID.tshape, (column + 1) * GRID.tshape)
            bins = slice(band * GRID.fshape, (band + 1) * GRID.fshape)
            expected = clip[frames, bins].T.flatten()  # (mel, frames), frequency-major like the patch embedding
            errors.append((reconstructed[row, patch] - expected).pow(2).mean())
    assert out.reconstruction_mse.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(
        out.frame_mse.item() + out.utterance_mse.item() + 0.5 * out.reconstruction_mse.item(), rel=1e-6)
    assert model.decoder.project_patches.weight.grad.abs().sum() > 0

    plain = tiny_model()  # weight 0, the default: EAT's objective, and the state dict of earlier checkpoints
    assert plain.decoder.project_patches is None and plain(x, random.Random(0)).reconstruction_mse is None
    assert set(model.state_dict()) - set(plain.state_dict()) == {"decoder.project_patches.weight",
                                                                 "decoder.project_patches.bias"}


def test_ema_schedule_and_exact_update():
    config = TeacherStudentConfig(ema_decay_start=0.99, ema_decay_end=0.999, ema_anneal_steps=100, block_size=2, decoder_dim=32)
    assert config.ema_decay(0) == 0.99 and config.ema_decay(50) == pytest.approx(0.9945, abs=1e-12)
    assert config.ema_decay(100) == 0.999 and config.ema_decay(10**6) == 0.999
    assert TeacherStudentConfig(ema_anneal_steps=0).ema_decay(0) == TeacherStudentConfig().ema_decay_end
    model = tiny_model(config=config)
    model.encoder.register_buffer("probe", torch.arange(3.0))
    model.teacher.register_buffer("probe", torch.zeros(3))
    perturb(model.encoder, seed=5)
    teacher = [p.detach().double().clone() for p in model.teacher.parameters()]
    student = [p.detach().double().clone() for p in model.encoder.parameters()]
    decay = model.update_teacher(50)
    assert decay == config.ema_decay(50)
    for got, t, s in zip(model.teacher.parameters(), teacher, student, strict=True):
        torch.testing.assert_close(got.double(), decay * t + (1 - decay) * s, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.teacher.probe, torch.arange(3.0))


def test_state_dict_and_checkpoint_restore_the_teacher():
    model = tiny_model(seed=0)
    perturb(model.encoder, seed=2)
    model.update_teacher(0)  # now teacher ≠ student ≠ a fresh model's
    x = features()
    expected = model.teacher_targets(x)
    fresh = tiny_model(seed=9)
    assert not torch.equal(fresh.teacher_targets(x), expected)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.teacher_targets(x), expected)

    buffer = io.BytesIO()
    save_checkpoint(buffer, model, model.encoder.config, model.config, metadata={"step": 1})
    checkpoint = load_checkpoint(buffer.getvalue())
    assert checkpoint.pretrain_config == model.config
    restored = checkpoint.build_pretrain_model()
    assert isinstance(restored, SSAMBATeacherStudentModel) and torch.equal(restored.teacher_targets(x), expected)
    # The student is a plain encoder, loaded like one from any checkpoint.
    assert set(checkpoint.encoder_state()) == set(SSAMBAEncoder(model.encoder.config).state_dict())
    assert torch.equal(checkpoint.build_encoder().eval()(x), model.encoder.eval()(x))


def test_a_few_steps_reduce_the_loss():
    model = tiny_model(drop_path_rate=0.0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = features(batch=4)
    losses = []
    for step in range(8):
        out = model(x, random.Random(0))  # the same masks every step
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(step)
        losses.append(out.loss.item())
    assert out.loss.item() == pytest.approx(out.frame_mse.item() + out.utterance_mse.item(), rel=1e-6)
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_config_validation():
    for bad in (dict(mask_ratio=1.0), dict(clones=0), dict(block_size=0), dict(top_k_blocks=0),
                dict(ema_decay_start=0.9999, ema_decay_end=0.999), dict(decoder_dim=40), dict(utterance_weight=-1.0),
                dict(reconstruction_weight=-0.1),
                dict(target_norm="batch")):
        with pytest.raises(ValueError):
            TeacherStudentConfig(**bad)
    assert tiny_model(config=TeacherStudentConfig(top_k_blocks=8, decoder_dim=32)).top_k == 2  # capped at the stages
    with pytest.raises(ValueError, match="overlap"):
        grid = PatchGrid(num_mel_bins=64, target_length=128, fstride=10, tstride=10)
        SSAMBATeacherStudentModel(SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=grid)), grid)


# ---------------------------------------------------------------------------------------- cost


def test_token_accounting_at_the_paper_grid():
    """Encoder tokens per clip per step at 512 patches with the defaults. The student's share is far
    below the two-pass objective's, but the teacher's one full pass alone is half of it, so the total
    cannot drop below 1/2 whatever clones and mask_ratio are (docs/model.md#teacher-student-objective)."""
    two_pass = tokens_per_clip(PretrainConfig(), 512)
    assert (two_pass.student, two_pass.teacher, two_pass.total) == (1026, 0, 1026)
    assert tokens_per_clip(PretrainConfig(two_pass=False), 512).total == 513
    ours = tokens_per_clip(TeacherStudentConfig(), 512)
    assert (ours.student, ours.teacher, ours.total) == (4 * 103, 513, 925)
    assert ours.student / two_pass.student < 0.41 and ours.teacher / two_pass.total == 0.5
    # Counting a backward pass as two forwards: 3·412 + 513 = 1749 against 3·1026 = 3078.
    assert ours.forward_equivalents / two_pass.forward_equivalents == pytest.approx(1749 / 3078)
