"""Efficiency study: SSAMBA vs SSAST inference time and peak memory against the number of tokens.

The paper's protocol (docs/model.md#efficiency-protocol): fine-tuning-shaped models (16×16 patches, stride 16 → tokens =
frames / 2, mean pooling, a 50-class head), fp32, ``no_grad``, random input; median of ``--repeats``
timed forwards after a warm-up. SSAST runs with eager attention (as in the paper) and with SDPA (the
fairer modern baseline).

* CUDA: CUDA-event timing, ``torch.cuda.max_memory_allocated`` (weights included), OOM recorded.
* CPU: every point runs in its own process; memory is that process's peak resident size, and
  ``baseline_mib`` its peak after one 16-token forward of the same model (the libraries' fixed cost:
  torch, and for SSAMBA numba with its compiled scan), so the difference is the working set.
* ``ssamba-ref`` (CUDA only) is SSAMBA with the reference forward instead of the lean one, to show
  what the lean forward gains in the same run. ``--precision tf32|bf16`` (CUDA) measures the
  inference-precision options (TF32 matrix products, or bf16 autocast), apart from the fp32 protocol.

Writes ``efficiency.csv`` and ``efficiency.png`` to ``--out`` and prints, per size, the time and
memory ratios at 22k tokens (or the largest token count both models reached).

    python benchmarks/efficiency.py --sizes tiny --tokens 512 1024 2048 --batch 2 --out outputs/efficiency
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ssamba import AudioClassifier, ClassifierConfig, EncoderConfig, PatchGrid, SSAMBAEncoder, SSASTConfig, SSASTEncoder, fastpath

MODELS = ("ssamba", "ssamba-ref", "ssast-eager", "ssast-sdpa")
PAPER_TOKENS = 22_000


def build(model: str, size: str, tokens: int) -> AudioClassifier:
    grid = PatchGrid(num_mel_bins=128, target_length=2 * tokens)  # 8 frequency × T/16 time patches
    if model.startswith("ssamba"):
        encoder = SSAMBAEncoder(EncoderConfig.from_size(size, grid=grid))
    else:
        encoder = SSASTEncoder(SSASTConfig.from_size(size, grid=grid, attention=model.split("-")[1]))
    return AudioClassifier(encoder, ClassifierConfig(num_classes=50)).eval()


@contextlib.contextmanager
def precision_and_path(model: str, precision: str, device: str):
    """The forward path (lean / reference) and the arithmetic precision of one CUDA point."""
    if device != "cuda":
        yield
        return
    fastpath.set_lean_forward(False if model == "ssamba-ref" else None)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        fastpath.set_lean_forward(None)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


def measure(model: str, size: str, batch: int, tokens: int, repeats: int, device: str, precision: str = "fp32") -> dict:
    """One point, in this process: seconds per forward and peak memory in MiB."""
    with precision_and_path(model, precision, device):
        return _measure(model, size, batch, tokens, repeats, device)


def warm_libraries(model: str, size: str) -> float:
    """Run the model's code path once on a 16-token input and return the process's peak resident MiB:
    what the libraries cost (torch, numba and its compiled scan), before any real working set."""
    with torch.no_grad():
        build(model, size, 16)(torch.randn(1, 32, 128))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(model: str, size: str, batch: int, tokens: int, repeats: int, device: str) -> dict:
    baseline = warm_libraries(model, size) if device == "cpu" else None
    torch.manual_seed(0)
    net = build(model, size, tokens).to(device)
    features = torch.randn(batch, 2 * tokens, 128, device=device)
    times = []
    try:
        with torch.no_grad():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for run in range(repeats + 1):
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    net(features)
                    end.record()
                    torch.cuda.synchronize()
                    seconds = start.elapsed_time(end) / 1000
                else:
                    begin = time.perf_counter()
                    net(features)
                    seconds = time.perf_counter() - begin
                if run:
                    times.append(seconds)
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom", "seconds": None, "memory_mib": None, "baseline_mib": None}
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"status": "ok", "seconds": statistics.median(times), "memory_mib": memory, "baseline_mib": baseline}


def measure_in_subprocess(model: str, size: str, batch: int, tokens: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--point", model, size, str(batch), str(tokens), "--repeats", str(repeats)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:  # killed for memory, typically
        return {"status": f"failed ({finished.returncode})", "seconds": None, "memory_mib": None, "baseline_mib": None}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r["model"], r["size"], r["batch"]) for r in rows})
    for model, size, batch in keys:
        points = sorted((r["tokens"], r) for r in rows if (r["model"], r["size"], r["batch"]) == (model, size, batch)
                        and r["status"] == "ok")
        if not points:
            continue
        label = f"{model} {size} b{batch}"
        time_axis.plot([t for t, _ in points], [r["seconds"] for _, r in points], marker="o", label=label)
        memory_axis.plot([t for t, _ in points], [r["memory_mib"] / 1024 for _, r in points], marker="o", label=label)
    time_axis.set(xlabel="tokens", ylabel="seconds per forward", title="inference time")
    memory_axis.set(xlabel="tokens", ylabel="peak memory (GiB)", title="peak memory")
    time_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summarize(rows: list[dict]) -> list[str]:
    """Per size and batch: SSAMBA vs eager SSAST at 22k tokens, or the largest count both reached."""
    lines = []
    for size, batch in sorted({(r["size"], r["batch"]) for r in rows}):
        ok = {(r["model"], r["tokens"]): r for r in rows if r["size"] == size and r["batch"] == batch and r["status"] == "ok"}
        shared = sorted(t for (m, t) in ok if m == "ssamba" and ("ssast-eager", t) in ok)
        if not shared:
            continue
        tokens = PAPER_TOKENS if PAPER_TOKENS in shared else shared[-1]
        mamba, ssast = ok[("ssamba", tokens)], ok[("ssast-eager", tokens)]
        lines.append(f"{size} batch {batch} at {tokens} tokens: SSAMBA {mamba['seconds']:.3f} s / "
                     f"{mamba['memory_mib']:.0f} MiB vs SSAST (eager) {ssast['seconds']:.3f} s / {ssast['memory_mib']:.0f} MiB "
                     f"→ {100 * (1 - mamba['seconds'] / ssast['seconds']):+.1f}% faster, "
                     f"{100 * (1 - mamba['memory_mib'] / ssast['memory_mib']):+.1f}% less memory")
        if mamba.get("baseline_mib") is not None:  # CPU: the peak above each process's warm libraries
            lines.append(f"  above the warm libraries ({mamba['baseline_mib']:.0f} / {ssast['baseline_mib']:.0f} MiB): "
                         f"SSAMBA {mamba['memory_mib'] - mamba['baseline_mib']:.0f} MiB vs "
                         f"SSAST {ssast['memory_mib'] - ssast['baseline_mib']:.0f} MiB")
    return lines


def compare_cuda(rows: list[dict]) -> list[str]:
    """Lean against reference forward, and the first token count from which SSAMBA beats SDPA."""
    lines = []
    for size, batch in sorted({(r["size"], r["batch"]) for r in rows}):
        ok = {(r["model"], r["tokens"]): r for r in rows if r["size"] == size and r["batch"] == batch and r["status"] == "ok"}
        for tokens in sorted({t for (m, t) in ok if m == "ssamba" and ("ssamba-ref", t) in ok}):
            lean, ref = ok[("ssamba", tokens)], ok[("ssamba-ref", tokens)]
            lines.append(f"{size} batch {batch} at {tokens} tokens: lean {lean['seconds']:.4f} s / {lean['memory_mib']:.0f} MiB, "
                         f"reference {ref['seconds']:.4f} s / {ref['memory_mib']:.0f} MiB → {ref['seconds'] / lean['seconds']:.2f}× faster")
        shared = sorted(t for (m, t) in ok if m == "ssamba" and ("ssast-sdpa", t) in ok)
        faster = [t for t in shared if ok[("ssamba", t)]["seconds"] < ok[("ssast-sdpa", t)]["seconds"]]
        if shared:
            lines.append(f"{size} batch {batch}: SSAMBA faster than SSAST-SDPA at {faster or 'no'} tokens "
                         f"(of {shared})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="CUDA only")
    parser.add_argument("--out", type=Path, default=Path("outputs/efficiency"))
    parser.add_argument("--point", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:  # a child process measuring one CPU point
        model, size, batch, tokens = args.point
        print(json.dumps(measure(model, size, int(batch), int(tokens), args.repeats, "cpu")))
        return

    if any(t % 8 for t in args.tokens):
        parser.error("token counts must be multiples of 8 (8 frequency patches per time step)")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, one process per point"
    print(f"efficiency study on {machine}, torch {torch.__version__}, {args.precision}, no_grad, median of {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        for batch in args.batch:
            for model in args.models:
                for tokens in sorted(args.tokens):
                    if args.device == "cuda":
                        result = measure(model, size, batch, tokens, args.repeats, "cuda", args.precision)
                        torch.cuda.empty_cache()
                    else:
                        result = measure_in_subprocess(model, size, batch, tokens, args.repeats)
                    row = {"model": model, "size": size, "batch": batch, "tokens": tokens, **result}
                    rows.append(row)
                    shown = f"{row['seconds']:.3f} s, {row['memory_mib']:.0f} MiB" if row["status"] == "ok" else row["status"]
                    print(f"  {model:<12} {size:<6} batch {batch} {tokens:>6} tokens: {shown}", flush=True)
    with open(args.out / "efficiency.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "efficiency.png")
    for line in summarize(rows) + compare_cuda(rows):
        print(line)


if __name__ == "__main__":
    main()
