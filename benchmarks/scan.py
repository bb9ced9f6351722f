"""Selective scan: the pure-PyTorch chunked scan against sequential recurrences, side by side.

For each sequence length it times forward + backward (median of several runs after a warm-up) of

* ``chunked``    — ``ssamba.ops.selective_scan_pure``, the path the model uses without CUDA kernels;
* ``loop``       — the same recurrence one step at a time, written efficiently (``unbind`` slices,
                   linear-time backward);
* ``mamba_ref``  — the recurrence as mamba-ssm's ``selective_scan_ref`` writes it (indexing a
                   precomputed tensor per step). Its backward is quadratic in L (each indexed step
                   allocates a full-size gradient), so it only runs up to ``--ref-max-len``;
* ``kernel``     — mamba-ssm's CUDA kernel, when it can run (``--device cuda`` with the wheels);

and prints speed ratios and the chunked scan's max relative error against a float64 reference.

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


def max_relative_error(inputs: dict) -> float:
    expected = selective_scan_reference(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()})
    with torch.no_grad():
        actual = selective_scan(**inputs)
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-inner", type=int, default=384)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-max-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"selective scan fwd+bwd, batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, "
          f"float32, {args.device} ({machine}), torch {torch.__version__}")
    kernel = ops._kernels()[0] if args.device == "cuda" else None
    header = f"{'L':>6} {'chunked s':>10} {'loop s':>9} {'mamba_ref s':>12} {'kernel s':>9} {'loop/chunked':>13} {'ref/chunked':>12} {'chunked/kernel':>15} {'max rel err':>12}"
    print(header)
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d_inner, length, args.d_state, args.device)
        chunked = time_forward_backward(selective_scan, inputs, args.device, args.repeats)
        loop = time_forward_backward(lambda **kw: selective_scan(**kw, chunk=length), inputs, args.device, args.repeats)
        reference = (
            time_forward_backward(selective_scan_reference, inputs, args.device, 1)
            if length <= args.ref_max_len else float("nan")
        )
        kernel_time = time_forward_backward(kernel, inputs, args.device, args.repeats) if kernel else float("nan")
        error = max_relative_error(inputs)
        print(f"{length:>6} {chunked:>10.4f} {loop:>9.4f} {reference:>12.4f} {kernel_time:>9.4f} "
              f"{loop / chunked:>12.2f}x {reference / chunked:>11.2f}x {chunked / kernel_time:>14.2f}x {error:>12.2e}")


if __name__ == "__main__":
    main()
