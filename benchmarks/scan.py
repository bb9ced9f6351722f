"""Selective scan: the chunked PyTorch scan against the fused CPU scan and sequential recurrences.

For each sequence length it times forward + backward (median of several runs after a warm-up) of

* ``chunked``    — ``ssamba.ops.selective_scan_pure``, the pure-PyTorch path (the reference fallback);
* ``fused``      — the fused numba scan the model uses on the CPU (``--device cpu`` only);
* ``loop``       — the same recurrence one step at a time, written efficiently (``unbind`` slices,
                   linear-time backward);
* ``mamba_ref``  — the recurrence as mamba-ssm's ``selective_scan_ref`` writes it (indexing a
                   precomputed tensor per step). Its backward is quadratic in L (each indexed step
                   allocates a full-size gradient), so it only runs up to ``--ref-max-len``;
* ``kernel``     — mamba-ssm's CUDA kernel, when it can run (``--device cuda`` with the wheels);

and prints speed ratios and, up to ``--error-max-len``, the chunked and fused scans' worst relative error
against a float64 reference over the output and the gradient of every input.

    python benchmarks/scan.py [--lengths 512 2048 8192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from ssamba import ops
from ssamba.ops.selective_scan import selective_scan, selective_scan_reference

try:
    from ssamba.ops.fused_scan import fused_selective_scan
except ImportError:  # numba missing: no fused column
    fused_selective_scan = None


def make_inputs(batch: int, d_inner: int, length: int, d_state: int, device: str) -> dict:
    g = torch.Generator().manual_seed(length)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    return dict(
        u=rand(batch, d_inner, length),
        delta=0.5 * rand(batch, d_inner, length),
        A=-torch.exp(rand(d_inner, d_state).clamp(-2, 2)),
        B=rand(batch, d_state, length),
        C=rand(batch, d_state, length),
        D=rand(d_inner),
        z=rand(batch, d_inner, length),
        delta_bias=0.1 * rand(d_inner),
        delta_softplus=True,
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward_backward(fn: Callable, inputs: dict, device: str, repeats: int) -> float:
    """Median seconds of one forward + backward, after one warm-up run."""
    leaves = {k: v.detach().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
    times = []
    for run in range(repeats + 1):
        for value in leaves.values():
            if torch.is_tensor(value):
                value.grad = None
        synchronize(device)
        start = time.perf_counter()
        fn(**leaves).sum().backward()
        synchronize(device)
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worst_relative_error(fn: Callable, inputs: dict) -> float:
    """Worst of the output's and every gradient's max |fn − float64 reference| / max |reference|,
    with the loss a fixed random weighting of the output."""
    def run(scan: Callable, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = {k: v.detach().to(dtype).requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = scan(**leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device, dtype)
        (out * weights).sum().backward()
        return [out.detach()] + [v.grad for v in leaves.values() if torch.is_tensor(v)]

    expected = run(selective_scan_reference, torch.float64)
    actual = run(fn, torch.float32)
    return max(((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-inner", type=int, default=384)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-max-len", type=int, default=512)
    parser.add_argument("--error-max-len", type=int, default=2048, help="float64 gradient check up to this L")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"selective scan fwd+bwd, batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, "
          f"float32, {args.device} ({machine}), torch {torch.__version__}")
    kernel = ops._kernels()[0] if args.device == "cuda" else None
    fused = fused_selective_scan if args.device == "cpu" else None
    header = (f"{'L':>6} {'chunked s':>10} {'fused s':>8} {'loop s':>9} {'mamba_ref s':>12} {'kernel s':>9} "
              f"{'chunked/fused':>14} {'loop/chunked':>13} {'ref/chunked':>12} {'chunked/kernel':>15} "
              f"{'chunked err':>12} {'fused err':>10}")
    print(header)
    nan = float("nan")
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d_inner, length, args.d_state, args.device)
        chunked = time_forward_backward(selective_scan, inputs, args.device, args.repeats)
        fused_time = time_forward_backward(fused, inputs, args.device, args.repeats) if fused else nan
        loop = time_forward_backward(lambda **kw: selective_scan(**kw, chunk=length), inputs, args.device, args.repeats)  # noqa: B023 - called at once
        reference = (
            time_forward_backward(selective_scan_reference, inputs, args.device, 1)
            if length <= args.ref_max_len else nan
        )
        kernel_time = time_forward_backward(kernel, inputs, args.device, args.repeats) if kernel else nan
        checked = length <= args.error_max_len
        chunked_error = worst_relative_error(selective_scan, inputs) if checked else nan
        fused_error = worst_relative_error(fused, inputs) if checked and fused else nan
        print(f"{length:>6} {chunked:>10.4f} {fused_time:>8.4f} {loop:>9.4f} {reference:>12.4f} {kernel_time:>9.4f} "
              f"{chunked / fused_time:>13.2f}x {loop / chunked:>12.2f}x {reference / chunked:>11.2f}x "
              f"{chunked / kernel_time:>14.2f}x {chunked_error:>12.2e} {fused_error:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
