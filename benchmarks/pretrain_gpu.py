"""GPU pretraining throughput: SSAMBA against SSAST (SDPA) on the same patches, batch and step.

One optimizer step = the official two-pass objective (512 patches, 400 masked per pass), backward and
a fused AdamW step, under bf16 autocast, SSAMBA with the mamba-ssm / causal-conv1d kernels; model
``ssamba-ts`` is the same encoder with the teacher-student objective (its defaults: 4 masks per clip
at ratio 0.8 sharing one teacher pass, the teacher's EMA update included in the step). For each
model the batch doubles from ``--batch`` until the GPU runs out of memory (or ``--max-batch``);
median of ``--repeats`` steps after two warm-ups. Model FLOP/s by the usual count
``2 · trained parameters · forward-equivalent tokens`` (a backward counts as two forwards; two-pass:
3 · 2 · 513 a sample; teacher-student: 3 · student tokens + teacher tokens) against ``--peak-tflops``.
``--profile`` writes a torch.profiler summary (top CUDA kernels) of one SSAMBA step at the largest
batch that fit, and the GPU's busy fraction over that step.

    PYTHONPATH=. python benchmarks/pretrain_gpu.py --out outputs/gpu [--device cpu for a dry run]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from pathlib import Path

import torch

from ssamba import (
    EncoderConfig,
    PretrainConfig,
    SSAMBAEncoder,
    SSAMBAPretrainModel,
    SSAMBATeacherStudentModel,
    SSASTConfig,
    SSASTEncoder,
    TeacherStudentConfig,
    tokens_per_clip,
)

TEACHER_STUDENT = TeacherStudentConfig()


def build(model: str, size: str, device: str) -> SSAMBAPretrainModel | SSAMBATeacherStudentModel:
    torch.manual_seed(0)
    if model in ("ssamba", "ssamba-ts"):
        config = EncoderConfig.from_size(size)
        encoder = SSAMBAEncoder(config)
    else:
        config = SSASTConfig.from_size(size, attention="sdpa")
        encoder = SSASTEncoder(config)
    if model == "ssamba-ts":
        return SSAMBATeacherStudentModel(encoder, config.grid, TEACHER_STUDENT).to(device)
    return SSAMBAPretrainModel(encoder, config.grid, PretrainConfig(two_pass=True)).to(device)


def forward_equivalent_tokens(model: str, num_patches: int) -> int:
    """Encoder tokens a sample costs per step, a backward pass counted as two forwards."""
    if model == "ssamba-ts":
        return tokens_per_clip(TEACHER_STUDENT, num_patches).forward_equivalents
    return 3 * 2 * (num_patches + 1)  # two passes of the patches + [CLS], forward and backward


class Stepper:
    """One model, its fused AdamW and a fixed input batch; ``step()`` runs one training step."""

    def __init__(self, model: str, size: str, batch: int, device: str, bf16: bool) -> None:
        self.net = build(model, size, device)
        self.device = device
        fused = device == "cuda"
        self.trained = [p for p in self.net.parameters() if p.requires_grad]  # not an EMA teacher
        self.optimizer = torch.optim.AdamW(self.trained, lr=1e-4, fused=fused)
        self.steps = 0
        grid = self.net.grid
        self.features = torch.randn(batch, grid.target_length, grid.num_mel_bins, device=device)
        self.rng = random.Random(0)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(self) -> None:
        with self.autocast:
            loss = self.net(self.features, self.rng).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.net, SSAMBATeacherStudentModel):
            self.net.update_teacher(self.steps)
        self.steps += 1

    def parameters(self) -> int:
        return sum(p.numel() for p in self.trained)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(stepper: Stepper, repeats: int) -> float:
    for _ in range(2):
        stepper.step()
    times = []
    for _ in range(repeats):
        synchronize(stepper.device)
        start = time.perf_counter()
        stepper.step()
        synchronize(stepper.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: str, size: str, batch: int, device: str, bf16: bool, repeats: int) -> dict:
    try:
        stepper = Stepper(model, size, batch, device, bf16)
        seconds = time_steps(stepper, repeats)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return {"status": "ok", "seconds": seconds, "memory_gib": memory, "params": stepper.parameters(),
                "tokens": forward_equivalent_tokens(model, stepper.net.grid.num_patches)}
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom"}
    finally:
        stepper = None
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def profile(model: str, size: str, batch: int, device: str, bf16: bool, out: Path) -> list[str]:
    """Top CUDA kernels of one step and the GPU's busy fraction of the step's wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stepper = Stepper(model, size, batch, device, bf16)
    for _ in range(2):
        stepper.step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        stepper.step()
        synchronize(device)
    wall = time.perf_counter() - start
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_time = sum(e.self_device_time_total for e in kernels) / 1e6 if device == "cuda" else float("nan")
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    summary = [f"profile: {model}-{size}, batch {batch}, one step {wall:.3f} s wall (profiler on), "
               f"GPU kernels {kernel_time:.3f} s = {100 * kernel_time / wall:.0f}% busy, {launches} kernel launches"]
    (out / f"profile_{model}_{size}_b{batch}.txt").write_text("\n".join(summary) + "\n" + table)
    return summary + table.splitlines()[:20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--models", nargs="+", default=["ssamba", "ssamba-ts", "ssast-sdpa"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bf16 = not args.fp32 and args.device == "cuda"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"pretraining step ({args.size}, {'bf16' if bf16 else 'fp32'}, fused AdamW) on {machine}, torch {torch.__version__}")
    rows, best = [], {}
    for model in args.models:
        batch = args.batch
        while batch <= args.max_batch:
            result = measure(model, args.size, batch, args.device, bf16, args.repeats)
            if result["status"] != "ok":
                print(f"  {model:<11} batch {batch:>4}: {result['status']}", flush=True)
                break
            samples = batch / result["seconds"]
            tflops = 2 * result["params"] * result["tokens"] * samples / 1e12
            row = {"model": model, "batch": batch, **result, "samples_s": samples, "tflops": tflops}
            rows.append(row)
            best[model] = row if model not in best or samples > best[model]["samples_s"] else best[model]
            print(f"  {model:<11} batch {batch:>4}: {result['seconds']:.3f} s/step, {samples:7.1f} samples/s, "
                  f"{result['memory_gib']:.1f} GiB, {tflops:.1f} model TFLOP/s ({100 * tflops / args.peak_tflops:.1f}% of peak)",
                  flush=True)
            batch *= 2
    lines = []
    if "ssamba" in best and args.profile:
        lines += profile("ssamba", args.size, best["ssamba"]["batch"], args.device, bf16, args.out)
    for model, row in best.items():
        lines.append(f"best {model}-{args.size}: batch {row['batch']}, {row['samples_s']:.1f} samples/s, "
                     f"{row['tflops']:.1f} TFLOP/s = {100 * row['tflops'] / args.peak_tflops:.1f}% MFU "
                     f"({row['params'] / 1e6:.1f} M parameters)")
    if "ssamba" in best and "ssast-sdpa" in best:
        mamba = best["ssamba"]
        same = next((r for r in rows if r["model"] == "ssast-sdpa" and r["batch"] == mamba["batch"]), None)
        if same:
            lines.append(f"at batch {mamba['batch']}: SSAST-SDPA ÷ SSAMBA samples/s = {same['samples_s'] / mamba['samples_s']:.2f}×")
    if "ssamba" in best and "ssamba-ts" in best:
        lines.append(f"best SSAMBA teacher-student ÷ best SSAMBA two-pass samples/s = "
                     f"{best['ssamba-ts']['samples_s'] / best['ssamba']['samples_s']:.2f}×")
    (args.out / "pretrain_gpu.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
