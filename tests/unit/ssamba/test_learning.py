"""Pretraining learns: 20 optimizer steps on generated harmonic tones lower the loss and lift the
masked-patch accuracy (picking each masked patch among the clip's masked patches) well above chance.
The model, data and masks are seeded; the margins leave room for float differences across machines."""

from __future__ import annotations

import math
import random

import torch

from ssamba import (
    EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel, crop_or_pad, norm_stats, normalize,
    waveform_to_fbank,
)

GRID = PatchGrid(num_mel_bins=128, target_length=128)  # 8 × 8 patches
MASKED = 16
CHANCE = 1 / MASKED


def harmonic_clips(count: int = 16, seconds: float = 1.3) -> torch.Tensor:
    """Normalised fbanks of tones with four harmonics, a slow vibrato and a little noise: each clip's
    pitch differs, so a masked patch is predictable from the visible ones."""
    noise = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * 16_000)) / 16_000
    clips = []
    for index in range(count):
        f0 = 120 + 35 * index
        vibrato = 1 + 0.05 * torch.sin(2 * math.pi * (1 + index % 3) * t)
        wave = sum((0.3 / k) * torch.sin(2 * math.pi * f0 * k * t * vibrato) for k in range(1, 5))
        wave = wave + 0.02 * torch.randn(len(t), generator=noise)
        clips.append(normalize(crop_or_pad(waveform_to_fbank(wave), GRID.target_length), norm_stats("audioset")))
    return torch.stack(clips)


def test_twenty_steps_lower_the_loss_and_lift_masked_accuracy_above_chance():
    torch.manual_seed(0)
    model = SSAMBAPretrainModel(SSAMBAEncoder(EncoderConfig(embed_dim=32, depth=2, grid=GRID)), GRID,
                                PretrainConfig(mask_patches=MASKED))
    clips = harmonic_clips()

    def evaluate():
        model.eval()
        with torch.no_grad():
            output = model(clips, random.Random(123))  # the same masks before and after
        model.train()
        return output

    before = evaluate()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    masks, order = random.Random(0), torch.Generator().manual_seed(1)
    for _ in range(20):
        output = model(clips[torch.randperm(len(clips), generator=order)[:8]], masks)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    after = evaluate()

    assert float(after.loss) < 0.85 * float(before.loss)
    assert float(after.nce) < float(before.nce) and float(after.mse) < float(before.mse)
    assert float(before.accuracy) < 2 * CHANCE < 2.5 * CHANCE < float(after.accuracy)
