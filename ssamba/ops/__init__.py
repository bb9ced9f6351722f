"""The two sequence operators of the Mamba mixer, dispatched to the fastest path that can run.

:func:`selective_scan` tries, in order: mamba-ssm's CUDA kernel (CUDA tensors, ``mamba_ssm``
importable); the fused numba scan of :mod:`ssamba.ops.fused_scan` (CPU tensors that are not
float64, ``numba`` importable); the chunked pure-PyTorch scan, which runs everywhere (and is the
reference the others are checked against). :func:`causal_conv1d` uses the ``causal_conv1d`` CUDA
kernel on CUDA tensors when importable, else the pure-PyTorch version. All paths compute the same
function. Set ``SSAMBA_PURE_OPS=1`` (or call :func:`force_pure_ops`) to always use the pure-PyTorch
paths, e.g. to compare them. Each op logs once which path it runs on; a fast path that should run
but cannot be imported (a GPU without the kernels, no numba) is a warning, once.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Callable

import torch

from ssamba.ops.causal_conv1d import causal_conv1d as causal_conv1d_pure
from ssamba.ops.selective_scan import selective_scan as selective_scan_pure
from ssamba.ops.selective_scan import selective_scan_reference

__all__ = [
    "causal_conv1d",
    "causal_conv1d_pure",
    "compute_path",
    "force_pure_ops",
    "kernels_available",
    "selective_scan",
    "selective_scan_pure",
    "selective_scan_reference",
]

log = logging.getLogger(__name__)
_force_pure = os.environ.get("SSAMBA_PURE_OPS", "").lower() in ("1", "true", "yes")
_announced: set[str] = set()


def force_pure_ops(enabled: bool = True) -> None:
    """Use the pure-PyTorch ops even where the CUDA kernels could run."""
    global _force_pure
    _force_pure = enabled


@lru_cache(maxsize=1)
def _kernels() -> tuple[Callable | None, Callable | None]:
    """The CUDA kernels, or None each. Imported lazily and only with CUDA present: importing
    mamba_ssm without its compiled extension raises, and that must never break the CPU path."""
    if not torch.cuda.is_available():
        return None, None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:
        log.warning("the mamba_ssm selective-scan kernel cannot be imported (%s): CUDA tensors take the much slower "
                    "pure-PyTorch scan; install mamba-ssm for this torch and CUDA (docs/model.md)", error)
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as error:
        log.warning("the causal_conv1d kernel cannot be imported (%s): CUDA tensors take the slower pure-PyTorch "
                    "convolution; install causal-conv1d for this torch and CUDA (docs/model.md)", error)
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn


@lru_cache(maxsize=1)
def _fused_cpu_scan() -> Callable | None:
    """The fused numba CPU scan, or None if numba cannot be imported."""
    try:
        from ssamba.ops.fused_scan import fused_selective_scan
    except Exception as error:
        log.warning("the fused CPU selective scan cannot be imported (%s): CPU tensors take the slower chunked "
                    "pure-PyTorch scan; numba is a dependency of this package, reinstall it", error)
        return None
    return fused_selective_scan


def kernels_available() -> bool:
    return all(kernel is not None for kernel in _kernels())


def compute_path(device: torch.device | str) -> str:
    """Which implementation of each operator runs for (float32) tensors on ``device``, in words (for
    logs): the same order as the dispatch below."""
    scan_kernel, conv_kernel = _kernels()
    kind = torch.device(device).type
    if _force_pure:
        return "selective_scan: pure PyTorch (forced), causal_conv1d: pure PyTorch (forced)"
    if kind == "cuda":
        scan = "mamba_ssm CUDA kernel" if scan_kernel is not None else "pure PyTorch (kernel not importable)"
        conv = "causal_conv1d CUDA kernel" if conv_kernel is not None else "pure PyTorch (kernel not importable)"
    elif kind == "cpu":
        scan = "fused CPU (numba)" if _fused_cpu_scan() is not None else "pure PyTorch (numba not importable)"
        conv = "pure PyTorch"
    else:
        scan = conv = "pure PyTorch"
    return f"selective_scan: {scan}, causal_conv1d: {conv}"


def _announce(op: str, path: str) -> None:
    key = f"{op}:{path}"
    if key not in _announced:
        _announced.add(key)
        log.info("%s runs on the %s path", op, path)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    if not _force_pure:
        kernel = _kernels()[0]
        if u.is_cuda and kernel is not None:
            _announce("selective_scan", "mamba_ssm CUDA kernel")
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        fused = _fused_cpu_scan() if u.device.type == "cpu" and u.dtype != torch.float64 else None
        if fused is not None:
            _announce("selective_scan", "fused CPU (numba)")
            return fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _announce("selective_scan", "pure PyTorch")
    return selective_scan_pure(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    kernel = _kernels()[1]
    if x.is_cuda and kernel is not None and not _force_pure:
        _announce("causal_conv1d", "causal_conv1d CUDA kernel")
        return kernel(x, weight, bias, activation=activation)
    _announce("causal_conv1d", "pure PyTorch")
    return causal_conv1d_pure(x, weight, bias, activation)
