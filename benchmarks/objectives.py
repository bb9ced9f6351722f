"""Pretraining objectives side by side: masked-patch (two-pass, official) vs teacher-student.

For the same encoder, grid and batch: encoder tokens per clip per step (``ssamba.tokens_per_clip``)
and the median time of one optimizer step (forward, backward, AdamW; for teacher-student also the
teacher's EMA update) over ``--repeats`` steps after a warm-up; then the ratios teacher-student /
masked-patch. The masked-patch objective masks 400/512 of the patches (400 at the paper's grid).

    python benchmarks/objectives.py --size tiny --batch 2                       # the paper's 128 × 1024 grid
    python benchmarks/objectives.py --embed-dim 32 --depth 4 --mel 64 --frames 128 --batch 4   # the unit tests' model
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from ssamba import (
    EncoderConfig,
    PatchGrid,
    PretrainConfig,
    SSAMBAEncoder,
    SSAMBAPretrainModel,
    SSAMBATeacherStudentModel,
    TeacherStudentConfig,
    tokens_per_clip,
)

MASKED_PATCH = PretrainConfig(mask_patches=None, mask_ratio=400 / 512)


def build(objective: PretrainConfig | TeacherStudentConfig, encoder_config: EncoderConfig, device: str) -> nn.Module:
    torch.manual_seed(0)
    encoder, grid = SSAMBAEncoder(encoder_config), encoder_config.grid
    if isinstance(objective, PretrainConfig):
        return SSAMBAPretrainModel(encoder, grid, objective).to(device)
    return SSAMBATeacherStudentModel(encoder, grid, objective).to(device)


def step_time(model: nn.Module, features: torch.Tensor, repeats: int) -> float:
    """Median seconds of one optimizer step, after one warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng, times = random.Random(0), []
    for step in range(repeats + 1):
        if features.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(features, rng).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(model, SSAMBATeacherStudentModel):
            model.update_teacher(step)
        if features.is_cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="tiny / small / base (width); --embed-dim and --depth override")
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--mel", type=int, default=128)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clones", type=int, default=TeacherStudentConfig().clones)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    overrides = {key: value for key, value in (("embed_dim", args.embed_dim), ("depth", args.depth)) if value is not None}
    encoder_config = EncoderConfig.from_size(args.size, grid=PatchGrid(args.mel, args.frames), **overrides)
    patches = encoder_config.grid.num_patches
    features = torch.randn(args.batch, args.frames, args.mel, device=args.device)
    objectives = {"masked-patch": MASKED_PATCH, "teacher-student": TeacherStudentConfig(clones=args.clones)}
    print(f"D={encoder_config.embed_dim} depth={encoder_config.depth}, {patches} patches, batch {args.batch}, "
          f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'objective':<16} {'student tok':>11} {'teacher tok':>11} {'total tok':>9} {'fwd-equiv':>9} {'s/step':>8}")
    results = {}
    for name, objective in objectives.items():
        tokens = tokens_per_clip(objective, patches)
        seconds = step_time(build(objective, encoder_config, args.device), features, args.repeats)
        results[name] = (tokens, seconds)
        print(f"{name:<16} {tokens.student:>11} {tokens.teacher:>11} {tokens.total:>9} {tokens.forward_equivalents:>9} "
              f"{seconds:>8.3f}", flush=True)
    (base_tokens, base_seconds), (ts_tokens, ts_seconds) = results["masked-patch"], results["teacher-student"]
    print(f"teacher-student / masked-patch: tokens {ts_tokens.total / base_tokens.total:.2f}, "
          f"forward-equivalents {ts_tokens.forward_equivalents / base_tokens.forward_equivalents:.2f}, "
          f"step time {ts_seconds / base_seconds:.2f}")


if __name__ == "__main__":
    main()
