"""The fine-tuning loop at parity with pretraining: gradient accumulation, clipping, precision and a
configurable seed, run on an in-memory worker (no Ray needed to check the arithmetic)."""

from __future__ import annotations

import torch

from pipeline import finetune
from pipeline.config import FinetuneJobConfig, load_config
from pipeline.training.loop import optimizer_step
from ssamba import AudioClassifier, ClassifierConfig, EncoderConfig, PatchGrid, SSAMBAEncoder
from ssamba.features import crop_or_pad, norm_stats, normalize, waveform_to_fbank

GRID = PatchGrid(target_length=64)


class InMemoryWorker:
    """A single worker whose training split is fixed tensors, batched in order: cropped fbanks, which the
    loop finishes (normalises, augments) as it does the training input's."""

    rank, world_size, node_id, device = 0, 1, "test", torch.device("cpu")

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def dataset(self, name: str) -> InMemoryWorker:
        return self

    def iter_torch_batches(self, batch_size: int, device, drop_last=False, prefetch_batches=1,
                           local_shuffle_buffer_size=None):
        for start in range(0, len(self.features) - (batch_size - 1 if drop_last else 0), batch_size):
            yield {"fbank": self.features[start:start + batch_size], "target": self.targets[start:start + batch_size]}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def restored_state(self) -> None:
        return None


def job(*overrides: str) -> FinetuneJobConfig:
    return load_config(FinetuneJobConfig, None, ["name=loop", "storage_path=/tmp/unused", "task=esc50",
                                                 "data_root=/tmp/unused", "features=/tmp/unused", "target_length=64",
                                                 "shuffle_buffer=0", "optim.lr=0.01", *overrides])


def classifier(seed: int) -> AudioClassifier:
    torch.manual_seed(seed)
    encoder = SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=GRID, drop_path_rate=0.0))
    return AudioClassifier(encoder, ClassifierConfig(2, "mean"))


def one_epoch(config: FinetuneJobConfig, worker: InMemoryWorker) -> tuple[AudioClassifier, float]:
    model = classifier(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    loop = finetune.FinetuneLoop(config, "", "", False, ["a", "b"], False)
    return model, finetune._train_epoch(model, optimizer, loop, worker, 1)


def test_accumulated_micro_batches_take_the_step_of_the_whole_batch():
    torch.manual_seed(1)
    worker = InMemoryWorker(torch.randn(4, 64, 128), torch.eye(2)[torch.tensor([0, 1, 1, 0])])
    whole, whole_loss = one_epoch(job("batch_size=4"), worker)
    accumulated, micro_loss = one_epoch(job("batch_size=2", "grad_accum=2"), worker)
    untouched = classifier(0)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(a, before) for a, before in zip(whole.parameters(), untouched.parameters()))
    assert abs(whole_loss - micro_loss) < 1e-5  # the mean of two halves' means = the mean of the batch

    # A last, shorter accumulation still steps: 3 micro-batches with grad_accum 2 make 2 steps.
    stepped, _ = one_epoch(job("batch_size=1", "grad_accum=2"), InMemoryWorker(worker.features[:3], worker.targets[:3]))
    assert any(not torch.equal(a, b) for a, b in zip(stepped.parameters(), untouched.parameters()))


def test_clipping_bounds_the_gradient_and_the_seed_decides_the_head():
    model = classifier(0)
    model(torch.randn(2, 64, 128)).pow(2).sum().mul(1e6).backward()  # a huge gradient
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() > 10
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0.5)  # the step is -clipped grad
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 0.5 + 1e-4 and all(p.grad is None for p in model.parameters())

    worker = InMemoryWorker(torch.zeros(1, 64, 128), torch.zeros(1, 2))
    heads = {}
    for seed in (0, 0, 5):
        config = job(f"seed={seed}", "model.size=tiny")
        model, _, _, _ = finetune._build(finetune.FinetuneLoop(config, "", "", False, ["a", "b"], False), worker)
        heads.setdefault(seed, []).append(model.mlp_head[-1].weight.detach().clone())
    assert torch.equal(heads[0][0], heads[0][1]) and not torch.equal(heads[0][0], heads[5][0])


def tone_features(pitches: list[float], seed: int, normalised: bool = True) -> torch.Tensor:
    """64-frame fbanks of noisy harmonic tones, one per pitch, normalised or as training reads them."""
    noise = torch.Generator().manual_seed(seed)
    t = torch.arange(int(0.66 * 16_000)) / 16_000
    clips = []
    for f0 in pitches:
        wave = sum((0.3 / k) * torch.sin(2 * torch.pi * f0 * k * t) for k in range(1, 4)) + 0.05 * torch.randn(len(t), generator=noise)
        crop = crop_or_pad(waveform_to_fbank(wave), 64)
        clips.append(normalize(crop, norm_stats("audioset")) if normalised else crop)
    return torch.stack(clips)


def test_fine_tuning_learns_low_from_high_tones_and_generalises_to_unseen_pitches():
    """Eight epochs of the loop on 16 clips: the training loss falls and clips of pitches it never saw
    are classified correctly (low: 150-300 Hz, high: 900-1500 Hz)."""
    low, high = [150 + 20 * i for i in range(8)], [900 + 80 * i for i in range(8)]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    features = tone_features(low + high, seed=0, normalised=False)[order]
    worker = InMemoryWorker(features, torch.eye(2)[torch.tensor([0] * 8 + [1] * 8)[order]])
    config = job("batch_size=4", "optim.lr=0.002")
    model = classifier(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    loop = finetune.FinetuneLoop(config, "", "", False, ["low", "high"], False)
    losses = [finetune._train_epoch(model, optimizer, loop, worker, epoch) for epoch in range(1, 9)]
    assert losses[-1] < 0.5 * losses[0], losses

    unseen = tone_features([170, 230, 290, 1000, 1200, 1450], seed=1)
    with torch.no_grad():
        predicted = model.eval()(unseen).argmax(dim=-1)
    assert predicted.tolist() == [0, 0, 0, 1, 1, 1]
