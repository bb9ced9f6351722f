"""Pretraining throughput: samples/s of one optimizer step per model size, objective and path.

Times forward + backward + AdamW step of ``SSAMBAPretrainModel`` at the pretraining grid
(128 × 1024 frames → 512 patches, 400 masked), median of ``--repeats`` steps after a warm-up, for
each size, the official two-pass objective and the single-pass option. On CUDA it also compares the
pure-PyTorch ops with the mamba-ssm kernels and fp32 with bf16 autocast. On the CPU it compares the
chunked pure-PyTorch scan with the fused numba scan, each step configuration in its own process
(peak resident memory is that process's); the pure path runs with a fixed mmap threshold, which its
large temporaries need to stay bounded in memory, the fused path with glibc's defaults.

    python benchmarks/train_step.py [--sizes tiny small] [--batch 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from ssamba import EncoderConfig, PretrainConfig, SSAMBAEncoder, SSAMBAPretrainModel, ops


def limit_heap_fragmentation() -> None:
    """Serve CPU tensors of 16 MiB and more with mmap. glibc's default raises that threshold as big
    blocks are freed, after which the scan's many (batch, d_inner, L, d_state) temporaries fragment
    the heap: the resident size of a tiny-model step grows past 24 GiB although < 2 GiB are live."""
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").mallopt(-3, 16 * 1024 * 1024)  # M_MMAP_THRESHOLD


def step_time(size: str, batch: int, two_pass: bool, device: str, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    config = EncoderConfig.from_size(size)
    model = SSAMBAPretrainModel(SSAMBAEncoder(config), config.grid, PretrainConfig(two_pass=two_pass)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    features = torch.randn(batch, config.grid.target_length, config.grid.num_mel_bins, device=device)
    rng = random.Random(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for run in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(features, rng).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_point(size: str, batch: int, two_pass: bool, path: str, repeats: int) -> dict:
    """One CPU configuration in a fresh process: seconds per step and peak resident MiB."""
    command = [sys.executable, __file__, "--point", size, str(batch), str(int(two_pass)), path, "--repeats", str(repeats)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        return {"seconds": float("nan"), "memory_mib": float("nan"), "status": f"failed ({finished.returncode})"}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--objectives", nargs="+", default=["two-pass", "one-pass"], choices=["two-pass", "one-pass"])
    parser.add_argument("--point", nargs=4, metavar=("SIZE", "BATCH", "TWO_PASS", "OPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:  # a child process timing one CPU configuration
        size, batch, two_pass, path = args.point
        if path == "pure":
            limit_heap_fragmentation()
        ops.force_pure_ops(path == "pure")
        seconds = step_time(size, int(batch), two_pass == "1", "cpu", False, args.repeats)
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "memory_mib": memory, "status": "ok"}))
        return

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"pretraining step, batch {args.batch}, 512 patches (400 masked), {args.device} ({machine}), torch {torch.__version__}")
    if args.device == "cpu":
        print(f"{'size':<6} {'objective':<10} {'ops':<8} {'s/step':>8} {'samples/s':>10} {'tokens/s':>9} {'peak MiB':>9}")
        for size in args.sizes:
            for objective in args.objectives:
                for path in ("pure", "fused"):
                    point = cpu_point(size, args.batch, objective == "two-pass", path, args.repeats)
                    samples = args.batch / point["seconds"]
                    print(f"{size:<6} {objective:<10} {path:<8} {point['seconds']:>8.2f} {samples:>10.2f} "
                          f"{samples * 513:>9.0f} {point['memory_mib']:>9.0f} {point['status']}", flush=True)
        return
    paths = [("pure", False), ("pure", True)] + ([("kernels", False), ("kernels", True)] if ops.kernels_available() else [])
    print(f"{'size':<6} {'objective':<10} {'ops':<8} {'precision':<9} {'s/step':>8} {'samples/s':>10} {'tokens/s':>9}")
    for size in args.sizes:
        for two_pass in (True, False):
            for path, bf16 in paths:
                ops.force_pure_ops(path == "pure")
                seconds = step_time(size, args.batch, two_pass, args.device, bf16, args.repeats)
                samples = args.batch / seconds
                print(f"{size:<6} {'two-pass' if two_pass else 'one-pass':<10} {path:<8} {'bf16' if bf16 else 'fp32':<9} "
                      f"{seconds:>8.2f} {samples:>10.2f} {samples * 513:>9.0f}")
    ops.force_pure_ops(False)


if __name__ == "__main__":
    main()
