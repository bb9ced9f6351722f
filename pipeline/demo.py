"""`make demo`: a small end-to-end run of the model library on generated audio, on the CPU.

Synthesises a few dozen short clips (harmonic tones with vibrato and noise bursts), computes their
Kaldi fbanks, and runs masked-patch pretraining of a small SSAMBA encoder for a minute or so,
printing the losses as they fall. It needs no data, no network and no GPU.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from ssamba import EncoderConfig, PatchGrid, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel
from ssamba.features import crop_or_pad, norm_stats, normalize, waveform_to_fbank

SAMPLE_RATE = 16_000


def synthetic_clip(rng: torch.Generator, seconds: float) -> torch.Tensor:
    """A harmonic tone with vibrato, an amplitude envelope and a burst of noise."""
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 100 + 700 * torch.rand((), generator=rng)
    vibrato = 1 + 0.02 * torch.sin(2 * torch.pi * (2 + 4 * torch.rand((), generator=rng)) * t)
    phase = 2 * torch.pi * torch.cumsum(pitch * vibrato, 0) / SAMPLE_RATE
    harmonics = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = torch.sigmoid(20 * (t - seconds * torch.rand((), generator=rng) * 0.5))
    burst_start = torch.rand((), generator=rng) * seconds
    burst = ((t > burst_start) & (t < burst_start + 0.2)).float() * torch.randn(len(t), generator=rng)
    return 0.3 * harmonics * envelope + 0.1 * burst


def make_dataset(num_clips: int, grid: PatchGrid, seed: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    seconds = (grid.target_length + 2) / 100
    clips = [crop_or_pad(waveform_to_fbank(synthetic_clip(rng, seconds)), grid.target_length) for _ in range(num_clips)]
    return normalize(torch.stack(clips), norm_stats("audioset"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    grid = PatchGrid(num_mel_bins=128, target_length=128)  # 8 × 8 patches of 16 × 16
    encoder_config = EncoderConfig(embed_dim=64, depth=4, grid=grid, drop_path_rate=0.0)
    model = SSAMBAPretrainModel(SSAMBAEncoder(encoder_config), grid, PretrainConfig(mask_patches=24))
    print(f"SSAMBA demo: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{grid.num_patches} patches per clip, {model.num_mask} masked")

    features = make_dataset(48, grid, args.seed)
    print(f"featurized {len(features)} generated clips → fbank {tuple(features.shape[1:])}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-8, betas=(0.95, 0.999))
    mask_rng = random.Random(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = features[torch.randint(len(features), (8,))]
        out = model(batch, mask_rng)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {out.loss.item():8.4f}  nce {out.nce.item():7.4f}  "
                  f"mse {out.mse.item():7.4f}  acc {out.accuracy.item():6.3f}  ({time.perf_counter() - start:5.1f} s)")


if __name__ == "__main__":
    main()
